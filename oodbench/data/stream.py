"""Streamed image sets: folders too large to hold in memory, decoded batch by batch by DataLoader workers.

A `StreamedImageSet` is a list of image files (and labels) plus the conversion every image gets (channels, size,
and optionally the ImageNet recipe: shorter side to R, centre crop). It has the ImageSet interface that scoring and
fitting use (`len`, `shape`, `labels`, `fingerprint`, `batches`, `head`, `subset`, `to`), but no `images` tensor:
`batches(n)` decodes n files at a time in worker processes, so memory holds a few batches whatever the set's size.

Decoders (`decode`, the data.decode option):
- "pil" (the default off CUDA): PIL, per file in the workers, as the in-memory folder path does
  (`folders.decode_file`), so a set streamed or held in memory gives the same pixels, and the ImageNet recipe equals
  torchvision's weights transforms on PIL images.
- "gpu" (the default on CUDA, "auto"): the workers only read the files' bytes; the batch's JPEGs are decoded together
  by `torchvision.io.decode_jpeg(device=...)` (nvJPEG) on the set's device, other formats by `decode_image` (and
  those it lacks, such as BMP or TIFF, by PIL), and resized and cropped there by torchvision's tensor transforms (antialiased bilinear): the weights transforms on
  tensors. Pixels differ from PIL's by rounding, so the decoder is part of the fingerprint. "auto" falls back to PIL,
  with a note, when this torchvision cannot decode JPEGs on the device.
Corrupt files are an error naming them, raised by the batch that holds them (never skipped).

Fingerprint: a sha1 over every file's relative path, size and mtime, the conversion, and the first 64 KiB of up to
64 files spread evenly over the list — cheap on a million files, and it changes when a file is replaced, renamed,
added or removed (and, for the sampled files, when their content changes in place with the same size and mtime).
"""
from __future__ import annotations

import functools
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
DECODES = ("auto", "pil", "gpu")


def decode_choice(decode) -> str:
    """data.decode as "auto", "pil" or "gpu", or an error."""
    choice = "auto" if decode is None else str(decode).lower()
    if choice not in DECODES:
        raise OODBenchError(f"data.decode must be auto (GPU decoding on a CUDA device, else PIL), pil or gpu, "
                            f"got {decode!r}")
    return choice


class _Files(Dataset):
    """Decodes file i → (uint8 (C, H, W) array or None when corrupt, index)."""

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
        return image, i


def _collate_images(items):
    """In the worker: (one (B, C, H, W) uint8 tensor of the decoded images, their indices, corrupt indices), so a
    batch crosses to the main process as one shared-memory block, not one per image."""
    good = [(image, i) for image, i in items if image is not None]
    images = None
    if good:
        images = torch.empty((len(good), *good[0][0].shape), dtype=torch.uint8)   # NCHW-contiguous (np.stack
        for row, (image, _) in zip(images, good):                                  # would keep PIL's HWC order)
            row.numpy()[...] = image
    return images, [i for _, i in good], [i for image, i in items if image is None]


class _Bytes(Dataset):
    """Reads file i → (its bytes as a uint8 array, or None when unreadable, index); decoding is the caller's."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return np.fromfile(self.paths[i], dtype=np.uint8), i
        except OSError:
            return None, i


def _collate_bytes(items):
    """In the worker: (the batch's files as one uint8 buffer, their end offsets, indices); an unreadable file is
    empty."""
    chunks = [np.empty(0, np.uint8) if data is None else data for data, _ in items]
    return torch.from_numpy(np.concatenate(chunks)), np.cumsum([len(c) for c in chunks]), [i for _, i in items]


def _split_bytes(buffer: torch.Tensor, ends) -> list:
    starts = np.concatenate([[0], ends[:-1]])
    return [buffer[a:b] if b > a else None for a, b in zip(starts, ends)]


def _is_jpeg(encoded) -> bool:
    return encoded is not None and len(encoded) > 3 and int(encoded[0]) == 0xFF and int(encoded[1]) == 0xD8


def decode_tensors(encoded: list, channels: int, size, crop_resize, device) -> list:
    """Encoded files → uint8 (C, H, W) images on `device` (None for a corrupt one), converted as the module says.

    JPEGs are decoded as one batch by decode_jpeg on `device`; if the batch fails, file by file, and a file the
    device cannot decode (e.g. CMYK on nvJPEG) by decode_image on the CPU. Other formats go through decode_image."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    device = torch.device(device)
    out = [None] * len(encoded)

    def on_cpu(data):
        try:
            return decode_image(data, mode=mode).to(device)
        except (RuntimeError, ValueError):
            return None

    jpegs = [k for k, data in enumerate(encoded) if _is_jpeg(data)]
    if jpegs:
        try:
            decoded = decode_jpeg([encoded[k] for k in jpegs], mode=mode, device=device)
        except RuntimeError:
            decoded = [None] * len(jpegs)
        for k, image in zip(jpegs, decoded):
            if image is None:
                try:
                    image = decode_jpeg(encoded[k], mode=mode, device=device)
                except RuntimeError:
                    image = on_cpu(encoded[k])
            out[k] = image
    for k, data in enumerate(encoded):
        if out[k] is None and data is not None and k not in jpegs:
            out[k] = on_cpu(data)
    return [None if image is None else _fit(image, size, crop_resize) for image in out]


def _fit(image: torch.Tensor, size, crop_resize) -> torch.Tensor:
    """A decoded (C, H, W) uint8 image at `size`: shorter side to crop_resize then a centre crop, or a plain resize."""
    from torchvision.transforms.v2 import functional as F

    size = [int(size[0]), int(size[1])]
    if crop_resize:
        return F.center_crop(F.resize(image, [int(crop_resize)], antialias=True), size)
    if list(image.shape[-2:]) != size:
        return F.resize(image, size, antialias=True)
    return image


@functools.lru_cache(maxsize=None)
def gpu_decode_problem(device: str) -> str:
    """Why torchvision cannot decode a JPEG on `device` ("" when it can), found by decoding a tiny one there."""
    if torch.device(device).type != "cuda":
        return f"{device} is not a CUDA device"
    try:
        from torchvision.io import decode_jpeg, encode_jpeg

        decode_jpeg([encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))], device=device)
    except Exception as e:                               # any failure here means: decode with PIL instead
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return ""


