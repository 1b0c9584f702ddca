"""Image folders (named OOD sets and `folder:PATH`) and `npz:PATH` files, decoded once per load with PIL."""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

from oodbench.data.convert import check_method, from_pil
from oodbench.data.sources import Raw, make_raw
from oodbench.errors import OODBenchError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class FolderSet(NamedTuple):
    folders: tuple        # candidate folders under the data root, first found wins
    how: str              # how to get it
    exclude: tuple = ()   # known-broken files of the official archive, skipped by name


FOLDER_SETS = {
    "lsun": FolderSet(
        ("LSUN",),
        "LSUN (crop), the ODIN release: download LSUN.tar.gz "
        "(https://www.dropbox.com/s/fhtsw1m3qxlwj6h/LSUN.tar.gz) and extract it into the data root (gives LSUN/test/)"),
    "lsun_resize": FolderSet(
        ("LSUN_resize",),
        "LSUN (resize), the ODIN release: download LSUN_resize.tar.gz "
        "(https://www.dropbox.com/s/moqh2wh8696c3yl/LSUN_resize.tar.gz) and extract it into the data root "
        "(gives LSUN_resize/)"),
    "isun": FolderSet(
        ("iSUN",),
        "iSUN, the ODIN release: download iSUN.tar.gz (https://www.dropbox.com/s/ssz7qxfqae0cca5/iSUN.tar.gz) and "
        "extract it into the data root (gives iSUN/)"),
    "textures": FolderSet(
        ("dtd/images", "textures"),
        "Describable Textures (DTD): extract dtd-r1.0.1.tar.gz (https://www.robots.ox.ac.uk/~vgg/data/dtd/) into "
        "the data root (gives dtd/images/<class>/*.jpg)"),
    "places365": FolderSet(
        ("places365",),
        "Places365: put the images you evaluate on under places365/ in the data root, any nested layout - usually "
        "the 10,000-image subset of test_256.tar (http://data.csail.mit.edu/places/places365/test_256.tar) used by "
        "Energy/OpenOOD; the full 328k-image test set also works but is large"),
    "tinyimagenet": FolderSet(
        ("tinyimagenet", "Imagenet_resize", "tiny-imagenet-200/val/images"),
        "Tiny ImageNet: extract the ODIN release Imagenet_resize.tar.gz "
        "(https://www.dropbox.com/s/kp3my3412u5k9rl/Imagenet_resize.tar.gz) or tiny-imagenet-200.zip "
        "(http://cs231n.stanford.edu/tiny-imagenet-200.zip, val images are used) into the data root, or put any "
        "Tiny ImageNet images under tinyimagenet/"),
    "notmnist": FolderSet(
        ("notMNIST_small",),
        "notMNIST_small: extract notMNIST_small.tar.gz (http://yaroslavvb.com/upload/notMNIST/) into the data root "
        "(gives notMNIST_small/A..J/*.png)",
        exclude=("A/RGVtb2NyYXRpY2FCb2xkSXRhbGljLnR0Zg==.png", "F/Q3Jvc3NvdmVyIEJvbGRPYmxpcXVlLnR0Zg==.png")),
}


def folder_set_paths(name: str, root: Path) -> list[Path]:
    return [root / f for f in FOLDER_SETS[name].folders]


def folder_set_found(name: str, root: Path) -> Optional[Path]:
    return next((p for p in folder_set_paths(name, root) if p.is_dir()), None)


def load_folder_set(name: str, root: Path, size=None, channels=None, resample="bilinear", crop_resize=None) -> Raw:
    """A named image-folder OOD set from the data root (all its images; there are no splits)."""
    folder = folder_set_found(name, root)
    if folder is None:
        searched = ", ".join(str(p) for p in folder_set_paths(name, root))
        raise OODBenchError(f"dataset {name!r} not found; searched {searched}. To get it: {FOLDER_SETS[name].how}")
    return read_folder(folder, size, channels, resample, exclude=FOLDER_SETS[name].exclude, crop_resize=crop_resize)


# ---------------------------------------------------------------- folders of images

def list_images(folder: Path, exclude=()) -> list[Path]:
    """Image files (by extension) anywhere under `folder`, sorted; hidden files and `exclude` (relative) skipped."""
    excluded = set(exclude)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith(".") or not f.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(dirpath) / f
            if path.relative_to(folder).as_posix() not in excluded:
                found.append(path)
    return sorted(found)


