"""Per-image content hashes, and the guard against testing on the images a detector was fitted on.

`image_hashes(set)` is one 64-bit hash per image: blake2b (8-byte digest) of the image's uint8 bytes, seeded with its
(C, H, W) shape, so identical images hash alike in any set of the same shape. Batches are hashed on the CPU; an
in-memory set is read in place, a streamed set (`StreamedImageSet`, `adapters.LoaderSet`) takes one pass over its
batches. Hashes are kept per set fingerprint (a few sets per process), so a second check of the same set is free.

`check_overlap(fit, test)` counts the test images that have an exact copy in the fit set: none is silent, fewer than
`MAX_FRACTION` (1%) of the test set is a warning (once per pair of sets and process), more is an error: scores on
images the detector was fitted on measure memorisation, not out-of-distribution detection.
"""
from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np
import torch

from oodbench.data.imageset import ImageSet
from oodbench.errors import OODBenchError

MAX_FRACTION = 0.01     # this share of the test set (or more) found in the fit set is an error
_CACHE_SIZE = 8
_CACHE: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_WARNED: set = set()


def hash_rows(images) -> np.ndarray:
    """uint64 (N,): the blake2b-64 hash of each image's bytes (uint8 (N, ...) tensor or array), seeded with its
    per-image shape."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().contiguous().numpy()
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8:
        raise OODBenchError(f"image hashes need uint8 images, got {images.dtype}")
    n = images.shape[0]
    out = np.empty(n, dtype=np.uint64)
    if n == 0:
        return out
    rows = images.reshape(n, -1)
    seed = hashlib.blake2b(str(tuple(images.shape[1:])).encode(), digest_size=8)
    digests = bytearray()
    for row in rows:
        h = seed.copy()
        h.update(row)   # hashes the row's buffer, no copy
        digests += h.digest()
    out[:] = np.frombuffer(bytes(digests), dtype="<u8")
    return out


def image_hashes(imageset, batch_size: int = 1000) -> np.ndarray:
    """uint64 (N,): one content hash per image of `imageset` (in-memory or streamed), in the set's order."""
    key = _cache_key(imageset)
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    own = getattr(imageset, "content_hashes", None)     # a LoaderSet keeps its own (from its fingerprint pass)
    if callable(own):
        hashes = own()
    elif isinstance(imageset, ImageSet):
        images = imageset.images
        parts = [hash_rows(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        hashes = np.concatenate(parts) if parts else np.empty(0, np.uint64)
    else:                                               # streamed: never held whole
        parts = [hash_rows(x) for x, _ in imageset.batches(batch_size)]
        hashes = np.concatenate(parts) if parts else np.empty(0, np.uint64)
    if len(hashes) != len(imageset):
        raise OODBenchError(f"dataset {imageset.name!r} gave {len(hashes)} images for a length of {len(imageset)}; "
                            f"its source changed while it was read")
    if key is not None:
        _CACHE[key] = hashes
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return hashes


def _cache_key(imageset) -> Optional[tuple]:
    if getattr(imageset, "content_hashes", None) is not None:
        return None   # a LoaderSet's fingerprint is made from these very hashes, which it keeps itself
    fingerprint = getattr(imageset, "fingerprint", "")
    if not fingerprint:
        return None
    return type(imageset).__name__, fingerprint, len(imageset), tuple(imageset.shape)


def count_overlap(fit, test) -> int:
    """How many images of `test` have an exact copy (same shape and bytes) in `fit`."""
    if len(fit) == 0 or len(test) == 0 or tuple(fit.shape) != tuple(test.shape):
        return 0
    return int(np.isin(image_hashes(test), image_hashes(fit)).sum())


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def check_overlap(fit, test, fit_name: Optional[str] = None, test_name: Optional[str] = None,
                  warn: Callable[[str], None] = _stderr, count: Optional[int] = None) -> int:
    """The number of `test` images also in `fit`: 0 silently; below 1% of the test set with one warning line
    (`warn`, stderr by default; once per (fit, test) fingerprint pair and process); 1% or more an OODBenchError.
    `count`: the number when the caller knows it already (e.g. the same files in two streamed sets)."""
    count = count_overlap(fit, test) if count is None else count
    if count == 0:
        return 0
    fit_name = fit_name or getattr(fit, "name", "fit")
    test_name = test_name or getattr(test, "name", "test")
    n = len(test)
    share = f"{100 * count / n:.3g}%"
    if count >= MAX_FRACTION * n:
        raise OODBenchError(
            f"{count} of {n} in-distribution test images ({share}, {test_name!r}) are also in the fit set "
            f"{fit_name!r}, so the scores would measure memorisation, not OOD detection; give an explicit split: an "
            f"npz file with train/test keys (npz:PATH), a folder with train/ and test/ subfolders (folder:PATH), "
            f"or a separate fit set (--fit-data SPEC on the CLI, fit= in Python)")
    pair = (getattr(fit, "fingerprint", fit_name), getattr(test, "fingerprint", test_name))
    if pair not in _WARNED:
        _WARNED.add(pair)
        warn(f"oodbench: warning: {count} of {n} in-distribution test images ({share}, {test_name!r}) are also in "
             f"the fit set {fit_name!r} (exact copies); their scores favour the detector")
    return count