def decoder_for(decode: str, device) -> str:
    """The decoder a streamed set with data.decode `decode` uses on `device`: "pil" or "torchvision" ("auto" is
    torchvision where the device decodes JPEGs, else PIL); "gpu" where it cannot is an error."""
    if decode in ("pil", "torchvision"):
        return decode
    problem = gpu_decode_problem(str(device))
    if not problem:
        return "torchvision"
    if decode == "gpu":
        raise OODBenchError(f"data.decode=gpu: cannot decode JPEGs on {device} ({problem}); use --device cuda "
                            f"with a torchvision built with nvJPEG, or --set data.decode=pil")
    return "pil"


class StreamedImageSet:
    """Image files decoded in batches; see the module docstring."""

    def __init__(self, paths, labels: Optional[torch.Tensor], name: str, channels: int, size, resample="bilinear",
                 crop_resize: Optional[int] = None, device="cpu", workers: Optional[int] = None, root=None,
                 fingerprint: str = "", decode="pil"):
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
        self.decode = decode if decode == "torchvision" else decode_choice(decode)   # torchvision: on any device

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

    @property
    def decoder(self) -> str:
        """"pil" (workers decode with PIL) or "torchvision" (workers read bytes, torchvision.io decodes on the
        device): `decoder_for(decode, device)`."""
        return decoder_for(self.decode, self.device)

    def conversion(self) -> dict:
        conversion = {"channels": self.channels, "size": list(self.size), "resample": self.resample,
                      "crop_resize": self.crop_resize}
        if self.decoder != "pil":
            conversion["decoder"] = self.decoder
        return conversion

    def to(self, device) -> "StreamedImageSet":
        moved = self._with(self.paths, self.labels, self.name, device=device)
        if self.decode in ("pil", "torchvision") or moved.device == self.device:   # the same decoder
            moved._fingerprint = self._fingerprint
        return moved

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
        """In-order batches (uint8 images on the device, labels or None), decoded by `workers` processes (or read
        by them and decoded on the device: see `decoder`)."""
        on_device = self.decoder == "torchvision"
        files = _Bytes(self.paths) if on_device else \
            _Files(self.paths, self.channels, self.size, self.resample, self.crop_resize)
        loader = DataLoader(files, batch_size=batch_size, shuffle=False, num_workers=self.workers,
                            collate_fn=_collate_bytes if on_device else _collate_images,
                            pin_memory=self.device.type == "cuda" and not on_device,
                            persistent_workers=False, prefetch_factor=2 if self.workers else None)
        for batch in loader:
            if on_device:
                buffer, ends, index = batch
                images = decode_tensors(_split_bytes(buffer, ends), self.channels, self.size, self.crop_resize,
                                        self.device)
                images = [self._pil_fallback(i) if image is None else image for image, i in zip(images, index)]
                corrupt = [i for image, i in zip(images, index) if image is None]
            else:
                images, index, corrupt = batch
            if corrupt:
                raise folders.corrupt_error(self.root, [self.paths[i] for i in corrupt])
            images = torch.stack(images) if on_device else images.to(self.device, non_blocking=True)
            labels = None if self.labels is None else self.labels[index[0]:index[-1] + 1]
            yield images, labels

    def _pil_fallback(self, i: int) -> Optional[torch.Tensor]:
        """File i decoded by PIL (formats torchvision.io lacks: BMP, TIFF, PPM, ...), or None when corrupt."""
        try:
            image, _ = folders.decode_file(self.paths[i], self.channels, self.size, self.resample, self.crop_resize)
        except folders.CorruptImage:
            return None
        return torch.from_numpy(np.ascontiguousarray(image)).to(self.device)

    def materialize(self):
        """The whole set as an in-memory ImageSet (for training, which needs random access)."""
        from oodbench.data.imageset import ImageSet

        images = torch.cat([x for x, _ in self.batches(256)])
        return ImageSet(images, self.labels, self.name)

    def _with(self, paths, labels, name, device=None, fingerprint="") -> "StreamedImageSet":
        return StreamedImageSet(paths, labels, name, self.channels, self.size, self.resample, self.crop_resize,
                                device or self.device, self.workers, self.root, fingerprint, self.decode)


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
