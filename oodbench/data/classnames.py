"""Class names of in-distribution sets, for zero-shot heads (docs/clip.md).

    mnist, fashion_mnist   torchvision's `classes` (Fashion-MNIST's "T-shirt/top", "Trouser", ...)
    cifar10                the ten CIFAR-10 names; cifar100: its meta file under the data root (fine labels)
    svhn, digits           "0" ... "9"
    imagenet               the first lemma of each synset in timm's imagenet_synset_to_lemma.txt (ships with timm,
                           offline), in the order of timm's imagenet_synsets.txt (the ImageNet-1K label order)
    folder:PATH            the class sub-folders (sorted), as the labels are given
    classes:0,1,2:S        S's names in that order; vflip:/hflip:/gray:/resize:/mnistlike:/corrupt: keep S's
    a names file           one name per line (`clip.names=FILE`), checked against the set's class count
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

from oodbench.data import folders, sources
from oodbench.errors import OODBenchError

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGITS = tuple(str(i) for i in range(10))
KEEP_NAMES = ("vflip", "hflip", "gray", "resize", "mnistlike", "corrupt")


def class_names(spec: str, root=None) -> list:
    """The class names of dataset `spec`, in label order, or a one-line error saying how to give them."""
    if not isinstance(spec, str) or not spec:
        raise OODBenchError("class names: give the in-distribution dataset (--in) or clip.names=FILE")
    op, _, rest = spec.partition(":")
    if op == "classes":
        arg, _, inner = rest.partition(":")
        names = class_names(inner, root)
        try:
            wanted = [int(c) for c in arg.split(",")]
        except ValueError:
            raise OODBenchError(f"classes:{arg}: class ids must be integers separated by commas") from None
        bad = [c for c in wanted if not 0 <= c < len(names)]
        if bad:
            raise OODBenchError(f"{spec}: class ids {bad} are not among {inner}'s {len(names)} classes")
        return [names[c] for c in wanted]
    if op in KEEP_NAMES:
        if op in ("resize", "corrupt"):
            rest = rest.partition(":")[2]
        if op == "corrupt":
            rest = rest.partition(":")[2]
        return class_names(rest, root)
    if op == "folder":
        folder, classes = folders.split_folder(rest, "train") if folders.has_split_folder(Path(rest).expanduser()) \
            else (Path(rest).expanduser(), None)
        if classes is None:
            folder = Path(folder)
            classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))) \
                if folder.is_dir() else ()
        if not classes:
            raise OODBenchError(f"{spec}: no class sub-folders to name the classes by; give the names with "
                                f"clip.names=FILE (one per line)")
        return [c.replace("_", " ") for c in classes]
    if spec in ("mnist", "fashion_mnist"):
        import torchvision

        cls = getattr(torchvision.datasets, sources.TORCHVISION[spec].cls)
        return [c.split(" - ")[-1] for c in cls.classes]
    if spec == "cifar10":
        return list(CIFAR10)
    if spec in ("svhn", "digits"):
        return list(DIGITS)
    if spec == "cifar100":
        return _cifar100(root)
    if spec == "imagenet":
        return imagenet_names()
    raise OODBenchError(f"no class names known for {spec!r}; give them with clip.names=FILE (one name per line, in "
                        f"label order)")


def _cifar100(root) -> list:
    meta = sources.data_root(root) / sources.TORCHVISION["cifar100"].folder / "meta"
    if not meta.is_file():
        raise OODBenchError(f"cifar100's class names come from its meta file, not found at {meta}; fetch the set "
                            f"first or give clip.names=FILE")
    with open(meta, "rb") as f:
        return [n.replace("_", " ") for n in pickle.load(f, encoding="latin1")["fine_label_names"]]


def imagenet_names() -> list:
    """ImageNet-1K names from timm's synset files (the first lemma of each synset)."""
    try:
        import timm.data
    except ImportError:
        raise OODBenchError("ImageNet's class names come from timm's synset files; install timm "
                            "(pip install 'oodbench[timm]') or give clip.names=FILE") from None
    info = Path(timm.data.__file__).parent / "_info"
    synsets = (info / "imagenet_synsets.txt").read_text().split()
    lemmas = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines()
                  if "\t" in line)
    return [lemmas[s].split(",")[0].strip() for s in synsets]


def read_names(path, count: Optional[int] = None) -> list:
    """Class names from a file, one per line (blank lines skipped); `count`: the number the set needs."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise OODBenchError(f"clip.names: no file {p} (a names file has one class name per line)")
    try:
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise OODBenchError(f"clip.names: {p} is not a UTF-8 text file") from None
    if not names:
        raise OODBenchError(f"clip.names: {p} holds no names")
    if count is not None and len(names) != count:
        raise OODBenchError(f"clip.names: {p} has {len(names)} names but the set has {count} classes")
    return names
