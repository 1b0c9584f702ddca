"""Raw sources: torchvision datasets, idx files, scikit-learn digits — numpy arrays, cached per process.

Every raw loader returns `Raw(images uint8 (N, C, H, W), labels int64 (N,) | None, fingerprint)`; the arrays are
read-only so that the per-process cache cannot be altered by a caller.
"""
from __future__ import annotations

import functools
import gzip
import os
import socket
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from oodbench.data.imageset import content_fingerprint
from oodbench.errors import OODBenchError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 30


class Raw(NamedTuple):
    images: np.ndarray
    labels: Optional[np.ndarray]
    fingerprint: str


def make_raw(images: np.ndarray, labels: Optional[np.ndarray]) -> Raw:
    images = np.array(images, dtype=np.uint8, order="C")          # an owned, writable copy until frozen below
    labels = None if labels is None else np.array(labels, dtype=np.int64)
    fingerprint = content_fingerprint(torch.from_numpy(images), None if labels is None else torch.from_numpy(labels))
    for a in (images, labels):
        if a is not None:
            a.setflags(write=False)
    return Raw(images, labels, fingerprint)


def default_data_root() -> Path:
    """$XDG_CACHE_HOME/oodbench/data, else ~/.cache/oodbench/data: the same from any working directory."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "oodbench" / "data"


def data_root(root=None) -> Path:
    """The data root: `root`, else $OODBENCH_DATA, else `default_data_root()` (absolute)."""
    return Path(root or os.environ.get("OODBENCH_DATA") or default_data_root()).expanduser().resolve()


def download_allowed(download: Optional[bool]) -> bool:
    """`download` if given, else $OODBENCH_DOWNLOAD (anything but 0/false/no allows it)."""
    if download is not None:
        return download
    return os.environ.get("OODBENCH_DOWNLOAD", "1").lower() not in ("0", "false", "no")


def check_split(name: str, split: str, allowed=("train", "test")) -> None:
    if split not in allowed:
        raise OODBenchError(f"dataset {name!r} has no split {split!r}; use one of {', '.join(allowed)}")


# ---------------------------------------------------------------- idx files (MNIST, Fashion-MNIST)

IDX_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally .gz) as a numpy uint8 array of its declared shape."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise OODBenchError(f"{path} is not an unsigned-byte idx file; delete it and fetch the dataset again")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise OODBenchError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} bytes); fetch it again")
    return data.reshape(dims)


def find_idx_pair(folder: Path, split: str) -> Optional[tuple[Path, Path]]:
    prefix = IDX_PREFIX[split]
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        stem = folder / f"{prefix}-{kind}-ubyte"
        path = next((p for p in (stem, stem.with_name(stem.name + ".gz")) if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def idx_folders(name: str, root: Path) -> list[Path]:
    """Where mnist / fashion_mnist idx files are looked for, in order."""
    folders = [root / TORCHVISION[name].folder / "raw"]
    if name == "fashion_mnist":
        folders.append(DEBIAN_FASHION_MNIST)
    return folders


def read_idx_set(images_path: Path, labels_path: Path) -> Raw:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise OODBenchError(f"{images_path} and {labels_path} do not match (shapes {images.shape}, {labels.shape})")
    return make_raw(images[:, None], labels)


# ---------------------------------------------------------------- torchvision sets

class TorchvisionSet(NamedTuple):
    cls: str            # class name in torchvision.datasets
    folder: str         # what the data root holds after a torchvision download
    files: tuple        # files checked (relative to root/folder) to call the set found
    how: str            # how to get it by hand


TORCHVISION = {
    "mnist": TorchvisionSet(
        "MNIST", "MNIST", ("raw/train-images-idx3-ubyte",),
        "downloaded automatically when online; or put the four idx files from "
        "https://ossci-datasets.s3.amazonaws.com/mnist/ (train-images-idx3-ubyte.gz, ...) in {dir}/"),
    "fashion_mnist": TorchvisionSet(
        "FashionMNIST", "FashionMNIST", ("raw/train-images-idx3-ubyte",),
        "`sudo apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist), or download "
        "automatically when online, or put the four idx .gz files from "
        "https://github.com/zalandoresearch/fashion-mnist in {dir}/"),
    "cifar10": TorchvisionSet(
        "CIFAR10", "cifar-10-batches-py", ("data_batch_1", "test_batch"),
        "downloaded automatically when online; or extract "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into the data root (gives {dir}/)"),
    "cifar100": TorchvisionSet(
        "CIFAR100", "cifar-100-python", ("train", "test"),
        "downloaded automatically when online; or extract "
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into the data root (gives {dir}/)"),
    "svhn": TorchvisionSet(
        "SVHN", "svhn", ("train_32x32.mat", "test_32x32.mat"),
        "downloaded automatically when online; or put train_32x32.mat and test_32x32.mat from "
        "http://ufldl.stanford.edu/housenumbers/ in {dir}/"),
}


def torchvision_paths(name: str, root: Path) -> list[Path]:
    """The folders searched for a torchvision set."""
    if name in ("mnist", "fashion_mnist"):
        return idx_folders(name, root)
    return [root / TORCHVISION[name].folder]


def torchvision_found(name: str, root: Path) -> Optional[Path]:
    """The folder holding the set, or None (existence only; no checksum, no download)."""
    if name in ("mnist", "fashion_mnist"):
        return next((f for f in idx_folders(name, root) if find_idx_pair(f, "train") or find_idx_pair(f, "test")),
                    None)
    folder = root / TORCHVISION[name].folder
    return folder if any((folder / f).is_file() for f in TORCHVISION[name].files) else None


def how_to_get(name: str, root: Path) -> str:
    return TORCHVISION[name].how.format(dir=torchvision_paths(name, root)[0])


def load_torchvision(name: str, split: str, root: Path, download: bool) -> Raw:
    """A torchvision dataset split as a Raw; tries the files on disk first, then a download if allowed."""
    check_split(name, split, ("train", "test", "extra") if name == "svhn" else ("train", "test"))
    if name in ("mnist", "fashion_mnist"):
        for folder in idx_folders(name, root):
            pair = find_idx_pair(folder, split)
            if pair:
                return read_idx_set(*pair)
    else:
        try:
            return _construct(name, split, root, download=False)
        except RuntimeError:
            pass
    searched = ", ".join(str(p) for p in torchvision_paths(name, root))
    fix = how_to_get(name, root)
    if not download:
        raise OODBenchError(f"dataset {name!r} ({split}) not found; searched {searched}; downloads are off. "
                            f"To get it: {fix}")
    target = torchvision_paths(name, root)[0]
    created = [p for p in (root, target.parent, target) if not p.exists()]
    try:
        return _construct(name, split, root, download=True)
    except (OSError, RuntimeError, ValueError, TypeError) as e:   # URLError is an OSError
        for folder in reversed(created):                            # leave no empty folders behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OODBenchError(f"dataset {name!r} ({split}) not found (searched {searched}) and the download failed "
                            f"({reason}). To get it: {fix}") from e


def _construct(name: str, split: str, root: Path, download: bool) -> Raw:
    import torchvision.datasets as tvd

    spec = TORCHVISION[name]
    cls = getattr(tvd, spec.cls)
    old_timeout = socket.getdefaulttimeout()
    if download:
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)   # torchvision's urlopen has no timeout of its own
    try:
        if name == "svhn":
            ds = cls(str(root / spec.folder), split=split, download=download)
        else:
            ds = cls(str(root), train=(split == "train"), download=download)
    finally:
        socket.setdefaulttimeout(old_timeout)
    if name == "svhn":
        return make_raw(np.asarray(ds.data), np.asarray(ds.labels))                         # NCHW already
    if name in ("cifar10", "cifar100"):
        return make_raw(np.asarray(ds.data).transpose(0, 3, 1, 2), np.asarray(ds.targets))  # NHWC -> NCHW
    return make_raw(ds.data.numpy()[:, None], ds.targets.numpy())


@functools.lru_cache(maxsize=None)
def cached_torchvision(name: str, split: str, root: Path, download: bool) -> Raw:
    """`load_torchvision`, computed once per arguments and process (failures are not cached)."""
    return load_torchvision(name, split, root, download)


# ---------------------------------------------------------------- scikit-learn digits

DIGITS_TRAIN = 899   # train = the first 899 images, test = the remaining 898 (scikit-learn's own 50/50 example)


@functools.lru_cache(maxsize=None)
def load_digits(split: str) -> Raw:
    """scikit-learn's 8x8 handwritten digits (values 0..16) scaled to uint8 0..255, one channel."""
    check_split("digits", split)
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    part = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return make_raw(images[part], bunch.target[part])


def digits_path() -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
