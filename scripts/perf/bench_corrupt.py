"""Benchmark: seconds per corruption type (severity 3) for a batch of images, as `corrupt:TYPE:3:D` pays once per
loaded set (oodbench.data.corrupt, batched 128 images per call on the CPU).

    python scripts/perf/bench_corrupt.py [--n 10000] [--size 28] [--channels 1]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from oodbench.data import corrupt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    args = parser.parse_args()
    images = (torch.rand((args.n, args.channels, args.size, args.size),
                         generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    print(f"{args.n:,} images {args.channels}x{args.size}x{args.size}, severity 3, "
          f"{torch.get_num_threads()} torch threads")
    total = 0.0
    for kind in corrupt.TYPES:
        start = time.perf_counter()
        corrupt.corrupt(images, kind, 3)
        seconds = time.perf_counter() - start
        total += seconds
        print(f"{kind:18s} {seconds:7.2f} s  ({args.n / seconds:,.0f} images/s)")
    print(f"all {len(corrupt.TYPES)} types: {total:.1f} s")


if __name__ == "__main__":
    main()
