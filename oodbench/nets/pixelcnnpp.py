"""PixelCNN++ (Salimans et al., 2017) with the discretised logistic mixture likelihood over 8-bit pixels.

Written from the paper and the description of the Ren et al. (2019) settings. Two streams keep the model causal:
the "up" stream (`u`) sees only rows above the current pixel (down-shifted 2x3 convolutions), the "up-left" stream
(`ul`) sees rows above and pixels to the left in the current row (down-right-shifted 2x2 convolutions). Gated
resnet blocks with concat_elu, optional hierarchies (strided down/up sampling between blocks; 1 = none), dropout.

`forward(x)` returns log p(x) per image in nats, summed over pixels and channels; x holds integer pixel values
0..255 (uint8 or float). For RGB, the mean of channel c is shifted by unbounded coefficients times the raw 0..255
values of the earlier channels of the same pixel (g depends on r; b on r and g), before the mean is mapped to pixel
units, as the original (genomics_ood `pixel_cnn.py`, `_log_prob`). `rescale=True` feeds the network x/127.5 - 1 and reads
means/scales in that range (CIFAR in the original); `rescale=False` feeds raw 0..255 values and predicts
scales as max(255 * sigmoid(s), 0.25) pixel units (Fashion-MNIST in the original). `init="keras"` initialises every
layer as the released network's Keras layers (`keras_init_`); `"torch"` keeps PyTorch's defaults.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

HIGH = 255          # 8-bit pixels
INITS = ("torch", "keras")   # PyTorch's default initialisation | the released Keras layers' (Glorot-uniform, zero bias)
_FAR = 1e8          # stands in for +-infinity at the edge bins (finite so gradients stay finite)


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """ELU of [x, -x] along channels: keeps both signs' information, doubles the channels."""
    return F.elu(torch.cat([x, -x], dim=1))


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every row down by one (top row zero): output row i sees input rows < i only."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every column right by one (left column zero)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class DownShiftedConv(nn.Conv2d):
    """Convolution whose output (i, j) sees input rows <= i, columns j-(kw-1)/2 .. j+(kw-1)/2."""

    def __init__(self, cin, cout, kernel=(2, 3), stride=1):
        super().__init__(cin, cout, kernel, stride=stride)
        kh, kw = kernel
        self.pad = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.pad))


class DownRightShiftedConv(nn.Conv2d):
    """Convolution whose output (i, j) sees input rows <= i and columns <= j."""

    def __init__(self, cin, cout, kernel=(2, 2), stride=1):
        super().__init__(cin, cout, kernel, stride=stride)
        kh, kw = kernel
        self.pad = (kw - 1, 0, kh - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.pad))


class DownShiftedDeconv(nn.ConvTranspose2d):
    """Stride-2 transposed convolution (2x3), cropped so that causality is kept when upsampling."""

    def __init__(self, cin, cout, kernel=(2, 3)):
        super().__init__(cin, cout, kernel, stride=2, output_padding=1)
        self.kernel = kernel

    def forward(self, x):
        out = super().forward(x)
        kh, kw = self.kernel
        side = (kw - 1) // 2
        return out[:, :, :out.shape[2] - kh + 1, side:out.shape[3] - side]


class DownRightShiftedDeconv(nn.ConvTranspose2d):
    """Stride-2 transposed convolution (2x2), cropped to keep causality."""

    def __init__(self, cin, cout, kernel=(2, 2)):
        super().__init__(cin, cout, kernel, stride=2, output_padding=1)
        self.kernel = kernel

    def forward(self, x):
        out = super().forward(x)
        kh, kw = self.kernel
        return out[:, :, :out.shape[2] - kh + 1, :out.shape[3] - kw + 1]


