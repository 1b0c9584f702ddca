"""Image folders (named OOD sets and `folder:PATH`) and `npz:PATH` files, decoded once per load with PIL."""
from __future__ import annotations

import functools
import os
import stat
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

from oodbench.data.convert import check_method, from_pil
from oodbench.data.sources import Raw, make_raw
from oodbench.errors import OODBenchError, check_allocation

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


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
    found, seen_dirs, seen_files = [], set(), set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:   # a symlink loop or a second link to a folder: listed once
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith(".") or not f.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(dirpath) / f
            try:
                st = os.stat(path)
            except OSError:
                continue                          # a dangling link
            # regular files only (a FIFO named x.png would block the decoder), each file once
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen_files:
                continue
            if path.relative_to(folder).as_posix() not in excluded:
                seen_files.add((st.st_dev, st.st_ino))
                found.append(path)
    return sorted(found)


def read_folder(folder, size=None, channels=None, resample="bilinear", exclude=(), crop_resize=None,
                classes=None) -> Raw:
    """Every image under `folder` as uint8 (N, C, H, W).

    size (H, W): all images are resized to it (PIL, `resample`); default: the first image's size, and images of
    other sizes are resized to it. channels (1 or 3): default 1 when every image is grayscale, else 3.
    Labels: when every image sits in a first-level sub-folder, the index of that sub-folder in sorted order (in
    `classes` when given: the class names shared by a split folder's train/ and test/, see `split_folder`).
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
    return _decode(folder, listing, size, channels, resample, crop_resize, None if classes is None else tuple(classes))


@functools.lru_cache(maxsize=8)
def _decode(folder: Path, listing: tuple, size, channels, resample, crop_resize=None, classes=None) -> Raw:
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
    return make_raw(images, folder_labels(folder, paths, classes))


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
                im = to_8bit(im).convert("L" if channels == 1 else "RGB")
        if im.width < 1 or im.height < 1:
            raise ValueError("an image of zero width or height")
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


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit grayscale images scaled to 0..255 (PIL's own conversion clips them at 255)."""
    if im.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().astype(np.uint8))
    return im


def corrupt_error(folder, corrupt: list) -> OODBenchError:
    shown = ", ".join(str(p) for p in corrupt[:3]) + (f" and {len(corrupt) - 3} more" if len(corrupt) > 3 else "")
    return OODBenchError(f"{len(corrupt)} corrupt or unreadable image file(s) under {folder}: {shown}; "
                         f"delete or replace them")


def folder_labels(folder: Path, paths: list[Path], classes=None) -> Optional[np.ndarray]:
    """The index of each image's first-level sub-folder among `classes` (default: those the images sit in, sorted),
    or None when some image sits directly in `folder`."""
    parts = [p.relative_to(folder).parts for p in paths]
    if any(len(p) < 2 for p in parts):
        return None
    classes = sorted(set(classes or ()) | {p[0] for p in parts})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[p[0]] for p in parts], dtype=np.int64)


# ---------------------------------------------------------------- explicit train/test splits of user data

SPLITS = ("train", "test")


def has_split_folder(folder) -> bool:
    """Whether `folder` holds both a train/ and a test/ sub-folder (the split layout of `folder:PATH`)."""
    folder = Path(folder).expanduser()
    return all((folder / s).is_dir() for s in SPLITS)


def split_folder(folder, split: str) -> tuple[Path, Optional[tuple]]:
    """(the folder to read for `split`, class names or None) of `folder:PATH`.

    A folder with train/ and test/ sub-folders is read as a split: `split` picks the sub-folder (any other existing
    sub-folder, e.g. val/, may be named too), and the classes are the sub-folders of train/, test/ and that one
    together, so a class has the same label in every split. Any other folder is read whole, whatever `split`."""
    folder = Path(folder).expanduser().resolve()
    if not has_split_folder(folder):
        return folder, None
    if not split or split.startswith(".") or "/" in split or not (folder / split).is_dir():
        raise OODBenchError(f"folder {folder} is split into train/ and test/ sub-folders but has no {split!r} "
                            f"sub-folder; load it with split='train' or split='test'")
    classes = set()
    for name in dict.fromkeys(SPLITS + (split,)):
        classes.update(d.name for d in (folder / name).iterdir() if d.is_dir() and not d.name.startswith("."))
    return folder / split, tuple(sorted(classes))


# ---------------------------------------------------------------- npz files

NPZ_HOW = ("save it with numpy.savez(path, images=uint8_array, labels=int_array), or with a split: "
           "numpy.savez(path, train=..., test=..., train_labels=..., test_labels=...)")


def _open_npz(path):
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise OODBenchError(f"npz file {path} does not exist")
    try:
        return path, np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise OODBenchError(f"{path} is not a readable .npz file ({e}); {NPZ_HOW}") from None


