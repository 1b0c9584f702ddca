"""A DDPM UNet: sinusoidal timestep embedding, residual blocks, self-attention at the low resolutions.

`build_unet(size, in_channels)` gives the two sizes of the DDPM-OOD paper:
- `small`: base 128 channels, multipliers (1, 2, 2), 1 residual block per level, attention at the lowest level;
- `paper`: base 256 channels, multipliers (1, 2, 3), 2 residual blocks per level, attention at all three levels;
both with 256 channels per attention head (1, 2, 3 heads at 256, 512, 768 channels), as the original's MONAI
`DiffusionModelUNet(num_head_channels=256)` (ddpm-ood `src/trainers/base.py`).
`size="custom"` takes `base`, `mults`, `blocks`, `attn_levels` (tiny networks for tests and quick runs).

`forward(x, t)`: x float (B, C, H, W) with H and W divisible by 2**(len(mults) - 1); t integer timesteps (B,).
Every sample is processed on its own (GroupNorm, no batch statistics), so a batch of many (image, t) pairs equals
separate forwards.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.errors import OODBenchError

SIZES = {
    "small": dict(base=128, mults=(1, 2, 2), blocks=1, attn_levels=(2,), head_channels=256),
    "paper": dict(base=256, mults=(1, 2, 3), blocks=2, attn_levels=(0, 1, 2), head_channels=256),
}


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of integer or float timesteps (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """(GroupNorm, SiLU, conv) twice, the timestep embedding added in between; 1x1 skip when channels change."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the spatial positions, residual."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise OODBenchError(f"UNet attention: {channels} channels are not divisible into {heads} heads")
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)                      # (b, heads, hw, c/heads)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class Step(nn.ModuleList):
    """A residual block optionally followed by attention."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb)
        return x


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, base: int = 128, mults=(1, 2, 2), blocks: int = 1,
                 attn_levels=(2,), heads: int = 1, dropout: float = 0.0, head_channels: int = 0):
        """`heads` attention heads everywhere, or channels // `head_channels` heads when head_channels > 0."""
        super().__init__()

        def attention(channels):
            return Attention(channels, channels // head_channels if head_channels > 0 else heads)

        if not mults or blocks < 1 or base < 1:
            raise OODBenchError("UNet needs base >= 1, blocks >= 1 and at least one channel multiplier")
        self.levels = len(mults)
        emb_dim = 4 * base
        self.base = base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels, base, 3, padding=1)

        skips, ch = [base], base
        self.down = nn.ModuleList()
        for level, m in enumerate(mults):
            for _ in range(blocks):
                step = Step([ResBlock(ch, base * m, emb_dim, dropout)])
                ch = base * m
                if level in attn_levels:
                    step.append(attention(ch))
                self.down.append(step)
                skips.append(ch)
            if level < self.levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = Step([ResBlock(ch, ch, emb_dim, dropout), attention(ch), ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mults))):
            for i in range(blocks + 1):
                step = Step([ResBlock(ch + skips.pop(), base * m, emb_dim, dropout)])
                ch = base * m
                if level in attn_levels:
                    step.append(attention(ch))
                if level > 0 and i == blocks:
                    step.append(Upsample(ch))
                self.up.append(step)
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def multiple(self) -> int:
        """H and W must be multiples of this."""
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise OODBenchError(f"UNet input {tuple(x.shape[-2:])} is not a multiple of {self.multiple}; pad it")
        emb = self.time_mlp(timestep_embedding(t, self.base).to(x.dtype))
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Step) else layer(h)
            hs.append(h)
        h = self.mid(h, emb)
        for step in self.up:
            h = step(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def build_unet(size: str = "small", in_channels: int = 1, **custom) -> UNet:
    """`small` / `paper` (the paper's two networks), or `custom` with base, mults, blocks, attn_levels, heads,
    head_channels."""
    if size == "custom":
        return UNet(in_channels, **custom)
    if size not in SIZES:
        raise OODBenchError(f"unknown UNet size {size!r}; use small, paper or custom")
    extra = {k: v for k, v in custom.items() if k in ("dropout",)}
    return UNet(in_channels, **SIZES[size], **extra)
