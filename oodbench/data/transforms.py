"""Batched, device-side image transforms (no per-image Python). Inputs are (B, C, H, W) tensors on any device."""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from oodbench.errors import OODBenchError

Stats = Union[float, Sequence[float], torch.Tensor]


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1]."""
    return x.to(torch.float32).mul_(1.0 / 255.0) if x.dtype == torch.uint8 else x.to(torch.float32)


def normalize(x: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """(x - mean) / std with per-channel (or scalar) mean and std (computed as a multiply by 1 / std)."""
    mean, std = _per_channel(mean, x), _per_channel(std, x)
    return (x - mean).mul_(1.0 / std)


def _per_channel(v: Stats, x: torch.Tensor):
    """A Python float for scalar statistics (no tensor op), else a (1, C, 1, 1) tensor."""
    if isinstance(v, (int, float)):
        return float(v)
    if not isinstance(v, torch.Tensor) and len(v) == 1:
        return float(v[0])
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    if t.shape[1] not in (1, x.shape[1]):
        raise OODBenchError(f"normalize: mean/std need 1 or {x.shape[1]} values, got {t.numel()}")
    return t


@functools.lru_cache(maxsize=64)
def _crop_tables(b: int, c: int, h: int, w: int, p: int, device: torch.device):
    """Start of every output row in the flat padded batch for a zero shift, and the (2p+1)^2 possible shifts."""
    hp, wp = h + 2 * p, w + 2 * p
    with torch.inference_mode(False):          # cached tensors must be usable outside inference mode too
        return _crop_tables_uncached(b, c, h, hp, wp, p, device)


def _crop_tables_uncached(b, c, h, hp, wp, p, device):
    plane = torch.arange(b * c, device=device)[:, None] * (hp * wp)
    row_start = plane + torch.arange(h, device=device) * wp                          # (B*C, H)
    dy, dx = torch.meshgrid(torch.arange(2 * p + 1), torch.arange(2 * p + 1), indexing="ij")
    return row_start, (dy * wp + dx).reshape(-1).to(device)


def random_crop(x: torch.Tensor, padding: int, generator: Optional[torch.Generator] = None,
                padding_mode: str = "constant") -> torch.Tensor:
    """Pad by `padding` on every side and crop back to (H, W) at a random offset per image.

    Same distribution as torchvision's RandomCrop(size, padding) (zero padding) or with padding_mode="reflect".
    Vectorised: every output row is a contiguous run of the padded batch, taken with one index_select.
    """
    if padding == 0:
        return x
    if padding_mode not in ("constant", "reflect"):
        raise OODBenchError(f"random_crop: padding_mode must be 'constant' or 'reflect', got {padding_mode!r}")
    b, c, h, w = x.shape
    p = int(padding)
    if padding_mode == "reflect":
        if p >= h or p >= w:
            raise OODBenchError(f"random_crop: reflect padding {p} needs images larger than it ({h}x{w})")
        padded = x.index_select(2, _reflected(h, p, x.device)).index_select(3, _reflected(w, p, x.device))
    else:
        padded = F.pad(x, (p, p, p, p))
    row_start, shifts = _crop_tables(b, c, h, w, p, x.device)
    shift = shifts[_draw((b,), (2 * p + 1) ** 2, generator, x.device)]               # per image
    if c > 1:
        shift = shift.repeat_interleave(c)
    start = (row_start + shift[:, None]).view(-1)
    rows = padded.reshape(-1).unfold(0, w, 1)            # a view: row k is padded.flat[k : k + w]
    return rows.index_select(0, start).view(b, c, h, w)


def _draw(shape, high: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=gen_device).to(device)


def _reflected(n: int, p: int, device) -> torch.Tensor:
    """Indices of a length-n axis reflect-padded by p (edge pixel not repeated, as numpy/torch 'reflect')."""
    index = torch.arange(-p, n + p, device=device).abs()
    return torch.where(index > n - 1, 2 * (n - 1) - index, index)


@functools.lru_cache(maxsize=64)
def _rows(n: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.arange(n, device=device)


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flip each image left-right with probability p."""
    b, c, h, w = x.shape
    gen_device = generator.device if generator is not None else x.device
    coin = torch.rand(b, generator=generator, device=gen_device).to(x.device)
    both = torch.cat([x, x.flip(-1)]).view(2 * b * c * h, w)                 # rows of x, then rows of x flipped
    offset = (coin < p) * (b * c * h)                                         # int64: 0 or the flipped half
    rows = (_rows(b * c * h, x.device).view(b, c * h) + offset[:, None]).view(-1)
    return both.index_select(0, rows).view(b, c, h, w)


def augment(x: torch.Tensor, how: str, padding: int) -> torch.Tensor:
    """Device-side training augmentation of a uint8 batch: crop_flip | flip | none."""
    if how not in ("crop_flip", "flip", "none"):
        raise OODBenchError(f"unknown train.augment {how!r}; use crop_flip, flip or none")
    if how == "crop_flip":
        x = random_crop(x, padding)
    if how in ("crop_flip", "flip"):
        x = random_hflip(x)
    return x
