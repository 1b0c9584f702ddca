"""Deterministic train/validation split of an ImageSet."""
from __future__ import annotations

import torch

from oodbench.data.imageset import ImageSet
from oodbench.errors import OODBenchError


def train_val_split(imageset: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, val): val holds round(N * val_fraction) images drawn by a permutation seeded with `seed`.

    Both parts keep the original order of their images. val_fraction 0 gives an empty val set.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise OODBenchError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(imageset)
    n_val = int(round(n * float(val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[perm[:n_val]] = True
    is_val = is_val.to(imageset.device)
    return (imageset.subset(~is_val, f"{imageset.name}[train]"), imageset.subset(is_val, f"{imageset.name}[val]"))


def run_split(cfg: dict, device="cpu") -> tuple[ImageSet, ImageSet]:
    """(train, val) of a run, from its resolved config: `data.in` training split, first `data.limit` images,
    `data.val_fraction` held out by `seed`. The same call at training and at scoring time gives the same sets."""
    from oodbench.data.registry import load

    d = cfg["data"]
    full = load(d["in"], split="train", root=d.get("root"), device=device).head(d.get("limit"))
    return train_val_split(full, d["val_fraction"], cfg["seed"])
