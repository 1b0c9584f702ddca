"""OpenOOD v1.5's large-scale sets, read through its benchmark image lists (no images are copied).

OpenOOD's download script (`scripts/download/download.py` in Jingkang50/OpenOOD) puts, under one folder,
`benchmark_imglist/<benchmark>/<split>_<set>.txt` (lines "relative/path.jpg LABEL") and the images under
`images_largescale/` (ImageNet-1K and the OOD sets) or `images_classic/` (Textures). Point the data root at that
folder, or put `benchmark_imglist/`, `images_largescale/` and `images_classic/` inside the data root.

The sets are always streamed (`data/stream.py`): each is tens of thousands of full-size photos.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from oodbench.errors import OODBenchError

HOW = ("OpenOOD v1.5's benchmark image lists and images: run OpenOOD's scripts/download/download.py (or fetch "
       "benchmark_imglist.zip and the image archives it names) into the data root, giving benchmark_imglist/, "
       "images_largescale/ and images_classic/ there")
IMAGENET_HOW = ("ImageNet-1K (ILSVRC2012) from https://image-net.org (registration needed), laid out as OpenOOD's "
                "images_largescale/imagenet_1k/{train,val}/ (its download script's imagenet_1k entry), with "
                "OpenOOD's benchmark image lists (" + HOW + ")")


class ImageList(NamedTuple):
    images: str           # image folder under the data root that the list's paths are relative to
    lists: dict           # split → list file under the data root
    how: str


IMGLIST_SETS = {
    "imagenet": ImageList("images_largescale", {
        "train": "benchmark_imglist/imagenet/train_imagenet.txt",
        "val": "benchmark_imglist/imagenet/val_imagenet.txt",
        "test": "benchmark_imglist/imagenet/test_imagenet.txt"}, IMAGENET_HOW),
    "imagenet200": ImageList("images_largescale", {
        "train": "benchmark_imglist/imagenet200/train_imagenet200.txt",
        "val": "benchmark_imglist/imagenet200/val_imagenet200.txt",
        "test": "benchmark_imglist/imagenet200/test_imagenet200.txt"}, IMAGENET_HOW),
    "ssb_hard": ImageList("images_largescale", {"test": "benchmark_imglist/imagenet/test_ssb_hard.txt"}, HOW),
    "ninco": ImageList("images_largescale", {"test": "benchmark_imglist/imagenet/test_ninco.txt"}, HOW),
    "inaturalist": ImageList("images_largescale", {"test": "benchmark_imglist/imagenet/test_inaturalist.txt"}, HOW),
    # OpenOOD's validation OOD set for ImageNet (its `val` split) serves as this set's training split here, so
    # `tune.val_ood=openimage_o` selects on it and never on the test list.
    "openimage_o": ImageList("images_largescale", {
        "train": "benchmark_imglist/imagenet/val_openimage_o.txt",
        "test": "benchmark_imglist/imagenet/test_openimage_o.txt"}, HOW),
    "imagenet_textures": ImageList("images_classic", {"test": "benchmark_imglist/imagenet/test_textures.txt"},
                                   HOW),
    # covariate-shifted ID sets (csID, full-spectrum OOD): OpenOOD v1.5's DATA_INFO[...]["csid"] lists, labelled
    # with the ID set's classes (openood/evaluation_api/datasets.py)
    "cifar10c": ImageList("images_classic", {"test": "benchmark_imglist/cifar10/test_cifar10c.txt"}, HOW),
    "imagenet_v2": ImageList("images_largescale", {"test": "benchmark_imglist/imagenet/test_imagenet_v2.txt"}, HOW),
    "imagenet_c": ImageList("images_largescale", {"test": "benchmark_imglist/imagenet/test_imagenet_c.txt"}, HOW),
    "imagenet_r": ImageList("images_largescale", {"test": "benchmark_imglist/imagenet/test_imagenet_r.txt"}, HOW),
    "imagenet200_v2": ImageList("images_largescale",
                                {"test": "benchmark_imglist/imagenet200/test_imagenet200_v2.txt"}, HOW),
    "imagenet200_c": ImageList("images_largescale",
                               {"test": "benchmark_imglist/imagenet200/test_imagenet200_c.txt"}, HOW),
    "imagenet200_r": ImageList("images_largescale",
                               {"test": "benchmark_imglist/imagenet200/test_imagenet200_r.txt"}, HOW),
}
CSID_SETS = ("cifar10c", "imagenet_v2", "imagenet_c", "imagenet_r", "imagenet200_v2", "imagenet200_c",
             "imagenet200_r")


def list_path(name: str, split: str, root: Path) -> Path:
    entry = IMGLIST_SETS[name]
    if split not in entry.lists:
        raise OODBenchError(f"dataset {name!r} has no {split!r} split (it has {', '.join(entry.lists)})")
    return root / entry.lists[split]


def found(name: str, root: Path) -> Optional[Path]:
    path = list_path(name, "test", root)
    return path if path.is_file() and (root / IMGLIST_SETS[name].images).is_dir() else None


def read_list(name: str, split: str, root: Path) -> tuple[list[Path], Optional[np.ndarray], Path]:
    """(image paths, labels or None (OOD sets: label −1), image folder) of one split; missing files are an error."""
    entry = IMGLIST_SETS[name]
    path, images = list_path(name, split, root), root / entry.images
    if not path.is_file() or not images.is_dir():
        raise OODBenchError(f"dataset {name!r} not found: needs {path} and {images}/. To get it: {entry.how}")
    paths, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        relative, _, label = line.strip().partition(" ")
        if relative.startswith("/"):
            raise OODBenchError(f"{path}:{n}: image paths must be relative to {images}, got {relative!r}")
        try:
            labels.append(int(label) if label.strip() else -1)
        except ValueError:
            labels.append(-1)   # OpenOOD's dict-valued extras: no class label
        paths.append(images / relative)
    if not paths:
        raise OODBenchError(f"{path} lists no images")
    missing = [p for p in paths[:: max(1, len(paths) // 100)] if not p.is_file()]   # a sample: lists are long
    if missing:
        raise OODBenchError(f"dataset {name!r}: {len(missing)} of the sampled files listed in {path} are missing "
                            f"(e.g. {missing[0]}); extract the images into {images}/. To get them: {entry.how}")
    labels = np.array(labels, dtype=np.int64)
    return paths, (None if (labels < 0).all() else labels), images