def read_folder(folder, size=None, channels=None, resample="bilinear", exclude=(), crop_resize=None) -> Raw:
    """Every image under `folder` as uint8 (N, C, H, W).

    size (H, W): all images are resized to it (PIL, `resample`); default: the first image's size, and images of
    other sizes are resized to it. channels (1 or 3): default 1 when every image is grayscale, else 3.
    Labels: when every image sits in a first-level sub-folder, the index of that sub-folder in sorted order.
    Corrupt files are an error that names them.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise OODBenchError(f"folder {folder} does not exist; give an existing directory of images")
    paths = list_images(folder, exclude)
    if not paths:
        raise OODBenchError(f"folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"point it at a directory with image files")
    listing = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    size = None if size is None else (int(size[0]), int(size[1]))
    return _decode(folder, listing, size, channels, resample, crop_resize)


@functools.lru_cache(maxsize=8)
def _decode(folder: Path, listing: tuple, size, channels, resample, crop_resize=None) -> Raw:
    paths = [Path(p) for p, _, _ in listing]
    corrupt, images, all_gray = [], None, True
    for i, path in enumerate(paths):
        try:
            image, gray = decode_file(path, channels, size, resample, crop_resize)
        except CorruptImage:
            corrupt.append(path)
            continue
        all_gray &= gray
        if images is None:
            size = size or image.shape[1:]
            images = np.zeros((len(paths), image.shape[0], *size), dtype=np.uint8)
        if image.shape[1:] != tuple(size):
            image, _ = decode_file(path, channels, size, resample, crop_resize)   # a later image of another size
        images[i] = image
    if corrupt:
        raise corrupt_error(folder, corrupt)
    if channels is None and all_gray:
        images = images[:, :1]
    return make_raw(images, folder_labels(folder, paths))


class CorruptImage(Exception):
    """An image file that PIL cannot decode."""


def decode_file(path, channels=None, size=None, resample="bilinear", crop_resize=None) -> tuple[np.ndarray, bool]:
    """One image file → (uint8 (C, H, W), whether the file was grayscale). Raises CorruptImage.

    channels 1 gives PIL luminance, otherwise RGB. size (H, W): a plain PIL resize with `resample`; with
    `crop_resize` R, the ImageNet recipe instead: shorter side resized to R, then a centre crop of `size` (what
    torchvision's weights transforms do on PIL images).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # e.g. PIL's palette-transparency warnings
            with Image.open(path) as im:
                im.load()
                gray = im.mode in GRAY_MODES
                im = im.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImage(str(path)) from e
    if size is not None:
        size = (int(size[0]), int(size[1]))
        method = check_method(resample)
        if crop_resize:
            short, long = sorted((im.width, im.height))
            new_long = int(int(crop_resize) * long / short)   # torchvision's rounding (truncation)
            im = im.resize((int(crop_resize), new_long) if im.width <= im.height else (new_long, int(crop_resize)),
                           resample=method)
            left, top = int(round((im.width - size[1]) / 2.0)), int(round((im.height - size[0]) / 2.0))
            im = im.crop((left, top, left + size[1], top + size[0]))
        elif (im.height, im.width) != size:
            im = im.resize((size[1], size[0]), resample=method)
    return from_pil(im), gray


def corrupt_error(folder, corrupt: list) -> OODBenchError:
    shown = ", ".join(str(p) for p in corrupt[:3]) + (f" and {len(corrupt) - 3} more" if len(corrupt) > 3 else "")
    return OODBenchError(f"{len(corrupt)} corrupt or unreadable image file(s) under {folder}: {shown}; "
                         f"delete or replace them")


def folder_labels(folder: Path, paths: list[Path]) -> Optional[np.ndarray]:
    parts = [p.relative_to(folder).parts for p in paths]
    if any(len(p) < 2 for p in parts):
        return None
    classes = sorted({p[0] for p in parts})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[p[0]] for p in parts], dtype=np.int64)


# ---------------------------------------------------------------- npz files

def read_npz(path) -> Raw:
    """`images`: uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}; optional `labels` (N,) integers."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise OODBenchError(f"npz file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise OODBenchError(f"{path} is not a readable .npz file ({e}); save it with numpy.savez(path, images=...)")
    if "images" not in arrays:
        raise OODBenchError(f"{path} has no 'images' array (found: {', '.join(arrays) or 'nothing'}); "
                            f"save it with numpy.savez(path, images=uint8_array, labels=int_array)")
    images = arrays["images"]
    if images.dtype != np.uint8:
        raise OODBenchError(f"{path}: 'images' is {images.dtype}, must be uint8 0..255; "
                            f"convert with (x * 255).round().astype(numpy.uint8) for floats in [0, 1]")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif not (images.ndim == 4 and images.shape[1] in (1, 3)):
        raise OODBenchError(f"{path}: 'images' has shape {images.shape}; expected (N, H, W), (N, H, W, C) or "
                            f"(N, C, H, W) with C = 1 or 3")
    if images.shape[0] == 0:
        raise OODBenchError(f"{path}: 'images' holds no images")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise OODBenchError(f"{path}: 'labels' must be {images.shape[0]} non-negative integers (one per image), "
                                f"got {labels.dtype} {labels.shape}")
    return make_raw(images, labels)
