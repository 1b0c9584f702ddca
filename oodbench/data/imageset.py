"""ImageSet: a whole dataset as one uint8 (N, C, H, W) tensor, moved to the device once.

Batches are slices of that tensor; augmentation and normalisation run on the device (see `transforms.py`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from oodbench.errors import OODBenchError


@dataclass(repr=False)
class ImageSet:
    """uint8 images (N, C, H, W), optional int64 labels (N,), a name and a content fingerprint."""

    images: torch.Tensor
    labels: Optional[torch.Tensor] = None
    name: str = "images"
    fingerprint: str = field(default="")

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise OODBenchError(
                f"dataset {self.name!r}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}; convert 8-bit images before building an ImageSet")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise OODBenchError(f"dataset {self.name!r}: {len(self.labels)} labels for {len(self.images)} images")
        if not self.fingerprint:
            self.fingerprint = content_fingerprint(self.images, self.labels)

    def __repr__(self) -> str:
        labels = "no labels" if self.labels is None else "labelled"
        return (f"ImageSet({self.name!r}, {len(self)} images of {self.shape}, {labels}, {self.device}, "
                f"fingerprint {self.fingerprint})")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple:
        """Per-image shape (C, H, W)."""
        return tuple(self.images.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            raise OODBenchError(f"dataset {self.name!r} has no labels; a classifier needs a labelled set")
        return int(self.labels.max().item()) + 1

    def to(self, device) -> "ImageSet":
        labels = None if self.labels is None else self.labels.to(device)
        return ImageSet(self.images.to(device), labels, self.name, self.fingerprint)

    def subset(self, index, name: Optional[str] = None) -> "ImageSet":
        """The images at `index` (a slice, an index tensor or a boolean mask)."""
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.images[index], labels, name or self.name)

    def head(self, n: Optional[int]) -> "ImageSet":
        """The first n images (all when n is None or larger than the set)."""
        if n is None or n >= len(self):
            return self
        return self.subset(slice(0, n), f"{self.name}[:{n}]")

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """In-order batches (uint8 images, labels or None) — for scoring."""
        for i in range(0, len(self), batch_size):
            yield self.images[i:i + batch_size], None if self.labels is None else self.labels[i:i + batch_size]


def content_fingerprint(images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> str:
    """A short hash of the pixels (and labels): changes whenever the data changes."""
    h = hashlib.sha1()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.detach().contiguous().cpu().numpy().tobytes())
    if labels is not None:
        h.update(labels.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
