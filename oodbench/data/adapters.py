"""`as_imageset`: whatever a user hands over (a spec, a set, a tensor or array, a Dataset, a DataLoader) as a set the
toolkit consumes: an `ImageSet`, a `StreamedImageSet`, or a `LoaderSet` (a Dataset or DataLoader read batch by
batch, never held whole). See "Your own data in Python" in docs/data.md.

Images are uint8 0..255, or floats in [0, 1] that become `round(255 x)`; never normalised (the model's wrapper
normalises). Every error is an OODBenchError raised before any heavy work (a Dataset or DataLoader is probed with one
item or batch when it is adopted).
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Subset

from oodbench.data import convert
from oodbench.data.imageset import ImageSet
from oodbench.data.overlap import hash_rows
from oodbench.data.stream import StreamedImageSet
from oodbench.errors import OODBenchError

ACCEPTED = ("a dataset spec string, an ImageSet or StreamedImageSet, a torch tensor or numpy array of images "
            "(optionally as an (images, labels) tuple), a torch.utils.data.Dataset or a torch.utils.data.DataLoader")
LAYOUTS = "(N, C, H, W), (N, H, W, C) or (N, H, W) with C = 1 or 3"
CHUNK = 4096   # images per float -> uint8 conversion step, bounds the float working memory


def as_imageset(data, labels=None, name: Optional[str] = None, split: str = "test", root=None, device="cpu",
                like=None, batch_size: int = 256):
    """`data` as a set with the ImageSet interface (`len`, `name`, `shape`, `labels`, `fingerprint`,
    `batches(n)`, `head(n)`, `subset`, `to(device)`), on `device` and converted to `like` = (C, H, W) if given.

    data: a dataset spec (loaded by `registry.load` with `split` and `root`); an ImageSet / StreamedImageSet
    (returned as is, moved, renamed or converted only when asked); a tensor or numpy array of images, uint8 or
    float in [0, 1], laid out (N, C, H, W), (N, H, W) or (N, H, W, C) (channels-last when the last axis is 1 or 3 and
    axis 1 is not), with `labels` (N integers) or given as an (images, labels) tuple; a torch Dataset or DataLoader
    (a `LoaderSet`, streamed; a Dataset is read `batch_size` items at a time). device None keeps a set where it is.
    """
    like = _check_like(like)
    batch_size = _check_batch_size(batch_size)
    if name is not None and (not isinstance(name, str) or not name):
        raise OODBenchError(f"name must be a non-empty string, got {name!r}")
    if isinstance(data, tuple) and len(data) == 2 and _is_array(data[0]):
        if labels is not None:
            raise OODBenchError("labels given twice: as the second element of the (images, labels) tuple and as "
                                "labels=; give one of them")
        data, labels = data
    if labels is not None and not _is_array(data):
        raise OODBenchError(f"labels= applies to image tensors and arrays only; {_kind(data)} carries its own labels "
                            f"(drop labels=, or pass the images as a tensor)")
    if isinstance(data, str):
        from oodbench.data import registry

        loaded = registry.load(data, split=split, root=root, device=device or "cpu", like=like)
        return _adopt(loaded, name, None, None)
    if isinstance(data, (ImageSet, StreamedImageSet, LoaderSet)):
        return _adopt(data, name, device, like)
    if _is_array(data):
        return _from_array(data, labels, name or "images", device, like)
    if isinstance(data, (DataLoader, Dataset)):
        return LoaderSet(data, name=name, device=device or "cpu", like=like, batch_size=batch_size)
    raise OODBenchError(f"cannot use {_kind(data)} as images; give {ACCEPTED}")


# ---------------------------------------------------------------- checks

def _kind(data) -> str:
    return "a dataset spec string" if isinstance(data, str) else f"a {type(data).__module__}.{type(data).__qualname__}"


def _is_array(x) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray))


def _check_like(like):
    from oodbench.data.registry import _check_like as check

    return check(like)


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise OODBenchError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _as_tensor(x, what: str) -> torch.Tensor:
    """A tensor or numpy array as a tensor (numpy arrays shared when writable), with a pixel dtype check."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise _dtype_error(what, x.dtype)
        x = torch.from_numpy(x if x.flags.writeable else x.copy())
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise _dtype_error(what, x.dtype)
    return x.detach()


def _dtype_error(what: str, dtype) -> OODBenchError:
    return OODBenchError(f"{what}: images must be uint8 0..255 or floats in [0, 1], got {dtype}; convert integer "
                         f"pixel values 0..255 with .astype(numpy.uint8) / .to(torch.uint8)")


