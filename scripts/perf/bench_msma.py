"""MSMA scoring benchmark: the detector's full scoring pass vs the bare network forwards it needs.

For a batch of B uint8 images, MSMA needs B*L network evaluations (one per noise level). Compared, per image:
- bare: `net(x_pairs, level)` over a prebuilt float batch of all B*L (image, level) pairs, in the same chunk
  sizes as the detector (the floor: the network's own compute);
- norms: `score_norms` from the uint8 batch (to float, pair indexing, chunked forwards, weighted norms);
- rows: `MSMA.score_rows` (norms + GMM, kNN and flow scores): what `oodbench score/eval` runs per batch.
Runs alternate (bare, norms, rows, bare, ...) so a machine shared with other jobs slows all alike; the median of the
repeats is compared. Goal: rows / bare <= 1.15. Random network weights and random images (speed does not depend on
either); the auxiliary models are fitted on the score norms of other random images.

    python scripts/perf/bench_msma.py [--model resnet|refinenet] [--filters 16] [--num-L 10] [--shape 1 28 28]
                                      [--batch 128] [--chunk 1024] [--repeats 5] [--device auto] [--bf16]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

import torch
import yaml

from oodbench.detectors.msma import MSMA, score_norms, sigma_schedule
from oodbench.engine import resolve_device
from oodbench.nets.score_nets import build_score_net
from timing import timed

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "msma.yaml"


def make_detector(args, device) -> MSMA:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg.pop("presets")
    cfg["msma"].update(score_chunk=args.chunk, gmm_components=[2, 4, 8], gmm_cv_folds=3, flow_epochs=100)
    det = MSMA(cfg, device)
    torch.manual_seed(0)
    det.sigmas = sigma_schedule(0.01, 1.0, args.num_L).to(device)
    det.arch = {"model": args.model, "channels": args.shape[0], "filters": args.filters, "num_L": args.num_L}
    det.net = build_score_net(**det.arch).to(device).eval()
    fit_images = torch.randint(0, 256, (300, *args.shape), dtype=torch.uint8, device=device)
    det.train_norms = det.norms_of(fit_images)
    det.fit_aux(seed=0)
    return det


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet", choices=["resnet", "refinenet"])
    p.add_argument("--filters", type=int, default=16)
    p.add_argument("--num-L", dest="num_L", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true", help="autocast the forwards to bfloat16 (GPU)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    det = make_detector(args, device)
    net, sigmas, chunk = det.net, det.sigmas, args.chunk

    x = torch.randint(0, 256, (args.batch, *args.shape), dtype=torch.uint8, device=device)
    pairs = torch.arange(args.batch * args.num_L, device=device)
    x_pairs = (x.float() / 255)[pairs % args.batch]       # prebuilt: not part of the bare time
    levels = pairs // args.batch
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())

    @torch.no_grad()
    def bare():
        for start in range(0, len(pairs), chunk):
            net(x_pairs[start:start + chunk], levels[start:start + chunk])

    def norms():
        score_norms(net, x.float() / 255, sigmas, chunk)

    def rows():
        det.score_rows(x)

    times = {"bare": [], "norms": [], "rows": []}
    with autocast:
        rows()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("bare", bare), ("norms", norms), ("rows", rows)):
                times[name].append(timed(fn)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in net.parameters())
    print(f"device {device}{' bf16' if args.bf16 else ''}, torch threads {torch.get_num_threads()}; "
          f"{args.model} filters {args.filters} ({params / 1e6:.2f}M params), L={args.num_L}, "
          f"images {tuple(args.shape)}, batch {args.batch}, chunk {chunk}, {args.repeats} repeats (median)")
    for name in ("bare", "norms", "rows"):
        per_image = med[name] / args.batch
        print(f"  {name:<6} {per_image * 1e3:8.3f} ms/image  {1 / per_image:9.1f} images/s  "
              f"ratio to bare {med[name] / med['bare']:.3f}")
    print(f"goal: rows / bare <= 1.15 -> {'met' if med['rows'] / med['bare'] <= 1.15 else 'NOT met'}")


if __name__ == "__main__":
    main()
