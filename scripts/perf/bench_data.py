"""Data pipeline benchmark: device-resident batches with augmentation vs a torchvision DataLoader.

Ours: Fashion-MNIST train as one uint8 tensor on the device; per batch an index slice, random crop (padding 2),
random horizontal flip, to float and normalise — all batched on the device.
Baseline, as a user would write it: a numpy-backed Dataset returning PIL images, torchvision ToTensor + Normalize,
DataLoader(batch_size, shuffle=True, num_workers=2). Both run one full epoch; images/s and the ratio are printed.

Threads: on CPU our side runs with --threads (default 1), as each DataLoader worker does (PyTorch sets one thread
per worker). A batch is ~100 KB, too small to gain from intra-op threads, and on a shared, oversubscribed CPU the
OpenMP barriers cost milliseconds per op; pass --threads 0 to keep torch's default and see it.

    python scripts/perf/bench_data.py [--batch-size 128] [--device auto] [--threads 1] [--limit N]
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch
from PIL import Image

from oodbench import data
from oodbench.data import transforms

MEAN, STD = (0.2860,), (0.3530,)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def device_epoch(images: torch.Tensor, batch_size: int, seed: int = 0) -> tuple[float, float]:
    """One epoch of augmented, normalised batches from a device tensor; returns (wall, CPU) seconds."""
    g = torch.Generator(device=images.device).manual_seed(seed)
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    sync()
    start, cpu = time.perf_counter(), cpu_seconds()
    order = torch.randperm(len(images), generator=g, device=images.device)
    checksum = 0.0
    for i in range(0, len(images), batch_size):
        x = images.index_select(0, order[i:i + batch_size])
        x = transforms.random_hflip(transforms.random_crop(x, 2, generator=g), generator=g)
        x = transforms.normalize(transforms.to_unit(x), MEAN, STD)
        checksum = x[0, 0, 0, 0]                     # keep a dependency on every batch's result
    float(checksum)
    sync()
    return time.perf_counter() - start, cpu_seconds() - cpu


class NumpyFashionMNIST(torch.utils.data.Dataset):
    """What a user writes: arrays in memory, one PIL image per item, torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


def dataloader_epoch(images: np.ndarray, labels: np.ndarray, batch_size: int, workers: int) -> tuple[float, float]:
    """One epoch through a fresh DataLoader (workers started and joined inside); returns (wall, CPU) seconds."""
    import torchvision.transforms as T

    ds = NumpyFashionMNIST(images, labels, T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)
    start, cpu = time.perf_counter(), cpu_seconds()
    for x, y in loader:
        pass
    del loader                                          # joins the workers, so their CPU time is counted
    return time.perf_counter() - start, cpu_seconds() - cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for our side on CPU (0: torch default)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    train = data.load("fashion_mnist", split="train").head(args.limit)
    n = len(train)
    on_device = train.images.to(device)
    default_threads = torch.get_num_threads()
    if device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device_epoch(on_device[:4096], args.batch_size)                       # warm-up (allocator, kernels)
    t_ours, c_ours = device_epoch(on_device, args.batch_size)
    torch.set_num_threads(default_threads)
    (t_base, c_base) = dataloader_epoch(train.images[:, 0].numpy(), train.labels.numpy(), args.batch_size, args.workers)

    ours, base = n / t_ours, n / t_base
    print(f"images: Fashion-MNIST train, {n} images, batch {args.batch_size}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"device batches (crop+flip+normalise, {device}, {threads} thread(s)): {ours:10,.0f} images/s  "
          f"({t_ours:.2f} s/epoch, {n / c_ours:10,.0f} images per CPU-second)")
    print(f"DataLoader ({args.workers} workers, ToTensor+Normalize):          {base:10,.0f} images/s  "
          f"({t_base:.2f} s/epoch, {n / c_base:10,.0f} images per CPU-second)")
    print(f"ratio: {ours / base:.1f}x images/s (goal >= 20x); {c_base / c_ours:.1f}x per CPU-second")


if __name__ == "__main__":
    main()
