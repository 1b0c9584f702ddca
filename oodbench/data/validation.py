"""Validation OOD sets: what a method may choose hyper-parameters on (LLR's background model, gradlayer's layer).

Never a test split. A set derived from the in-distribution dataset itself (`gray:<in>`, `vflip:<in>`, `hflip:<in>`,
chains of them) is built from the in-distribution **validation** split, as the original LLR code builds grayscale
CIFAR-10 from CIFAR-10's validation tail; its other derivations (class subsets, resizing) are refused, because only
the test split would be left to take them from. Any other set is loaded from its training split.
"""
from __future__ import annotations

from typing import Callable

from oodbench.data import convert
from oodbench.data.imageset import ImageSet
from oodbench.errors import OODBenchError

_PIXEL_OPS = {"gray": convert.gray, "vflip": lambda x: x.flip(-2), "hflip": lambda x: x.flip(-1)}
_DERIVED = ("classes", "resize", "mnistlike")


def derived_from(spec: str, in_name: str):
    """The pixel operations (outermost first) when `spec` derives from the dataset `in_name`, else None."""
    ops, rest = [], spec.strip()
    while True:
        head, _, inner = rest.partition(":")
        if head in _PIXEL_OPS and inner:
            ops.append(head)
            rest = inner
        elif head in _DERIVED and inner:
            if inner.split(":")[-1] == in_name:
                raise OODBenchError(f"validation OOD set {spec!r} is derived from the in-distribution dataset "
                                    f"{in_name!r}, whose held-out part is its validation split; only gray:, vflip: "
                                    f"and hflip: of it can be built from that split, and a test split is never "
                                    f"used for selection")
            return None
        else:
            return ops if rest == in_name else None


def validation_ood(spec: str, in_name: str, val, load_train_split: Callable, like) -> ImageSet:
    """The validation OOD set `spec` converted to `like` (C, H, W): derived from the in-distribution validation
    split `val` when `spec` derives from `in_name`, else `load_train_split(spec, like)`. Never a test split."""
    ops = derived_from(spec, in_name)
    if ops is None:
        return load_train_split(spec, like)
    if val is None or len(val) == 0:
        raise OODBenchError(f"validation OOD set {spec!r} is built from the in-distribution validation split, which "
                            f"is empty; set data.val_fraction > 0 (a test split is never used for selection)")
    images = val.images
    for op in reversed(ops):
        images = _PIXEL_OPS[op](images)
    images, _ = convert.convert_like(images, like)
    return ImageSet(images, None, spec)
