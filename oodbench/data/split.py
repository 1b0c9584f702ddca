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
    """(train, val) of a run, from its resolved config: the training split of `data.fit` (a model's own fit set,
    `--fit-data`) or of `data.in`, first `data.limit` images,
    `data.val_fraction` held out by `seed`. The same call at training and at scoring time gives the same sets."""
    from oodbench.data.registry import load

    d = cfg["data"]
    full = load(d.get("fit") or d["in"], split="train", root=d.get("root"), device=device, stream=d.get("stream"),
                decode_to=d.get("decode_to"), crop_resize=d.get("crop_resize"), decode=d.get("decode"))
    if d.get("sample") == "per_class":   # --fit-limit: a seeded, class-balanced subset
        full = per_class_sample(full, d.get("limit"), cfg["seed"])
    else:
        full = full.head(d.get("limit"))
    return train_val_split(full, d["val_fraction"], cfg["seed"])


def per_class_sample(imageset, n, seed: int):
    """A seeded subset of n images with (as nearly as possible) the same number per class, in the set's order;
    the first n images for an unlabelled set. All images when n is None or not smaller than the set."""
    if n is None or n >= len(imageset):
        return imageset
    if imageset.labels is None:
        return imageset.head(n)
    labels = imageset.labels.cpu()
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(labels), generator=g)
    classes = labels.unique()
    rank = torch.empty(len(labels), dtype=torch.int64)       # an image's position among its class, in shuffled order
    for c in classes:
        members = order[labels[order] == c]
        rank[members] = torch.arange(len(members))
    keep = torch.argsort(rank * len(labels) + torch.argsort(order), stable=True)[:n]   # round robin over classes
    index = keep.sort().values
    return imageset.subset(index.to(imageset.device), f"{imageset.name}[{n} per-class sample]")
