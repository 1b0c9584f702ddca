"""Noise-conditional score networks for MSMA.

Every network maps (x, level) -> s(x, level) with x a float image batch (B, C, H, W) in [0, 1] and `level` a long
tensor (B,) of noise-level indices in 0..num_L-1. Conditioning is through conditional instance norm++ on the
level index; activations are ELU; the output has the input's channels and is **not** divided by sigma (the loss
weights it by sigma instead). Each sample is normalised on its own, so a batch of B*L (image, level) pairs gives
the same result as L separate forwards.

- `refinenet` (`MSMARefineNet`): the original's RefineNet (ahsanMah/msma `model/refinenet.py`, `model/layers.py`):
  4 pre-activation blocks, CIN++ γ·IN(x) + β + α·(μ − m)/√v with γ, α initialised to ones and ε = 1e-6, input in
  [0, 1], Keras' initialisers (Glorot-uniform kernels, zero biases).
- `refinenet_ncsn` (`CondRefineNet`): the NCSN-v1 PyTorch layout (8 residual blocks, CIN++ γ·(IN(x) + α·…) + β,
  N(1, 0.02) initialisation, ε = 1e-5, input 2x − 1) that oodbench used before.
- `resnet` (`CondResNet`): a smaller net of oodbench's own, in the NCSN style.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.errors import OODBenchError

SCORE_NETS = ("refinenet", "refinenet_ncsn", "resnet", "baseline")


class CondInstanceNormPlus(nn.Module):
    """Instance norm++ with per-level scale (gamma), mean-shift weight (alpha) and bias (beta); mu = the per-channel
    spatial means, m and v their mean and (population) variance over channels.

    - `original=True` (MSMA's layer): gamma_l * IN(x) + beta_l + alpha_l * (mu - m) / sqrt(v + eps), gamma and alpha
      initialised to ones, eps = 1e-6 (also inside IN);
    - `original=False` (NCSN-v1): gamma_l * (IN(x) + alpha_l * (mu - m) / sqrt(v + eps)) + beta_l, gamma and alpha
      drawn from N(1, 0.02), eps = 1e-5.
    """

    def __init__(self, channels: int, num_L: int, original: bool = False):
        super().__init__()
        self.original = original
        self.eps = 1e-6 if original else 1e-5
        self.gamma = nn.Embedding(num_L, channels)
        self.alpha = nn.Embedding(num_L, channels)
        self.beta = nn.Embedding(num_L, channels)
        for w in (self.gamma.weight, self.alpha.weight):
            nn.init.ones_(w) if original else nn.init.normal_(w, 1.0, 0.02)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dim=(2, 3), keepdim=True)
        m = mu.mean(dim=1, keepdim=True)
        v = mu.var(dim=1, keepdim=True, unbiased=False)
        gamma = self.gamma(level)[:, :, None, None]
        shift = self.alpha(level)[:, :, None, None] * (mu - m) / torch.sqrt(v + self.eps)
        if not self.original:
            shift = gamma * shift
        # gamma * IN(x) + (shift + beta), the per-(sample, channel) terms folded into one fused multiply-add
        return torch.addcmul(shift + self.beta(level)[:, :, None, None], gamma, F.instance_norm(x, eps=self.eps))


def elu(x: torch.Tensor) -> torch.Tensor:
    """ELU (alpha 1). On CPU as relu(x) + exp(min(x, 0)) - 1: the same function, but aten's CPU elu kernel is
    several times slower than these three vectorised ops."""
    if x.device.type != "cpu":
        return F.elu(x)
    return F.relu(x) + torch.clamp(x, max=0.0).exp() - 1.0


def conv3x3(cin: int, cout: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias)


class CondResBlock(nn.Module):
    """Pre-activation residual block: (norm, ELU, conv) x 2. `down=True` halves the resolution (conv then 2x2
    mean pool) unless `dilation > 1`, in which case the block keeps the resolution and uses dilated convs."""

    def __init__(self, cin: int, cout: int, num_L: int, down: bool = False, dilation: int = 1):
        super().__init__()
        self.pool = down and dilation == 1
        self.norm1 = CondInstanceNormPlus(cin, num_L)
        self.conv1 = conv3x3(cin, cin, dilation)
        self.norm2 = CondInstanceNormPlus(cin, num_L)
        self.conv2 = conv3x3(cin, cout, dilation)
        self.skip = None
        if cin != cout or self.pool:
            self.skip = nn.Conv2d(cin, cout, 1) if not self.pool else conv3x3(cin, cout)

    def _resample(self, h: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(h, 2, ceil_mode=True) if self.pool else h

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        h = self.conv1(elu(self.norm1(x, level)))
        h = self._resample(self.conv2(elu(self.norm2(h, level))))
        skip = x if self.skip is None else self._resample(self.skip(x))
        return skip + h


class CondRCU(nn.Module):
    """Residual conv unit of RefineNet: `blocks` x (`stages` x (norm, ELU, conv)) with identity skips."""

    def __init__(self, ch: int, num_L: int, blocks: int = 2, stages: int = 2):
        super().__init__()
        self.norms = nn.ModuleList(CondInstanceNormPlus(ch, num_L) for _ in range(blocks * stages))
        self.convs = nn.ModuleList(conv3x3(ch, ch, bias=False) for _ in range(blocks * stages))
        self.stages = stages

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        for start in range(0, len(self.convs), self.stages):
            h = x
            for j in range(start, start + self.stages):
                h = self.convs[j](elu(self.norms[j](h, level)))
            x = x + h
        return x


class CondMSF(nn.Module):
    """Multi-resolution fusion: norm + conv each input, upsample to the output size, sum."""

    def __init__(self, in_channels: list[int], ch: int, num_L: int):
        super().__init__()
        self.norms = nn.ModuleList(CondInstanceNormPlus(c, num_L) for c in in_channels)
        self.convs = nn.ModuleList(conv3x3(c, ch) for c in in_channels)

    def forward(self, xs: list[torch.Tensor], level: torch.Tensor, size) -> torch.Tensor:
        out = 0
        for x, norm, conv in zip(xs, self.norms, self.convs):
            h = conv(norm(x, level))
            out = out + F.interpolate(h, size=size, mode="bilinear", align_corners=True)
        return out


class CondCRP(nn.Module):
    """Chained residual pooling: repeated (norm, 5x5 mean pool, conv), each stage added to the running sum."""

    def __init__(self, ch: int, num_L: int, stages: int = 2):
        super().__init__()
        self.norms = nn.ModuleList(CondInstanceNormPlus(ch, num_L) for _ in range(stages))
        self.convs = nn.ModuleList(conv3x3(ch, ch, bias=False) for _ in range(stages))

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        x = elu(x)
        h = x
        for norm, conv in zip(self.norms, self.convs):
            h = conv(F.avg_pool2d(norm(h, level), 5, stride=1, padding=2, count_include_pad=False))
            x = x + h
        return x


class CondRefineBlock(nn.Module):
    """RefineNet block: RCU per input, fuse (when more than one input), chained pooling, output RCU."""

    def __init__(self, in_channels: list[int], ch: int, num_L: int, end: bool = False):
        super().__init__()
        self.adapt = nn.ModuleList(CondRCU(c, num_L) for c in in_channels)
        self.msf = CondMSF(in_channels, ch, num_L) if len(in_channels) > 1 else None
        self.crp = CondCRP(ch, num_L)
        self.out = CondRCU(ch, num_L, blocks=3 if end else 1)

    def forward(self, xs: list[torch.Tensor], level: torch.Tensor, size) -> torch.Tensor:
        hs = [rcu(x, level) for rcu, x in zip(self.adapt, xs)]
        h = self.msf(hs, level, size) if self.msf is not None else hs[0]
        return self.out(self.crp(h, level), level)


class CondRefineNet(nn.Module):
    """NCSN-v1 RefineNet (dilated): four residual stages (full res; half res; half res dilated 2 and 4) and four
    refine blocks back to full resolution. Works for any even or odd image size (28, 32, ...)."""

    def __init__(self, channels: int, filters: int = 128, num_L: int = 10):
        super().__init__()
        f = filters
        self.begin = conv3x3(channels, f)
        self.stage1 = nn.ModuleList([CondResBlock(f, f, num_L), CondResBlock(f, f, num_L)])
        self.stage2 = nn.ModuleList([CondResBlock(f, 2 * f, num_L, down=True), CondResBlock(2 * f, 2 * f, num_L)])
        self.stage3 = nn.ModuleList([CondResBlock(2 * f, 2 * f, num_L, down=True, dilation=2),
                                     CondResBlock(2 * f, 2 * f, num_L, dilation=2)])
        self.stage4 = nn.ModuleList([CondResBlock(2 * f, 2 * f, num_L, down=True, dilation=4),
                                     CondResBlock(2 * f, 2 * f, num_L, dilation=4)])
        self.refine4 = CondRefineBlock([2 * f], 2 * f, num_L)
        self.refine3 = CondRefineBlock([2 * f, 2 * f], 2 * f, num_L)
        self.refine2 = CondRefineBlock([2 * f, 2 * f], f, num_L)
        self.refine1 = CondRefineBlock([f, f], f, num_L, end=True)
        self.end_norm = CondInstanceNormPlus(f, num_L)
        self.end = conv3x3(f, channels)

    @staticmethod
    def _run(blocks, h, level):
        for block in blocks:
            h = block(h, level)
        return h

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        h = self.begin(2 * x - 1)
        h1 = self._run(self.stage1, h, level)
        h2 = self._run(self.stage2, h1, level)
        h3 = self._run(self.stage3, h2, level)
        h4 = self._run(self.stage4, h3, level)
        r = self.refine4([h4], level, h4.shape[2:])
        r = self.refine3([h3, r], level, h3.shape[2:])
        r = self.refine2([h2, r], level, h2.shape[2:])
        r = self.refine1([h1, r], level, h1.shape[2:])
        return self.end(elu(self.end_norm(r, level)))


class CondResNet(nn.Module):
    """A smaller score network: residual blocks at full resolution with growing dilation (1, 2, 4, 8, ...)."""

    def __init__(self, channels: int, filters: int = 64, num_L: int = 10, blocks: int = 4):
        super().__init__()
        self.begin = conv3x3(channels, filters)
        self.blocks = nn.ModuleList(CondResBlock(filters, filters, num_L, dilation=2 ** (i % 4))
                                    for i in range(blocks))
        self.end_norm = CondInstanceNormPlus(filters, num_L)
        self.end = conv3x3(filters, channels)

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        h = self.begin(2 * x - 1)
        for block in self.blocks:
            h = block(h, level)
        return self.end(elu(self.end_norm(h, level)))


# ---- the original MSMA RefineNet ---------------------------------------------------------------------------------

class PreActBlock(nn.Module):
    """MSMA's conditional full pre-activation block: (CIN++, ELU, conv) x 2, the first conv already to `cout`; a 1x1
    skip conv when the channels change; with `pool`, 2x2 mean pooling of both branches after the convolutions."""

    def __init__(self, cin: int, cout: int, num_L: int, dilation: int = 1, pool: bool = False):
        super().__init__()
        self.norm1 = CondInstanceNormPlus(cin, num_L, original=True)
        self.conv1 = conv3x3(cin, cout, dilation)
        self.norm2 = CondInstanceNormPlus(cout, num_L, original=True)
        self.conv2 = conv3x3(cout, cout, dilation)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.pool = pool

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        h = self.conv2(elu(self.norm2(self.conv1(elu(self.norm1(x, level))), level)))
        skip = x if self.skip is None else self.skip(x)
        if self.pool:
            h, skip = F.avg_pool2d(h, 2, ceil_mode=True), F.avg_pool2d(skip, 2, ceil_mode=True)
        return skip + h


class MSMARefineBlock(nn.Module):
    """MSMA's refine block: 2 RCUs (pre-activation blocks) per input, fusion (CIN++ then conv per input, the low
    one bilinearly resized to the high one's size) when there are two, chained residual pooling (ELU, then 2 x
    (CIN++, 5x5 mean pool, conv) chained and summed), `end` RCUs."""

    def __init__(self, in_channels: list[int], ch: int, num_L: int, end: int = 1):
        super().__init__()
        self.rcus = nn.ModuleList(nn.ModuleList(PreActBlock(c if i == 0 else ch, ch, num_L) for i in range(2))
                                  for c in in_channels)
        fused = len(in_channels) if len(in_channels) > 1 else 0
        self.fuse_norms = nn.ModuleList(CondInstanceNormPlus(ch, num_L, original=True) for _ in range(fused))
        self.fuse_convs = nn.ModuleList(conv3x3(ch, ch) for _ in range(fused))
        self.crp_norms = nn.ModuleList(CondInstanceNormPlus(ch, num_L, original=True) for _ in range(2))
        self.crp_convs = nn.ModuleList(conv3x3(ch, ch) for _ in range(2))
        self.end = nn.ModuleList(PreActBlock(ch, ch, num_L) for _ in range(end))

    def forward(self, xs: list[torch.Tensor], level: torch.Tensor) -> torch.Tensor:
        hs = list(xs)
        for i in range(2):
            hs = [rcu[i](h, level) for rcu, h in zip(self.rcus, hs)]
        if len(hs) == 2:
            size = hs[0].shape[2:]
            high, low = (conv(norm(h, level)) for norm, conv, h in zip(self.fuse_norms, self.fuse_convs, hs))
            x = high + F.interpolate(low, size=size, mode="bilinear", align_corners=False)
        else:
            x = hs[0]
        x = h = elu(x)
        for norm, conv in zip(self.crp_norms, self.crp_convs):
            h = conv(F.avg_pool2d(norm(h, level), 5, stride=1, padding=2, count_include_pad=False))
            x = x + h
        for block in self.end:
            x = block(x, level)
        return x


class MSMARefineNet(nn.Module):
    """The original MSMA RefineNet: conv to `filters`; pre-activation blocks f (full res), 2f (pooled to half res),
    2f (dilation 2), 2f (dilation 4); refine blocks back up (2f, 2f, 2f, then f with 3 end RCUs); CIN++, ELU, conv
    back to the image's channels. The input is x in [0, 1] as it is (no 2x - 1)."""

    def __init__(self, channels: int, filters: int = 128, num_L: int = 10):
        super().__init__()
        f = filters
        self.begin = conv3x3(channels, f)
        self.preact = nn.ModuleList([PreActBlock(f, f, num_L), PreActBlock(f, 2 * f, num_L, pool=True),
                                     PreActBlock(2 * f, 2 * f, num_L, dilation=2),
                                     PreActBlock(2 * f, 2 * f, num_L, dilation=4)])
        self.refine4 = MSMARefineBlock([2 * f], 2 * f, num_L)
        self.refine3 = MSMARefineBlock([2 * f, 2 * f], 2 * f, num_L)
        self.refine2 = MSMARefineBlock([2 * f, 2 * f], 2 * f, num_L)
        self.refine1 = MSMARefineBlock([f, 2 * f], f, num_L, end=3)
        self.end_norm = CondInstanceNormPlus(f, num_L, original=True)
        self.end = conv3x3(f, channels)
        for m in self.modules():  # Keras' defaults: Glorot-uniform kernels, zero biases
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        h, outs = self.begin(x), []
        for block in self.preact:
            h = block(h, level)
            outs.append(h)
        r = self.refine4([outs[3]], level)
        r = self.refine3([outs[2], r], level)
        r = self.refine2([outs[1], r], level)
        r = self.refine1([outs[0], r], level)
        return self.end(elu(self.end_norm(r, level)))


def build_score_net(model: str, channels: int, filters: int, num_L: int) -> nn.Module:
    """`refinenet` (the original MSMA RefineNet; `baseline` is the same net trained with one level),
    `refinenet_ncsn` (the NCSN-v1 layout) or `resnet`."""
    if num_L < 1:
        raise OODBenchError(f"num_L must be >= 1, got {num_L}; set model.num_L to the number of noise levels")
    if filters < 1:
        raise OODBenchError(f"filters must be >= 1, got {filters}; set model.filters")
    if model in ("refinenet", "baseline"):
        return MSMARefineNet(channels, filters, num_L)
    if model == "refinenet_ncsn":
        return CondRefineNet(channels, filters, num_L)
    if model == "resnet":
        return CondResNet(channels, filters, num_L)
    raise OODBenchError(f"unknown score model {model!r}; set model.model to one of {', '.join(SCORE_NETS)}")