def _npz_layout(path: Path, keys) -> bool:
    """True for a train/test file, False for an `images` file; an error for anything else (found without reading
    any array)."""
    keys = list(keys)
    found = ", ".join(keys) or "nothing"
    halves = [k for k in SPLITS if k in keys]
    if "images" in keys and halves:
        raise OODBenchError(f"{path} has both 'images' and {' and '.join(repr(k) for k in halves)} arrays "
                            f"(found: {found}); keep either images (+labels) or train and test "
                            f"(+train_labels, test_labels)")
    if "images" in keys:
        return False
    if len(halves) == 1:
        missing = "test" if halves[0] == "train" else "train"
        raise OODBenchError(f"{path} has a {halves[0]!r} array but no {missing!r} array (found: {found}); a split "
                            f"file needs both train and test image arrays, or save the images as 'images'")
    if not halves:
        raise OODBenchError(f"{path} has no 'images' array nor 'train' and 'test' arrays (found: {found}); "
                            f"{NPZ_HOW}")
    if "labels" in keys:
        raise OODBenchError(f"{path} has train and test arrays and a 'labels' array, which belongs to neither; "
                            f"name the labels train_labels and test_labels")
    return True


def _npz_headers(path: Path) -> dict:
    """{name: (shape, dtype)} of the arrays in an npz file, from their .npy headers only (nothing else is read)."""
    import zipfile

    headers = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0 if version == (2, 0) else None
                    if read is not None:
                        shape, _, dtype = read(f)
                        headers[info.filename[:-4]] = (tuple(shape), dtype)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise OODBenchError(f"{path} is not a readable .npz file ({e}); {NPZ_HOW}") from None
    return headers


def _npz_check(path: Path, keys) -> bool:
    """`_npz_layout`, and every image and label array of the layout checked by its header (dtype, shape)."""
    split_file = _npz_layout(path, keys)
    headers = _npz_headers(path)
    pairs = [(s, f"{s}_labels") for s in SPLITS] if split_file else [("images", "labels")]
    for image_key, label_key in pairs:
        if image_key in headers:
            shape, dtype = headers[image_key]
            n = _check_npz_images(path, image_key, shape, dtype)
            if label_key in headers:
                _check_npz_labels(path, label_key, n, *headers[label_key])
    return split_file


def npz_has_split(path) -> bool:
    """Whether the npz file holds `train` and `test` image arrays (a split) rather than `images`; a file with neither
    layout, half a split or both layouts is an error naming the arrays found, and so is an image or label array of
    the wrong dtype or shape. Reads the file's index and array headers only."""
    path, f = _open_npz(path)
    with f:
        return _npz_check(path, f.files)


def read_npz(path, split: str = "test") -> Raw:
    """`images`: uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}; optional `labels` (N,) integers.

    Or a split: `train` and `test` image arrays of that form, optional `train_labels` and `test_labels`; `split`
    picks one (the other half is checked from its header, not read). A file with `images` gives them for every
    split."""
    path, f = _open_npz(path)
    with f:
        split_file = _npz_check(path, f.files)
        if split_file:
            if split not in SPLITS:
                raise OODBenchError(f"npz file {path} is split into train and test arrays; it has no {split!r} "
                                    f"split (use train or test)")
            image_key, label_key = split, f"{split}_labels"
        else:
            image_key, label_key = "images", "labels"
        try:
            images = f[image_key]
            labels = f[label_key] if label_key in f.files else None
        except (OSError, ValueError) as e:
            raise OODBenchError(f"{path}: cannot read {image_key!r} ({e}); {NPZ_HOW}") from None
    n = _check_npz_images(path, image_key, images.shape, images.dtype)
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if labels is not None:
        _check_npz_labels(path, label_key, n, labels.shape, labels.dtype)
        if labels.size and labels.min() < 0:
            raise OODBenchError(f"{path}: {label_key!r} must be {n} non-negative integers (one per image), got "
                                f"{labels.min()}")
    return make_raw(images, labels)


def _check_npz_images(path: Path, key: str, shape: tuple, dtype) -> int:
    """The number of images of a uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) array, or the error."""
    if dtype != np.uint8:
        raise OODBenchError(f"{path}: {key!r} is {dtype}, must be uint8 0..255; "
                            f"convert with (x * 255).round().astype(numpy.uint8) for floats in [0, 1]")
    if not (len(shape) == 3 or (len(shape) == 4 and (shape[-1] in (1, 3) or shape[1] in (1, 3)))):
        raise OODBenchError(f"{path}: {key!r} has shape {shape}; expected (N, H, W), (N, H, W, C) or "
                            f"(N, C, H, W) with C = 1 or 3")
    if shape[0] == 0:
        raise OODBenchError(f"{path}: {key!r} holds no images")
    if 0 in shape:
        raise OODBenchError(f"{path}: {key!r} has shape {shape}: images of zero height, width or channels")
    check_allocation(float(np.prod(shape, dtype=np.float64)), f"{path}: {key!r} of shape {shape}",
                     "the header is damaged or the file is too large for this machine")
    return shape[0]


def _check_npz_labels(path: Path, key: str, n: int, shape: tuple, dtype) -> None:
    if tuple(shape) != (n,) or not np.issubdtype(dtype, np.integer):
        raise OODBenchError(f"{path}: {key!r} must be {n} non-negative integers (one per image), got {dtype} "
                            f"{tuple(shape)}")
