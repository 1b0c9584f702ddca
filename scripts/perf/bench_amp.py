"""AMP scoring cost vs the wrapped network's own compute, measured in one run.

    python scripts/perf/bench_amp.py [--arch resnet20] [--batch 128] [--k 5] [--device auto]

"ours" is `AMP.score_rows` on a uint8 batch: normalisation, the K anchored pairs built as one (K*B) batch, the
forward, the heteroscedastic calibration and all four score types. The baseline is K bare forwards of the wrapped
network on (B, 2C, H, W) inputs prepared beforehand (the network's own compute, nothing else); goal: ratio <= 1.15.
A single bare forward of the whole (K*B) batch is printed too (the compute floor when batching helps the device).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from oodbench.detectors.amp import AMP
from oodbench.engine import resolve_device
from oodbench.nets.anchoring import build_anchored


def timed(fns: dict, device, reps: int) -> dict:
    """Median seconds of each fn() over reps rounds; the fns run interleaved, so load drift hits them alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--shape", default="3,32,32", help="C,H,W")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    device = resolve_device(a.device)
    c, h, w = (int(v) for v in a.shape.split(","))
    torch.manual_seed(0)

    net = build_anchored(a.arch, c, a.classes)
    state = {"arch": a.arch, "model_kw": {}, "shape": [c, h, w], "num_classes": a.classes,
             "mean": [0.5] * c, "std": [0.25] * c, "pool": torch.randint(0, 256, (128, c, h, w), dtype=torch.uint8),
             "net": net.state_dict()}
    det = AMP({"amp": {"k": a.k, "score": "xent"}}, device)
    det.load_state_dict(state)
    wrapped = det.model.net

    x = torch.randint(0, 256, (a.batch, c, h, w), dtype=torch.uint8, device=device)
    pairs = torch.randn(a.k, a.batch, 2 * c, h, w, device=device)
    flat = pairs.reshape(a.k * a.batch, 2 * c, h, w)

    with torch.no_grad():
        t = timed({"ours": lambda: det.score_rows(x), "bare": lambda: [wrapped(pairs[i]) for i in range(a.k)],
                   "flat": lambda: wrapped(flat)}, device, a.reps)
    t_ours, t_bare, t_flat = t["ours"], t["bare"], t["flat"]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"AMP scoring, {a.arch}, batch {a.batch}, K={a.k}, images {c}x{h}x{w}, {name}")
    print(f"  score_rows (all 4 score types)      {1000 * t_ours:9.1f} ms   {a.batch / t_ours:9.1f} images/s")
    print(f"  K bare forwards of the wrapped net  {1000 * t_bare:9.1f} ms   {a.batch / t_bare:9.1f} images/s")
    print(f"  one bare forward of K*B pairs       {1000 * t_flat:9.1f} ms")
    print(f"  ratio ours / K bare forwards        {t_ours / t_bare:9.3f}   (goal <= 1.15)")


if __name__ == "__main__":
    main()
