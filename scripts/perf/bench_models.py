"""Benchmark: scoring through a `torchvision:` ClassifierModel vs the bare network's forward on the same batches.

The bare side is what a user would run by hand: the network on already-normalised float inputs. The model side
takes the uint8 batches and does everything `oodbench eval` does per batch: channel conversion, [0, 1], mean/std,
the forward with the features/head hook, and a score (energy from the logits, and the features for feature-space
methods). Goal: <= 1.10x (preprocessing and the split add almost nothing).

    python scripts/perf/bench_models.py [--model torchvision:resnet18:none] [--size 64] [--batches 10]
"""

import argparse
import time

import torch

import oodbench


def best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet18:none")
    parser.add_argument("--size", type=int, default=64, help="image side (uint8, 1 channel: converted to 3)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model = oodbench.load_model(args.model, device=args.device)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch, 1, args.size, args.size), generator=gen, dtype=torch.uint8)
               .to(args.device) for _ in range(args.batches)]
    prepared = [model.prepare(x) for x in batches]          # the bare side gets its inputs ready-made

    def bare():
        with torch.no_grad():
            for inp in prepared:
                torch.logsumexp(model.net(inp), 1)

    def ours():
        for x in batches:
            features, logits = model.features_and_logits(x)
            torch.logsumexp(logits, 1)
            features.norm(dim=1)

    bare(), ours()                                          # warm-up
    bare_s, ours_s = best_time(bare, args.repeats), best_time(ours, args.repeats)
    n = args.batch * args.batches
    print(f"{args.model} on {args.device}, {n} images of 1x{args.size}x{args.size} (uint8) in batches of {args.batch}")
    print(f"bare forward on prepared float inputs: {bare_s * 1e3:8.1f} ms")
    print(f"ClassifierModel from uint8 (prepare + forward + features/head split): {ours_s * 1e3:8.1f} ms")
    print(f"ratio ours / bare: {ours_s / bare_s:.3f}x (goal <= 1.10x)")


if __name__ == "__main__":
    main()
