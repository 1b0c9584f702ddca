"""Synthetic sets: gaussian noise, uniform noise, constant colour, rendered letters (`glyphs`), IFS fractals
(`fractals`, PixMix's offline mixing set) — deterministic, seeded by kind, count, shape and split."""
from __future__ import annotations

import zlib

import torch

from oodbench.data import fractals, glyphs
from oodbench.errors import OODBenchError, check_allocation

DEFAULT_COUNT = 2000
DEFAULT_SHAPE = (1, 28, 28)
GAUSSIAN_MEAN, GAUSSIAN_STD = 0.5, 0.25   # in [0, 1] units, clipped to [0, 1] before quantising
KINDS = ("noise:gaussian", "noise:uniform", "constant", "glyphs", "fractals")
HEADS = ("noise", "constant", "glyphs", "fractals")   # the first part of a synthetic spec
SINGLE = ("constant", "glyphs", "fractals")          # kinds named by one part (noise:KIND has two)


def synthetic(kind: str, count: int = DEFAULT_COUNT, shape=DEFAULT_SHAPE, split: str = "test") -> torch.Tensor:
    """uint8 (count, C, H, W) images of `kind`, the same on every machine for a given (kind, count, shape, split).

    `glyphs` are gray letters (oodbench.data.glyphs), replicated to C channels; `fractals` are colour IFS fractals
    (oodbench.data.fractals), their luminance for C = 1."""
    if kind not in KINDS:
        raise OODBenchError(f"unknown synthetic set {kind!r}; use one of {', '.join(KINDS)}")
    if count < 1:
        raise OODBenchError(f"{kind}: the image count must be at least 1, got {count}")
    shape = tuple(int(s) for s in shape)
    check_allocation(float(count) * shape[0] * shape[1] * shape[2] * (5 if kind == "noise:gaussian" else 1),
                     f"{kind}:{count} ({count} images of {shape})", "ask for fewer images")
    if kind == "glyphs":
        images, _ = glyphs.glyphs(count, shape[1:], split)
        return torch.from_numpy(images).expand(-1, shape[0], -1, -1).contiguous()
    if kind == "fractals":
        return torch.from_numpy(fractals.fractals(count, shape, split))
    seed = zlib.crc32(f"{kind}|{split}|{count}|{shape}".encode())
    g = torch.Generator().manual_seed(seed)
    if kind == "noise:gaussian":
        x = torch.randn((count, *shape), generator=g).mul_(GAUSSIAN_STD).add_(GAUSSIAN_MEAN).clamp_(0, 1)
        return x.mul_(255).round_().to(torch.uint8)
    if kind == "noise:uniform":
        return torch.randint(0, 256, (count, *shape), generator=g, dtype=torch.uint8)
    colour = torch.randint(0, 256, (count, shape[0], 1, 1), generator=g, dtype=torch.uint8)
    return colour.expand(-1, -1, *shape[1:]).contiguous()