class GatedResnet(nn.Module):
    """x + a * sigmoid(b), where [a, b] = conv(dropout(concat_elu(conv(concat_elu(x)) + nin(concat_elu(skip)))))."""

    def __init__(self, filters: int, conv: type, skip_channels: int = 0, dropout_p: float = 0.0):
        super().__init__()
        self.conv_in = conv(2 * filters, filters)
        self.skip = nn.Conv2d(2 * skip_channels, filters, 1) if skip_channels else None
        self.dropout = nn.Dropout(dropout_p)
        self.conv_out = conv(2 * filters, 2 * filters)

    def forward(self, x, skip=None):
        h = self.conv_in(concat_elu(x))
        if self.skip is not None:
            h = h + self.skip(concat_elu(skip))
        h = self.conv_out(self.dropout(concat_elu(h)))
        a, b = h.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class PixelCNNpp(nn.Module):
    """PixelCNN++ over uint8 images (B, C, H, W); `forward(x)` = log p(x) per image (nats)."""

    def __init__(self, in_channels: int = 1, num_filters: int = 32, num_resnet: int = 5, num_hierarchies: int = 1,
                 num_logistic_mix: int = 1, dropout_p: float = 0.0, rescale: bool = False, ones_channel: bool = True,
                 init: str = "torch"):
        super().__init__()
        if num_hierarchies < 1 or num_resnet < 1 or num_filters < 1 or num_logistic_mix < 1:
            raise ValueError("num_hierarchies, num_resnet, num_filters and num_logistic_mix must be >= 1")
        if init not in INITS:
            raise ValueError(f"init={init!r}: use one of {', '.join(INITS)}")
        self.in_channels, self.mix, self.rescale = in_channels, num_logistic_mix, rescale
        self.num_hierarchies, self.ones_channel = num_hierarchies, bool(ones_channel)
        f = num_filters
        # ones_channel: a constant channel of ones, so zero padding is told apart from black pixels (oodbench's
        # default); False = the released TFP network's input (the image channels only, zero 'same' padding)
        cin = in_channels + int(self.ones_channel)

        self.u_init = DownShiftedConv(cin, f, (2, 3))
        self.ul_init_up = DownShiftedConv(cin, f, (1, 3))
        self.ul_init_left = DownRightShiftedConv(cin, f, (2, 1))

        def block(n, skip_u, skip_ul):
            u = nn.ModuleList(GatedResnet(f, DownShiftedConv, skip_u, dropout_p) for _ in range(n))
            ul = nn.ModuleList(GatedResnet(f, DownRightShiftedConv, skip_ul, dropout_p) for _ in range(n))
            return u, ul

        # First pass (towards lower resolution): u blocks have no skip input, ul blocks take u.
        self.first_u, self.first_ul = nn.ModuleList(), nn.ModuleList()
        for _ in range(num_hierarchies):
            u, ul = block(num_resnet, 0, f)
            self.first_u.append(u)
            self.first_ul.append(ul)
        self.downsample_u = nn.ModuleList(DownShiftedConv(f, f, (2, 3), stride=2)
                                          for _ in range(num_hierarchies - 1))
        self.downsample_ul = nn.ModuleList(DownRightShiftedConv(f, f, (2, 2), stride=2)
                                           for _ in range(num_hierarchies - 1))
        # Second pass (back up): every block takes the stored first-pass output as skip input.
        self.second_u, self.second_ul = nn.ModuleList(), nn.ModuleList()
        for level in range(num_hierarchies):
            u, ul = block(num_resnet if level == 0 else num_resnet + 1, f, 2 * f)
            self.second_u.append(u)
            self.second_ul.append(ul)
        self.upsample_u = nn.ModuleList(DownShiftedDeconv(f, f) for _ in range(num_hierarchies - 1))
        self.upsample_ul = nn.ModuleList(DownRightShiftedDeconv(f, f) for _ in range(num_hierarchies - 1))

        c = in_channels
        self.num_coeffs = c * (c - 1) // 2
        self.out = nn.Conv2d(f, num_logistic_mix * (1 + 2 * c + self.num_coeffs), 1)
        if init == "keras":
            self.keras_init_()

    def released_kernel(self, conv: nn.Module) -> tuple:
        """The (height, width) of the released TFP network's kernel that `conv` stands for. There every masked
        layer is a full-size 'same' Conv2D (receptive field 3x3) whose mask zeroes the entries oodbench leaves out,
        so Keras' fans (and the Glorot bound) count the whole kernel."""
        if conv is self.u_init:
            return (5, 3)                                   # vertical stack init: (2 * rows - 1, cols)
        if isinstance(conv, (DownShiftedDeconv, DownRightShiftedDeconv)):
            return (2, 4) if isinstance(conv, DownShiftedDeconv) else (2, 2)
        if isinstance(conv, (DownShiftedConv, DownRightShiftedConv)):
            return (4, 4) if conv.stride[0] == 2 else (3, 3)  # strided down-sampling | stride-1 layers, first ul
        return tuple(conv.kernel_size)                     # 1x1: Keras Dense layers (network-in-network, output)

    @torch.no_grad()
    def keras_init_(self) -> None:
        """The released code's initialisation (train.py: no weight norm, so plain Keras layers): Glorot-uniform
        kernels, bound sqrt(6 / ((fan_in + fan_out) * kh * kw)) over the released kernel size, and zero biases."""
        for conv in self.modules():
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                kh, kw = self.released_kernel(conv)
                w = conv.weight                            # (out, in, ...) or (in, out, ...): the sum is the same
                bound = math.sqrt(6.0 / ((w.shape[0] + w.shape[1]) * kh * kw))
                nn.init.uniform_(w, -bound, bound)
                nn.init.zeros_(conv.bias)

    # -------------------------------------------------------------------------------------------------------------
    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values as the network sees them: x/127.5 - 1 when rescaled, raw 0..255 otherwise."""
        x = x.to(self.out.weight.dtype)
        return x / (HIGH / 2) - 1 if self.rescale else x

    def _shifted(self, shift, conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
        """A first-layer output shifted by one pixel. Without the ones channel the shifted-in row/column is the
        conv's bias, as the released network's masked 'same' conv over zero padding gives; with it, zeros."""
        y = conv(h)
        if self.ones_channel:
            return shift(y)
        b = conv.bias.view(1, -1, 1, 1)
        return shift(y - b) + b

    def raw_output(self, x: torch.Tensor) -> torch.Tensor:
        """The network's per-pixel output (B, mix * (1 + 2C + C(C-1)/2), H, W), before any channel conditioning."""
        h = self.network_input(x)
        if self.ones_channel:
            h = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
        u = self._shifted(down_shift, self.u_init, h)
        ul = self._shifted(down_shift, self.ul_init_up, h) + self._shifted(right_shift, self.ul_init_left, h)
        us, uls = [u], [ul]
        for level in range(self.num_hierarchies):
            for res_u, res_ul in zip(self.first_u[level], self.first_ul[level]):
                u = res_u(u)
                ul = res_ul(ul, u)
                us.append(u)
                uls.append(ul)
            if level < self.num_hierarchies - 1:
                u, ul = self.downsample_u[level](u), self.downsample_ul[level](ul)
                us.append(u)
                uls.append(ul)
        u, ul = us.pop(), uls.pop()
        for level in range(self.num_hierarchies):
            for res_u, res_ul in zip(self.second_u[level], self.second_ul[level]):
                u = res_u(u, us.pop())
                ul = res_ul(ul, torch.cat([u, uls.pop()], dim=1))
            if level < self.num_hierarchies - 1:
                u, ul = self.upsample_u[level](u), self.upsample_ul[level](ul)
        return self.out(F.elu(ul))

    def distribution(self, x: torch.Tensor):
        """Per pixel-channel mixture parameters in pixel units, after conditioning on earlier channels.

        Returns (logits (B, K, H, W), means (B, K, C, H, W), scales (B, K, C, H, W)), float32.
        """
        with torch.autocast(x.device.type, enabled=False):
            out = self.raw_output(x)
            return self._distribution(x, out.to(torch.promote_types(out.dtype, torch.float32)))

    def _distribution(self, x, out):
        b, _, height, width = out.shape
        k, c = self.mix, self.in_channels
        out = out.view(b, k, 1 + 2 * c + self.num_coeffs, height, width)
        logits = out[:, :, 0]
        means = out[:, :, 1:1 + c]
        raw_scales = out[:, :, 1 + c:1 + 2 * c]
        if c > 1:  # as the original: raw coefficients times the raw 0..255 values, in the network's units
            coeffs = out[:, :, 1 + 2 * c:]
            seen = x.to(out.dtype).unsqueeze(1)                             # (B, 1, C, H, W)
            shifts, n = [torch.zeros_like(means[:, :, 0])], 0
            for ch in range(1, c):
                shift = 0
                for prev in range(ch):
                    shift = shift + coeffs[:, :, n] * seen[:, :, prev]
                    n += 1
                shifts.append(shift)
            means = means + torch.stack(shifts, dim=2)
        if self.rescale:
            means = (means + 1) * (HIGH / 2)
            scales = (F.softplus(raw_scales) + math.exp(-7.0)) * (HIGH / 2)
        else:
            scales = torch.clamp(torch.sigmoid(raw_scales) * HIGH, min=0.25)
        return logits, means, scales

    def log_prob_per_pixel(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_ij | x_<ij) for every pixel (B, H, W) (all channels of a pixel together), nats."""
        logits, means, scales = self.distribution(x)
        return mixture_log_prob(x, logits, means, scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per image (B,), nats, summed over all pixels and channels."""
        return self.log_prob_per_pixel(x).flatten(1).sum(1)


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log P(X = x) for X a logistic(mean, scale) rounded to 0..255; bins 0 and 255 absorb the tails.

    P(x) = sigmoid((x + .5 - mean)/scale) - sigmoid((x - .5 - mean)/scale), with the upper edge +inf at 255 and the
    lower edge -inf at 0, computed as log sigmoid(a) + log(1 - sigmoid(b)) + log(1 - exp(b - a)) (exact, stable).
    """
    x = x.to(mean.dtype)
    upper = torch.where(x >= HIGH, torch.full_like(x, _FAR), x + 0.5)
    lower = torch.where(x <= 0, torch.full_like(x, -_FAR), x - 0.5)
    a = (upper - mean) / scale
    b = (lower - mean) / scale
    return F.logsigmoid(a) - F.softplus(b) + torch.log(-torch.expm1(b - a))


def mixture_log_prob(x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, scales: torch.Tensor):
    """log p of each pixel (B, H, W) under the mixture: logsumexp_k [log pi_k + sum_c log P_k(x_c)]."""
    per_channel = discretized_logistic_log_prob(x.unsqueeze(1), means, scales)   # (B, K, C, H, W)
    return torch.logsumexp(F.log_softmax(logits, dim=1) + per_channel.sum(2), dim=1)
