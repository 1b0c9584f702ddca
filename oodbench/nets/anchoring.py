"""Neural network anchoring (Anirudh & Thiagarajan, 2022): a classifier that sees an image x through an anchor c.

The wrapped network takes cat([c, x - c]) along channels (in normalised space), so its stem has twice the image's
channels. `corrupt_anchors` is the batched, on-device corruption applied to the reference half during training.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.errors import OODBenchError


class Anchored(nn.Module):
    """Wraps a classifier whose stem takes 2 * `in_channels`; forward(x, anchors) classifies x relative to anchors."""

    def __init__(self, net: nn.Module, in_channels: int):
        super().__init__()
        stem = _stem_in_channels(net)
        if stem != 2 * in_channels:
            raise OODBenchError(
                f"anchoring needs a network whose first convolution takes {2 * in_channels} channels "
                f"(2 x {in_channels}: anchor and residual), but its stem takes {stem}; build it with "
                f"in_channels={2 * in_channels} (build_anchored does this)")
        self.net = net
        self.in_channels = in_channels
        # Counts training batches (like BatchNorm's num_batches_tracked): saved with the weights, so the
        # every-n-th-step anchor corruption stays in phase when a run is resumed.
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) for x (B, C, H, W) with anchors (B, C, H, W), or (1, C, H, W) shared by the batch."""
        anchors = anchors.expand_as(x)
        return self.net(torch.cat([anchors, x - anchors], dim=1))

    def logits_per_anchor(self, x: torch.Tensor, anchors: torch.Tensor, max_batch: int = 0) -> torch.Tensor:
        """Logits (K, B, classes) of every image in x (B, C, H, W) with every anchor in `anchors` (K, C, H, W).

        The K * B anchored pairs are built as one batch (anchor-major) and go through the network at once, or in
        slices of at most `max_batch` pairs when it is > 0 (a memory/cache limit, not a loop over anchors)."""
        k, b = anchors.shape[0], x.shape[0]
        a = anchors.unsqueeze(1).expand(k, b, *x.shape[1:])
        pairs = torch.cat([a, x.unsqueeze(0) - a], dim=2).reshape(k * b, 2 * x.shape[1], *x.shape[2:])
        if 0 < max_batch < k * b:
            logits = torch.cat([self.net(part) for part in pairs.split(max_batch)])
        else:
            logits = self.net(pairs)
        return logits.reshape(k, b, logits.shape[-1])


def build_anchored(arch: str, in_channels: int, num_classes: int, **kw) -> Anchored:
    """An anchored classifier: `build_classifier(arch, 2 * in_channels, num_classes, **kw)` wrapped in `Anchored`."""
    from oodbench.nets.classifiers import build_classifier

    return Anchored(build_classifier(arch, 2 * in_channels, num_classes, **kw), in_channels)


def _stem_in_channels(net: nn.Module) -> int:
    for module in net.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    raise OODBenchError(f"anchoring needs a convolutional network; {type(net).__name__} has no convolution "
                        f"whose input channels could be doubled")


# ---- anchor corruption (consistency training), batched over images, on the images' device ------------------------

def corrupt_anchors(x: torch.Tensor, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), jitter_blur_p: float = 0.8,
                    brightness: float = 0.5, blur_sigma=(0.1, 5.0), gray_p: float = 0.2) -> torch.Tensor:
    """Randomly corrupt each image of x (N, C, H, W, floats in [0, 1]) independently: random resized crop
    (area fraction in `scale`, aspect ratio in `ratio`) with a horizontal flip (p = 0.5); with probability
    `jitter_blur_p` brightness jitter (factor 1 +- `brightness`) and a Gaussian blur (3 wide x 9 tall, sigma in
    `blur_sigma`); grayscale with probability `gray_p` (3-channel images). The original's torchvision transforms, drawn per image."""
    n = x.shape[0]
    if n == 0:
        return x
    x = _resized_crop_flip(x, scale, ratio)
    u = torch.rand(n, device=x.device)
    jb = (u < jitter_blur_p).view(n, 1, 1, 1)
    factor = 1 + brightness * (2 * torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) - 1)
    sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * torch.rand(n, device=x.device, dtype=x.dtype)
    x = torch.where(jb, _blur(torch.clamp(x * factor, 0, 1), sigma), x)
    if x.shape[1] == 3:
        lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)
        gray = (torch.rand(n, device=x.device) < gray_p).view(n, 1, 1, 1)
        x = torch.where(gray, lum, x)
    return x


def _resized_crop_flip(x: torch.Tensor, scale, ratio) -> torch.Tensor:
    n, dev, dt = x.shape[0], x.device, x.dtype
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, device=dev, dtype=dt)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    log_ratio = lo + (hi - lo) * torch.rand(n, device=dev, dtype=dt)
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)  # crop size as a fraction of the side
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = (2 * torch.rand(n, device=dev, dtype=dt) - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (2 * torch.rand(n, device=dev, dtype=dt) - 1) * (1 - h)
    flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0).to(dt)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gauss(sigma: torch.Tensor, size: int) -> torch.Tensor:
    t = torch.arange(size, device=sigma.device, dtype=sigma.dtype) - (size - 1) / 2
    k = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)  # (N, size)


def _blur(x: torch.Tensor, sigma: torch.Tensor, width: int = 3, height: int = 9) -> torch.Tensor:
    """Per-image separable Gaussian blur as grouped convolutions (reflect padding; kernels shrink for tiny images)."""
    n, c, hgt, wid = x.shape
    pw, ph = min(width // 2, wid - 1), min(height // 2, hgt - 1)
    kx = _gauss(sigma, 2 * pw + 1).repeat_interleave(c, 0).view(n * c, 1, 1, 2 * pw + 1)
    ky = _gauss(sigma, 2 * ph + 1).repeat_interleave(c, 0).view(n * c, 1, 2 * ph + 1, 1)
    y = x.reshape(1, n * c, hgt, wid)
    y = F.conv2d(F.pad(y, (pw, pw, 0, 0), mode="reflect"), kx, groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, ph, ph), mode="reflect"), ky, groups=n * c)
    return y.view(n, c, hgt, wid)
