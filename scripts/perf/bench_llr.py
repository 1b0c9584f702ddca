"""LLR / PixelCNN++ benchmark: engine.fit training speed vs a minimal hand-written loop, and likelihood throughput.

1. Training steps/s of `Engine.fit` (the foreground loss of the llr detector, Adam with the per-step exponential lr
   decay, periodic checkpoints as configured) vs a bare loop around the same network: index a batch, -mean log p,
   zero_grad, backward, Adam step, lr update. Runs alternate (bare, engine, bare, engine, ...) so a machine shared
   with other jobs slows both alike; the best repeat of each is compared. Goal: ratio >= 0.9.
2. Log-likelihood evaluation images/s (forward only, no grad) with the batch size of the detector's scoring.

Default network = the quick preset's (16 filters, 1 resnet block); --paper uses the paper's (32 filters, 5 blocks).
The data are random 8-bit images of the chosen shape (speed does not depend on content).

    python scripts/perf/bench_llr.py [--paper] [--shape 1 28 28] [--batch 32] [--steps 100] [--repeats 3]
                                     [--eval-images 1024] [--eval-batch 256] [--device auto]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from oodbench.data.imageset import ImageSet
from oodbench.detectors.llr import likelihood_loss, log_prob
from oodbench.engine import Engine, TrainSpec, resolve_device
from oodbench.nets.pixelcnnpp import PixelCNNpp


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, device):
    torch.manual_seed(0)
    size = dict(num_filters=32, num_resnet=5) if args.paper else dict(num_filters=16, num_resnet=1)
    return PixelCNNpp(args.shape[0], num_hierarchies=1, num_logistic_mix=1, **size).to(device)


def spec_for(args) -> TrainSpec:
    return TrainSpec(steps=args.steps, batch_size=args.batch, optimizer="adam", lr=1e-4, betas=(0.95, 0.9995),
                     schedule="exponential", gamma=0.999995, ckpt_every=max(1, args.steps // 2),
                     log_every=max(1, args.steps // 4), amp="off")


def bare_loop(args, data, device) -> float:
    """Steps/s of the minimal loop; returns after args.steps steps."""
    model, spec = build(args, device).train(), spec_for(args)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, betas=spec.betas)
    g = torch.Generator().manual_seed(0)
    sync(device)
    start = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = spec.lr * spec.gamma ** step
        x = data.images[torch.randint(0, len(data), (args.batch,), generator=g).to(device)]
        loss = -model(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return args.steps / (time.perf_counter() - start)


def engine_loop(args, data, device) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        engine = Engine(run_dir, device=device, seed=0)
        model = build(args, device)
        sync(device)
        start = time.perf_counter()
        engine.fit("fg", model, likelihood_loss(0.0, 0.0), data, spec_for(args))
        sync(device)
        return args.steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="the paper's network (32 filters, 5 resnet blocks)")
    parser.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=1024)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = ImageSet(torch.randint(0, 256, (2048, *args.shape), dtype=torch.uint8)).to(device)
    net = "paper (32 filters, 5 blocks)" if args.paper else "quick (16 filters, 1 block)"
    print(f"device {device}, torch threads {torch.get_num_threads()}, network {net}, "
          f"images {tuple(args.shape)}, batch {args.batch}, {args.steps} steps x {args.repeats} repeats")

    bare_loop(args, data, device)  # warm-up (allocator, kernels)
    bare, eng = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(args, data, device))
        eng.append(engine_loop(args, data, device))
    print(f"training  bare loop : {max(bare):8.2f} steps/s  (repeats: {', '.join(f'{v:.2f}' for v in bare)})")
    print(f"training  engine.fit: {max(eng):8.2f} steps/s  (repeats: {', '.join(f'{v:.2f}' for v in eng)})")
    print(f"training  ratio engine/bare (best of each): {max(eng) / max(bare):.3f}  (goal >= 0.9)")

    model = build(args, device).eval()
    images = data.images[:args.eval_images]
    log_prob(model, images[:args.eval_batch], args.eval_batch)  # warm-up
    best = 0.0
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        log_prob(model, images, args.eval_batch)
        sync(device)
        best = max(best, len(images) / (time.perf_counter() - start))
    print(f"log-likelihood evaluation: {best:9.1f} images/s (batch {args.eval_batch}, best of {args.repeats})")


if __name__ == "__main__":
    main()