def _batch_layout(x: torch.Tensor, what: str) -> torch.Tensor:
    """(N, C, H, W), (N, H, W) or channels-last (N, H, W, C) -> a (N, C, H, W) view."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    elif not (x.dim() == 4 and x.shape[1] in (1, 3)):
        raise OODBenchError(f"{what}: images have shape {tuple(x.shape)}; expected {LAYOUTS}")
    if x.shape[0] == 0:
        raise OODBenchError(f"{what}: holds no images")
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise OODBenchError(f"{what}: images have shape {tuple(x.shape)}, which has no pixels")
    return x


def _image_layout(x: torch.Tensor, what: str) -> torch.Tensor:
    """One image, (C, H, W), (H, W) or channels-last (H, W, C) -> a (C, H, W) view."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 3 and x.shape[0] not in (1, 3) and x.shape[-1] in (1, 3):
        return x.permute(2, 0, 1)
    if x.dim() == 3 and x.shape[0] in (1, 3):
        return x
    raise OODBenchError(f"{what}: an image has shape {tuple(x.shape)}; expected (C, H, W), (H, W, C) or (H, W) with "
                        f"C = 1 or 3")


def _check_range(x: torch.Tensor, what: str) -> None:
    if x.dtype == torch.uint8:
        return
    lo, hi = torch.aminmax(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):   # NaN fails too
        raise OODBenchError(
            f"{what}: images must be uint8 or floats in [0, 1] before normalisation (the model's wrapper "
            f"normalises them), got {x.dtype} values in [{lo:.4g}, {hi:.4g}]; drop Normalize from the transform")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 unchanged; floats in [0, 1] (checked) as round(255 x), chunk by chunk."""
    if x.dtype == torch.uint8:
        return x
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    for i in range(0, x.shape[0], CHUNK):
        out[i:i + CHUNK] = (x[i:i + CHUNK].to(work) * 255).round_().clamp_(0, 255).to(torch.uint8)
    return out


def _labels_tensor(labels, n: int, what: str) -> torch.Tensor:
    """N non-negative integers (tensor, array or list) as int64 on the CPU."""
    if isinstance(labels, torch.Tensor):
        t = labels.detach().cpu()
    elif isinstance(labels, (np.ndarray, list, tuple)):
        a = np.asarray(labels)
        if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise OODBenchError(f"{what}: labels must be integers (class indices), got {a.dtype} {a.shape}")
        t = torch.from_numpy(a.astype(np.int64))
    else:
        raise OODBenchError(f"{what}: labels must be a tensor, array or list of {n} integers, got {_kind(labels)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise OODBenchError(f"{what}: labels must be integers (class indices), got {t.dtype}; convert them with "
                            f".long() / .astype(int)")
    if t.dim() != 1 or len(t) != n:
        raise OODBenchError(f"{what}: labels must be {n} integers, one per image, got shape {tuple(t.shape)}")
    t = t.to(torch.int64)
    if n and int(t.min()) < 0:
        raise OODBenchError(f"{what}: labels must be non-negative class indices, got {int(t.min())}")
    return t


def _log_rule(name: str, rule: str) -> None:
    if rule:
        from oodbench.data.registry import log_once

        log_once(name, rule)


# ---------------------------------------------------------------- sets and arrays

def _adopt(s, name, device, like):
    """A set moved to `device` (None: where it is), converted to `like`, renamed to `name` - each only if asked."""
    if like is not None and tuple(like) != tuple(s.shape):
        if isinstance(s, ImageSet):
            images, rule = convert.convert_like(s.images if device is None else s.images.to(device), like)
            _log_rule(name or s.name, rule)
            labels = None if s.labels is None else s.labels.to(images.device)
            return ImageSet(images, labels, name or s.name)
        if isinstance(s, StreamedImageSet):   # decoded straight to `like`, as registry.load(like=...) does
            return StreamedImageSet(s.paths, s.labels, name or s.name, like[0], like[1:], s.resample, None,
                                    device or s.device, s.workers, s.root, "", s.decode)
        return s._with(name=name, device=device, like=like)
    if device is not None and torch.device(device) != s.device:
        s = s.to(device)
    if name is not None and name != s.name:
        if isinstance(s, ImageSet):
            s = ImageSet(s.images, s.labels, name, s.fingerprint)
        elif isinstance(s, StreamedImageSet):
            s = s._with(s.paths, s.labels, name, fingerprint=s._fingerprint)
        else:
            s = s._with(name=name)
    return s


def _from_array(images, labels, name: str, device, like) -> ImageSet:
    what = f"dataset {name!r}"
    x = _batch_layout(_as_tensor(images, what), what)
    y = None if labels is None else _labels_tensor(labels, x.shape[0], what)
    _check_range(x, what)
    if device is not None:
        x = x.to(device)
    x = _to_uint8(x)
    x = x.clone(memory_format=torch.contiguous_format) if x.data_ptr() == _data_ptr(images) or not x.is_contiguous() \
        else x   # an owned copy: later edits of the caller's array do not change the set
    if like is not None:
        x, rule = convert.convert_like(x, like)
        _log_rule(name, rule)
    return ImageSet(x, None if y is None else y.to(x.device), name)


def _data_ptr(a) -> int:
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.__array_interface__["data"][0]


# ---------------------------------------------------------------- Datasets and DataLoaders

class _Scan:
    """What one pass over a LoaderSet found (shared by its copies on other devices): per-image hashes, labels, count,
    fingerprint."""

    def __init__(self):
        self.hashes: Optional[np.ndarray] = None
        self.labels: Optional[torch.Tensor] = None
        self.count: Optional[int] = None
        self.fingerprint = ""


class LoaderSet:
    """A torch Dataset or DataLoader as a streamed set: read batch by batch, never held whole.

    - `len`: `len(dataset)` (the loader's dataset), else (an IterableDataset without a length) counted by one pass.
    - `shape`: `like` if given, else the first item's (C, H, W), read when the set is made (one item of a Dataset,
      one batch of a DataLoader, which also checks the types, layout and value range before any long work).
    - `labels`: None when the items carry none (known from the first item). When they do, the whole (N,) int64
      tensor: read from a full pass - the first complete `batches()` pass keeps them, otherwise reading `.labels`
      runs one pass (images decoded and dropped, labels kept). `labelled` says which without any pass.
    - `fingerprint`: a sha1 of the shape, the per-image content hashes (`overlap.hash_rows`) and the labels, made by
      one pass over the set the first time it (or `content_hashes()`) is asked for, and kept.
    - `batches(n)`: uint8 (n, C, H, W) on the device, labels or None. A Dataset is read by a DataLoader of n items
      per batch (no shuffling, no workers, a collate that turns each item into a uint8 (C, H, W) tensor: floats in
      [0, 1] as round(255 x), numpy (H, W, C) / (H, W) arrays and PIL images too); a DataLoader's own batches are
      re-cut to n images.
    A DataLoader must give the same order on every pass: one that shuffles is refused.
    """

    def __init__(self, source, name: Optional[str] = None, device="cpu", like=None, batch_size: int = 256,
                 limit: Optional[int] = None, probed=None, scan=None):
        if not isinstance(source, (DataLoader, Dataset)):
            raise OODBenchError(f"LoaderSet needs a torch.utils.data.Dataset or DataLoader, got {_kind(source)}")
        self.source = source
        self.dataset = source.dataset if isinstance(source, DataLoader) else source
        self.name = name or type(self.dataset).__name__
        self.like = _check_like(like)
        self.batch_size = _check_batch_size(batch_size)
        self.limit = None if limit is None else int(limit)
        self._device = torch.device(device)
        self._check_source()
        self._shape, self.labelled = probed or self._probe()
        self._state = scan or _Scan()
        self._labels_on_device = None

    # -- adopting the source ---------------------------------------------------------------------------------------
    def _what(self) -> str:
        return f"dataset {self.name!r}"

    def _check_source(self) -> None:
        if isinstance(self.source, DataLoader):
            loader = self.source
            if isinstance(loader.sampler, RandomSampler):
                raise OODBenchError(f"{self._what()}: the DataLoader shuffles, so every pass would give another order "
                                    f"and scores would not line up with labels; make it with shuffle=False")
            n = self._source_len()
            if loader.drop_last and loader.batch_size and n is not None and n % loader.batch_size:
                raise OODBenchError(f"{self._what()}: the DataLoader drops its last {n % loader.batch_size} images "
                                    f"(drop_last=True); make it with drop_last=False")
        elif not isinstance(self.dataset, IterableDataset) and self._source_len() is None:
            raise OODBenchError(f"{self._what()}: a map-style Dataset needs __len__; give the class a __len__ or "
                                f"make it an IterableDataset")

    def _source_len(self) -> Optional[int]:
        try:
            return len(self.dataset)
        except TypeError:
            return None

    def _probe(self) -> tuple[tuple, bool]:
        """((C, H, W), whether items carry labels) from the first item (Dataset) or batch (DataLoader)."""
        what = self._what()
        if isinstance(self.source, DataLoader):
            try:
                first = next(iter(self.source))
            except StopIteration:
                raise OODBenchError(f"{what}: the DataLoader gives no batches; give it a non-empty dataset") from None
            images, labels = self._loader_batch(first)
            return tuple(images.shape[1:]), labels is not None
        if not isinstance(self.dataset, IterableDataset):
            if self._source_len() == 0:
                raise OODBenchError(f"{what}: the Dataset is empty (len 0); give it some images")
            item = self.dataset[0]
        else:
            try:
                item = next(iter(self.dataset))
            except StopIteration:
                raise OODBenchError(f"{what}: the IterableDataset gives no items; give it some images") from None
        image, label = _item(item, what)
        return tuple(image.shape), label is not None

    # -- the ImageSet interface ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        n = self._source_len()
        if n is None:
            n = self._scan().count
        return n if self.limit is None else min(n, self.limit)

    def __repr__(self) -> str:
        source = type(self.dataset).__name__
        if isinstance(self.source, DataLoader):
            source = f"DataLoader of {source}"
        return (f"LoaderSet({self.name!r}, {source}, images of {self.shape}, "
                f"{'labelled' if self.labelled else 'no labels'}, {self.device})")

    @property
    def shape(self) -> tuple:
        return tuple(self.like) if self.like is not None else self._shape

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def labels(self) -> Optional[torch.Tensor]:
        if not self.labelled:
            return None
        if self._labels_on_device is None:
            labels = self._state.labels
            if labels is None:
                labels = self._scan().labels
            self._labels_on_device = labels.to(self.device)
        return self._labels_on_device

    def all_labels(self) -> Optional[torch.Tensor]:
        """The same as `labels` (a pass when none has run yet)."""
        return self.labels

    @property
    def num_classes(self) -> int:
        if not self.labelled:
            raise OODBenchError(f"dataset {self.name!r} has no labels; a classifier needs a labelled set")
        return int(self.labels.max().item()) + 1

    @property
    def images(self):
        raise OODBenchError(f"dataset {self.name!r} is read batch by batch from a "
                            f"{type(self.source).__name__}: it is never held in memory as one tensor; call "
                            f".materialize() for an in-memory ImageSet, or pass the images as a tensor")

    @property
    def fingerprint(self) -> str:
        state = self._scan()
        if not state.fingerprint:
            h = hashlib.sha1(f"loader {self.shape}".encode())
            h.update(state.hashes.tobytes())
            if state.labels is not None:
                h.update(state.labels.numpy().tobytes())
            state.fingerprint = h.hexdigest()[:16]
        return state.fingerprint

    def content_hashes(self) -> np.ndarray:
        """uint64 (N,): `overlap.hash_rows` of every image, by one pass the first time (kept)."""
        return self._scan().hashes

    def to(self, device) -> "LoaderSet":
        return self._with(device=device)

    def head(self, n: Optional[int]) -> "LoaderSet":
        """The first n images (all when n is None or not smaller than the set); reads no further than them."""
        if n is None:
            return self
        n = int(n)
        if n < 0:
            raise OODBenchError(f"head: n must be non-negative, got {n}")
        known = self._source_len()
        if (known is not None and n >= len(self)) or (self.limit is not None and n >= self.limit):
            return self
        scan, parent = _Scan(), self._state
        if parent.hashes is not None:   # the parent's pass covers the head
            scan.hashes, scan.count = parent.hashes[:n], min(n, len(parent.hashes))
            scan.labels = None if parent.labels is None else parent.labels[:n]
        return LoaderSet(self.source, f"{self.name}[:{n}]", self.device, self.like, self.batch_size, n,
                         probed=(self._shape, self.labelled), scan=scan)

    def subset(self, index, name: Optional[str] = None) -> "LoaderSet":
        """The images at `index` (a slice, an index tensor or a boolean mask): a Subset of a map-style dataset."""
        if isinstance(self.dataset, IterableDataset):
            raise OODBenchError(f"dataset {self.name!r} is an IterableDataset: a subset of it cannot be read; use "
                                f"head(n), or a map-style Dataset")
        index = index.cpu().numpy() if isinstance(index, torch.Tensor) else index
        picked = np.arange(len(self))[index].tolist()
        if isinstance(self.source, DataLoader):
            loader = self.source
            if loader.batch_size is None:
                raise OODBenchError(f"dataset {self.name!r}: its DataLoader has a custom batch sampler, so a subset "
                                    f"of it cannot be read; pass the Dataset instead")
            source = DataLoader(Subset(self.dataset, picked), batch_size=loader.batch_size, shuffle=False,
                                num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                pin_memory=loader.pin_memory)
        else:
            source = Subset(self.dataset, picked)
        return LoaderSet(source, name or self.name, self.device, self.like, self.batch_size,
                         probed=(self._shape, self.labelled))

    def materialize(self) -> ImageSet:
        """The whole set as an in-memory ImageSet (explicitly asked for: e.g. for training)."""
        parts = list(self.batches(self.batch_size))
        images = torch.cat([x for x, _ in parts])
        labels = None if not self.labelled else torch.cat([y for _, y in parts])
        return ImageSet(images, labels, self.name)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """In-order batches (uint8 (batch_size, C, H, W) on the device, int64 labels or None); the last may be
        smaller. Reads only as many items as the batches given so far need (plus the source's own batching)."""
        batch_size = _check_batch_size(batch_size)
        collect = self.labelled and self._state.labels is None
        seen, count = [], 0
        for x, y in self._batches(batch_size, self.device):
            count += len(x)
            if collect:
                seen.append(y)
            yield x, None if y is None else y.to(self.device)
        if collect and self._state.labels is None:
            self._state.labels = torch.cat(seen) if seen else torch.empty(0, dtype=torch.int64)
            self._state.count = count

    # -- reading ---------------------------------------------------------------------------------------------------
    def _with(self, name=None, device=None, like=None) -> "LoaderSet":
        same = like is None or tuple(like) == tuple(self.shape)
        return LoaderSet(self.source, name or self.name, device or self.device, self.like if same else like,
                         self.batch_size, self.limit, probed=(self._shape, self.labelled),
                         scan=self._state if same else None)

    def _scan(self) -> _Scan:
        """One pass for the hashes, labels and count (once)."""
        state = self._state
        if state.hashes is None:
            device = self.device if self.like is not None else torch.device("cpu")   # conversion as batches() does
            hashes, labels, count = [], [], 0
            for x, y in self._batches(self.batch_size, device):
                hashes.append(hash_rows(x))
                labels.append(y)
                count += len(x)
            expected = self._source_len()
            expected = expected if self.limit is None or expected is None else min(expected, self.limit)
            if expected is not None and count != expected:
                raise OODBenchError(f"dataset {self.name!r} gave {count} images but its length is {expected}; make "
                                    f"the Dataset's __len__ match the items it gives")
            state.hashes = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
            if self.labelled:
                state.labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)
            state.count = count
        return state

    def _source_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(uint8 (B, C, H, W), int64 labels or None) on the CPU, as the source gives them."""
        if isinstance(self.source, DataLoader):
            for batch in self.source:
                yield self._loader_batch(batch)
        else:
            what, dataset = self._what(), self.dataset
            if self.limit is not None and not isinstance(dataset, IterableDataset):
                dataset = Subset(dataset, range(min(self.limit, len(dataset))))   # never reads past the head
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                                collate_fn=lambda items: _collate(items, what))
            yield from loader

    def _batches(self, batch_size: int, device) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Batches of exactly batch_size images (the last one smaller), first `limit` only, converted to `like` on
        `device`; labels stay on the CPU."""
        remaining = self.limit
        pending, pending_labels, held = [], [], 0

        def cut(k):
            nonlocal pending, pending_labels, held
            x = pending[0] if len(pending) == 1 else torch.cat(pending)
            y = None if not self.labelled else pending_labels[0] if len(pending_labels) == 1 else \
                torch.cat(pending_labels)
            out = (x[:k], None if y is None else y[:k])
            pending = [x[k:]] if len(x) > k else []
            pending_labels = [y[k:]] if y is not None and len(y) > k else []
            held = len(x) - k
            return out

        if remaining == 0:
            return
        for x, y in self._source_batches(batch_size):
            if (y is not None) != self.labelled:
                raise OODBenchError(f"dataset {self.name!r}: some items carry labels and others do not; give every "
                                    f"item a label, or none")
            if tuple(x.shape[1:]) != tuple(self._shape):
                raise OODBenchError(f"dataset {self.name!r}: images of shape {tuple(x.shape[1:])} after "
                                    f"{tuple(self._shape)}; every image must have the same shape (resize them in "
                                    f"the Dataset's transform)")
            if remaining is not None:
                x, y = x[:remaining], None if y is None else y[:remaining]
                remaining -= len(x)
            pending.append(x)
            if y is not None:
                pending_labels.append(y)
            held += len(x)
            while held >= batch_size:
                xb, yb = cut(batch_size)
                yield self._convert(xb, device), yb
            if remaining == 0:
                break
        if held:
            xb, yb = cut(held)
            yield self._convert(xb, device), yb

    def _convert(self, x: torch.Tensor, device) -> torch.Tensor:
        x = x.to(device)
        if self.like is not None:
            x, rule = convert.convert_like(x, self.like)
            _log_rule(self.name, rule)
        return x

    def _loader_batch(self, batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A DataLoader batch (a tensor or (tensor, labels, ...)) as (uint8 (B, C, H, W) CPU, int64 labels or
        None)."""
        what = self._what()
        if self.source.batch_sampler is None:   # a DataLoader without batching (batch_size=None): one item each
            image, label = _item(batch, what)
            return image.unsqueeze(0), None if label is None else torch.tensor([label], dtype=torch.int64)
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise OODBenchError(f"{what}: the DataLoader gave an empty batch; batches must be images or "
                                    f"(images, labels, ...)")
            images, labels = batch[0], batch[1] if len(batch) > 1 else None
        else:
            images, labels = batch, None
        if not _is_array(images):
            raise OODBenchError(f"{what}: a DataLoader batch must be an image tensor or (images, labels, ...), got "
                                f"{_kind(images)} first; give it a collate that stacks the images")
        x = _batch_layout(_as_tensor(images, what), what)
        y = None if labels is None else _labels_tensor(labels, x.shape[0], f"{what} (second element of a batch)")
        _check_range(x, what)
        return _to_uint8(x.cpu()).contiguous(), y


def _item(item, what: str) -> tuple[torch.Tensor, Optional[int]]:
    """One Dataset item (image, or (image, label, ...)) as (uint8 (C, H, W) CPU tensor, int label or None)."""
    label = None
    if isinstance(item, (tuple, list)):
        if not item:
            raise OODBenchError(f"{what}: an item is empty; items must be an image or (image, label, ...)")
        image = item[0]
        if len(item) > 1 and item[1] is not None:
            label = item[1]
            if isinstance(label, (torch.Tensor, np.ndarray)) and label.ndim == 0:
                label = label.item()
            if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
                raise OODBenchError(f"{what}: the second element of an item must be an integer class label, got "
                                    f"{_kind(label)}; give items as (image, int label) or the image only")
            label = int(label)
            if label < 0:
                raise OODBenchError(f"{what}: labels must be non-negative class indices, got {label}")
    else:
        image = item
    image = _pil_to_tensor(image) if _is_pil(image) else image
    if not _is_array(image):
        raise OODBenchError(f"{what}: an item's image must be a tensor, a numpy array or a PIL image, got "
                            f"{_kind(image)}")
    x = _image_layout(_as_tensor(image, what), what)
    _check_range(x, what)
    return _to_uint8(x.cpu().unsqueeze(0))[0], label


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:   # pragma: no cover - PIL is a dependency
        return False
    return isinstance(x, Image.Image)


def _pil_to_tensor(image) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    from oodbench.data.folders import GRAY_MODES

    if image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode in GRAY_MODES else "RGB")
    return pil_to_tensor(image)


def _collate(items, what: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dataset items -> (uint8 (B, C, H, W), int64 labels or None): each item converted as `_item` says, stacked."""
    converted = [_item(item, what) for item in items]
    shapes = {tuple(x.shape) for x, _ in converted}
    if len(shapes) > 1:
        raise OODBenchError(f"{what}: items of different shapes in one batch ({', '.join(map(str, sorted(shapes)))}); "
                            f"every image must have the same shape (resize them in the Dataset's transform)")
    labels = [y for _, y in converted]
    if any(y is None for y in labels) and any(y is not None for y in labels):
        raise OODBenchError(f"{what}: some items carry labels and others do not; give every item a label, or none")
    images = torch.stack([x for x, _ in converted])
    return images, None if labels[0] is None else torch.tensor(labels, dtype=torch.int64)
