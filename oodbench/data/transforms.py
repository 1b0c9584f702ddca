"""Batched, device-side image transforms (no per-image Python). Inputs are (B, C, H, W) tensors on any device."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from oodbench.errors import OODBenchError

Stats = Union[float, Sequence[float], torch.Tensor]


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1]."""
    return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)


def normalize(x: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """(x - mean) / std with per-channel (or scalar) mean and std."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    if mean.shape[1] not in (1, x.shape[1]) or std.shape[1] not in (1, x.shape[1]):
        raise OODBenchError(f"normalize: mean/std need 1 or {x.shape[1]} values, got {mean.numel()} and {std.numel()}")
    return (x - mean) / std


def _draw(shape, high: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=gen_device).to(device)


def random_crop(x: torch.Tensor, padding: int, generator: Optional[torch.Generator] = None,
                padding_mode: str = "constant") -> torch.Tensor:
    """Pad by `padding` on every side and crop back to (H, W) at a random offset per image.

    Same distribution as torchvision's RandomCrop(size, padding) (zero padding) or with padding_mode="reflect".
    The padded image is never built: each output pixel is gathered from the input at its shifted position.
    """
    if padding == 0:
        return x
    if padding_mode not in ("constant", "reflect"):
        raise OODBenchError(f"random_crop: padding_mode must be 'constant' or 'reflect', got {padding_mode!r}")
    b, c, h, w = x.shape
    if padding_mode == "reflect" and (padding >= h or padding >= w):
        raise OODBenchError(f"random_crop: reflect padding {padding} needs images larger than it ({h}x{w})")
    offsets = _draw((2, b), 2 * padding + 1, generator, x.device) - padding      # shift in [-p, p]
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)                # (B, H) source rows
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)                # (B, W) source cols
    if padding_mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    else:
        inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    out = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if padding_mode == "constant":
        out = out.masked_fill(~inside, 0)
    return out


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror indices outside [0, n) about the edge pixels (numpy 'reflect', torch 'reflect')."""
    index = index.abs()
    return torch.where(index > n - 1, 2 * (n - 1) - index, index)


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flip each image left-right with probability p."""
    gen_device = generator.device if generator is not None else x.device
    flip = (torch.rand(x.shape[0], generator=generator, device=gen_device) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
