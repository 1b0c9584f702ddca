"""Neural network anchoring (Anirudh & Thiagarajan, 2022): a classifier that sees an image x through an anchor c.

The wrapped network takes cat([c, x - c]) along channels (in normalised space), so its stem has twice the image's
channels. `anchor_corruption` is the original's corruption of the reference half during training.
"""
from __future__ import annotations

from typing import Optional

import torch
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

    def forward(self, x: torch.Tensor, anchors: torch.Tensor, residual_anchors: Optional[torch.Tensor] = None):
        """Logits (B, classes) for x (B, C, H, W) with anchors (B, C, H, W), or (1, C, H, W) shared by the batch.

        The network sees cat([anchors, x - residual_anchors]); `residual_anchors` defaults to `anchors` and differs
        only on corrupted training steps, where the reference half is corrupted and the residual keeps the clean
        anchor (as in the original)."""
        residual_anchors = anchors if residual_anchors is None else residual_anchors
        return self.net(torch.cat([anchors.expand_as(x), x - residual_anchors.expand_as(x)], dim=1))

    def logits_per_anchor(self, x: torch.Tensor, anchors: torch.Tensor, max_batch: int = 0) -> torch.Tensor:
        """Logits (K, B, classes) of every image in x (B, C, H, W) with every anchor in `anchors`: (K, C, H, W)
        shared by the batch, or (K, B, C, H, W), anchor k of image b at [k, b].

        The K * B anchored pairs are built as one batch (anchor-major) and go through the network at once, or in
        slices of at most `max_batch` pairs when it is > 0 (a memory/cache limit, not a loop over anchors)."""
        k, b = anchors.shape[0], x.shape[0]
        a = anchors if anchors.dim() == x.dim() + 1 else anchors.unsqueeze(1).expand(k, b, *x.shape[1:])
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


# ---- anchor corruption (consistency training) ------------------------------------------------------------------

def anchor_corruption(height: int, width: int):
    """The original's corruption of the reference half (LLNL/AMP `ANT.txs`) as torchvision transforms for a batch
    of *normalised* anchors (N, C, H, W): random resized crop (area 0.6-1) back to H x W, horizontal flip, with
    probability 0.8 brightness jitter (x0.5-1.5) and a 3 wide x 9 tall Gaussian blur (sigma 0.1-5), grayscale with
    probability 0.2. Applied to a batched tensor, torchvision draws one set of parameters for the whole batch, and
    its brightness jitter clamps float images to [0, 1] (in normalised space too), both as in the original."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop((height, width), scale=(0.6, 1.0), antialias=False),  # torchvision 0.12's tensor default
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.5), T.GaussianBlur(kernel_size=(3, 9), sigma=(0.1, 5))], p=0.8),
        T.RandomGrayscale(p=0.2),
    ])
