"""Streamed image sets: folders too large to hold in memory, decoded batch by batch by DataLoader workers.

A `StreamedImageSet` is a list of image files (and labels) plus the conversion every image gets (channels, size,
and optionally the ImageNet recipe: shorter side to R, centre crop). It has the ImageSet interface that scoring and
fitting use (`len`, `shape`, `labels`, `fingerprint`, `batches`, `head`, `subset`, `to`), but no `images` tensor:
`batches(n)` decodes n files at a time in worker processes, so memory holds a few batches whatever the set's size.

Decoding is PIL's, per file, as the in-memory folder path does (`folders.decode_file`), so a set streamed or held in
memory gives the same pixels, and the ImageNet recipe equals torchvision's weights transforms on PIL images.
Corrupt files are an error naming them, raised by the batch that holds them (never skipped).

Fingerprint: a sha1 over every file's relative path, size and mtime, the conversion, and the first 64 KiB of up to
64 files spread evenly over the list — cheap on a million files, and it changes when a file is replaced, renamed,
added or removed (and, for the sampled files, when their content changes in place with the same size and mtime).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from oodbench.data import folders
from oodbench.errors import OODBenchError

SAMPLED_FILES, SAMPLED_BYTES = 64, 1 << 16


class _Files(Dataset):
    """Decodes file i → (uint8 (C, H, W) tensor or None when corrupt, index)."""

    def __init__(self, paths, channels, size, resample, crop_resize):
        self.paths, self.channels, self.size = paths, channels, size
        self.resample, self.crop_resize = resample, crop_resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image, _ = folders.decode_file(self.paths[i], self.channels, self.size, self.resample, self.crop_resize)
        except folders.CorruptImage:
            return None, i
        return torch.from_numpy(np.ascontiguousarray(image)), i   # (C, H, W) contiguous and writable


def _collate(items):
    return [image for image, _ in items], [i for _, i in items]


class StreamedImageSet:
    """Image files decoded in batches; see the module docstring."""

    def __init__(self, paths, labels: Optional[torch.Tensor], name: str, channels: int, size, resample="bilinear",
                 crop_resize: Optional[int] = None, device="cpu", workers: Optional[int] = None, root=None,
                 fingerprint: str = ""):
        self.paths = tuple(str(p) for p in paths)
        if not self.paths:
            raise OODBenchError(f"dataset {name!r}: no image files to stream")
        if labels is not None and len(labels) != len(self.paths):
            raise OODBenchError(f"dataset {name!r}: {len(labels)} labels for {len(self.paths)} files")
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64).to(device)
        self.name, self.channels, self.size = name, int(channels), (int(size[0]), int(size[1]))
        self.resample, self.crop_resize = resample, None if crop_resize is None else int(crop_resize)
        self._device = torch.device(device)
        self.workers = default_workers() if workers is None else int(workers)
        self.root = Path(root) if root is not None else Path(os.path.commonpath(self.paths)).parent
        self._fingerprint = fingerprint

    # -- the ImageSet interface ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (f"StreamedImageSet({self.name!r}, {len(self)} files as {self.shape}, "
                f"{'labelled' if self.labels is not None else 'no labels'}, {self.device}, {self.workers} workers)")

    @property
    def shape(self) -> tuple:
        return (self.channels, *self.size)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            raise OODBenchError(f"dataset {self.name!r} has no labels; a classifier needs a labelled set")
        return int(self.labels.max().item()) + 1

    @property
    def images(self):
        raise OODBenchError(f"dataset {self.name!r} is streamed ({len(self)} files): it is never held in memory as "
                            f"one tensor; use --set data.stream=false to load it whole, or a smaller limit")

    @property
    def fingerprint(self) -> str:
        if not self._fingerprint:
            self._fingerprint = files_fingerprint(self.paths, self.root, self.conversion())
        return self._fingerprint

    def conversion(self) -> dict:
        return {"channels": self.channels, "size": list(self.size), "resample": self.resample,
                "crop_resize": self.crop_resize}

    def to(self, device) -> "StreamedImageSet":
        return self._with(self.paths, self.labels, self.name, device=device, fingerprint=self._fingerprint)

    def subset(self, index, name: Optional[str] = None) -> "StreamedImageSet":
        """The files at `index` (a slice, an index tensor or a boolean mask)."""
        picked = np.arange(len(self))[_as_numpy_index(index)]
        labels = None if self.labels is None else self.labels[torch.as_tensor(picked, device=self.labels.device)]
        return self._with([self.paths[i] for i in picked], labels, name or self.name)

    def head(self, n: Optional[int]) -> "StreamedImageSet":
        if n is None or n >= len(self):
            return self
        return self.subset(slice(0, n), f"{self.name}[:{n}]")

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """In-order batches (uint8 images on the device, labels or None), decoded by `workers` processes."""
        files = _Files(self.paths, self.channels, self.size, self.resample, self.crop_resize)
        loader = DataLoader(files, batch_size=batch_size, shuffle=False, num_workers=self.workers,
                            collate_fn=_collate, pin_memory=self.device.type == "cuda",
                            persistent_workers=False, prefetch_factor=2 if self.workers else None)
        for images, index in loader:
            corrupt = [self.paths[i] for image, i in zip(images, index) if image is None]
            if corrupt:
                raise folders.corrupt_error(self.root, corrupt)
            batch = torch.stack(images).to(self.device, non_blocking=True)
            labels = None if self.labels is None else self.labels[index[0]:index[-1] + 1]
            yield batch, labels

    def materialize(self):
        """The whole set as an in-memory ImageSet (for training, which needs random access)."""
        from oodbench.data.imageset import ImageSet

        images = torch.cat([x for x, _ in self.batches(256)])
        return ImageSet(images, self.labels, self.name)

    def _with(self, paths, labels, name, device=None, fingerprint="") -> "StreamedImageSet":
        return StreamedImageSet(paths, labels, name, self.channels, self.size, self.resample, self.crop_resize,
                                device or self.device, self.workers, self.root, fingerprint)


def _as_numpy_index(index):
    if isinstance(index, torch.Tensor):
        return index.cpu().numpy()
    return index


def default_workers() -> int:
    """DataLoader workers for decoding: $OODBENCH_WORKERS, else min(8, CPUs − 1) (0 = decode in this process)."""
    env = os.environ.get("OODBENCH_WORKERS")
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            raise OODBenchError(f"OODBENCH_WORKERS must be a number of worker processes, got {env!r}") from None
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def files_fingerprint(paths, root: Path, conversion: dict) -> str:
    """See the module docstring: paths, sizes, mtimes, the conversion and a sampled content hash."""
    h = hashlib.sha1(repr(sorted(conversion.items())).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    step = max(1, len(paths) // SAMPLED_FILES)
    for p in paths[::step][:SAMPLED_FILES]:
        with open(p, "rb") as f:
            h.update(f.read(SAMPLED_BYTES))
    return h.hexdigest()[:16]


def decoded_bytes(n: int, shape) -> int:
    """Memory an in-memory copy of n images of `shape` (C, H, W) would take."""
    return int(n) * int(np.prod(shape))


def stream_threshold() -> int:
    """Sets larger than this in memory are streamed when data.stream is auto: $OODBENCH_STREAM_ABOVE_MB, else
    2048 MiB."""
    return int(float(os.environ.get("OODBENCH_STREAM_ABOVE_MB", 2048)) * 2 ** 20)
