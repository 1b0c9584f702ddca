"""Benchmark: peak memory of fitting the feature-density methods on a large feature bank, relative to the bank.

Each method is fitted in a fresh process on N x D ReLU features (float32, like a ResNet-50's penultimate layer on
ImageNet), with C classes for the class-conditional ones. The peak resident memory the fit adds on top of the bank
(ru_maxrss after minus before) is printed as a multiple of the bank's size. Goal: no N x N and no N x D float64 copy,
i.e. an added peak below 2x the float32 bank (a float64 copy alone is 2x).

    python scripts/perf/bench_fit_memory.py [--n 200000] [--dim 2048] [--classes 10] [--methods gmm,gmm_class]
"""
import argparse
import multiprocessing as mp
import resource
import time

import torch

from oodbench.detectors import REGISTRY, method
from oodbench.models import wrap


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def fit_once(name: str, n: int, dim: int, classes: int, queue) -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.empty(n, dim)
    for start in range(0, n, 10_000):                                      # no N x D temporary before the fit
        features[start:start + 10_000] = torch.randn(min(10_000, n - start), dim, generator=g).relu_()
    labels = torch.randint(0, classes, (n,), generator=g)
    features[torch.arange(n), labels % dim] += 1.0                         # class-dependent means
    det = method(name)
    ref = {"features": features, "labels": labels}
    if name == "nac":   # NAC fits on one layer's neuron states (z·dKL/dz), here the bank, of a one-layer model
        det.use_model(wrap(torch.nn.Sequential(torch.nn.Linear(dim, classes)), mean=[0.0], std=[1.0],
                           layers=["0"]))
        ref = {"nac/0": features.mul_(1e-2), "labels": labels}
    before = peak_mib()
    start = time.perf_counter()
    det.fit_reference(ref)
    queue.put((before, peak_mib(), time.perf_counter() - start))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--methods", default="gmm,gmm_class" + (",nac" if "nac" in REGISTRY else ""))
    args = parser.parse_args()
    bank = args.n * args.dim * 4 / 2 ** 20
    print(f"bank: {args.n} x {args.dim} float32 = {bank:.0f} MiB, {args.classes} classes")
    ctx = mp.get_context("spawn")
    for name in args.methods.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=fit_once, args=(name, args.n, args.dim, args.classes, queue))
        proc.start()
        before, after, took = queue.get()
        proc.join()
        added = after - before
        print(f"{name:<10} fit {took:7.1f} s   peak added {added:7.0f} MiB = {added / bank:.2f}x the bank "
              f"(goal < 2x: no N x D float64 copy)")


if __name__ == "__main__":
    main()
