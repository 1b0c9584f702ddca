"""Offline corruptions for covariate-shifted ID sets: the spec `corrupt:TYPE:SEVERITY:D` (docs/data.md).

The 15 ImageNet-C corruptions and its 4 extra ones (Hendrycks & Dietterich 2019) at severities 1-5, with the
constants of ImageNet-C's own code (hendrycks/robustness, ImageNet-C/create_c/make_imagenet_c.py), written here in
torch so that no new dependency is needed (that code, and the `imagecorruptions` package made from it, pull
scikit-image, OpenCV and ImageMagick/Wand, and the frost photographs): batched over a chunk of images (one conv /
interpolate / grid_sample call per chunk, per-image random parameters as grouped kernels and grids), deterministic
by seed (a torch.Generator seeded by type, severity and split: the same spec gives the same pixels on every call).
jpeg_compression and pixelate are PIL's own JPEG and BOX resize, one image at a time (PIL has no batch).

Where this differs from ImageNet-C (said in docs/data.md too):
- motion blur (motion_blur, snow) is a one-sided Gaussian-weighted line kernel, as imagecorruptions' numpy
  `_motion_blur`, not ImageMagick's;
- glass_blur shuffles pixels by a random local gather (each pixel takes a neighbour within max_delta) instead of the
  original's sequential swaps (an O(H·W) Python loop per image);
- frost blends a synthetic frost texture (plasma fractal and blurred needles, bluish white) instead of the six
  frost photographs shipped with ImageNet-C: numbers on frost are not comparable with ImageNet-C's;
- spatter's water drops (severities 1-3) are the thresholded liquid layer, blurred and added in light cyan, without
  the original's Canny edges / distance transform / emboss (OpenCV); the mud of severities 4-5 is transcribed;
- elastic_transform's constants (244·k pixels for 224-pixel images) are scaled by side/224.
On 1-channel images the colour corruptions (brightness, saturate, snow, frost, spatter) run on the replicated RGB
image and return its luminance.
"""
from __future__ import annotations

import difflib
import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from oodbench.errors import OODBenchError

CHUNK = 128   # images per batched call: bounds the float working memory

# severity 1..5 constants of ImageNet-C's make_imagenet_c.py
PARAMS = {
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
    "shot_noise": [60, 25, 12, 5, 3],
    "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
    "zoom_blur": [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
                  np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)],
    "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
    "fog": [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)],
    "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
    "elastic_transform": [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),   # (alpha, sigma,
                          (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),  # affine)
                          (244 * 0.12, 244 * 0.01, 244 * 0.02)],
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    "jpeg_compression": [25, 18, 15, 10, 7],
    # the four extra corruptions
    "speckle_noise": [0.15, 0.2, 0.35, 0.45, 0.6],
    "gaussian_blur": [1, 2, 3, 4, 6],
    "spatter": [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)],
    "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
}
TYPES = tuple(PARAMS)                 # the 15 ImageNet-C ones first, then the 4 extra
IMAGENET_C = TYPES[:15]
SEVERITIES = (1, 2, 3, 4, 5)
LUMA = (0.299, 0.587, 0.114)


def check(kind: str, severity: str, spec: str) -> int:
    """The severity as an int, or the one-line error for an unknown type or a severity outside 1-5."""
    if kind not in PARAMS:
        close = difflib.get_close_matches(kind, TYPES, n=1)
        raise OODBenchError(f"{spec}: unknown corruption {kind!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                            + f" (types: {', '.join(TYPES)})")
    if not str(severity).strip().isdigit() or int(severity) not in SEVERITIES:
        raise OODBenchError(f"{spec}: corruption severity must be an integer 1-5, got {severity!r}")
    return int(severity)


def corrupt(images: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """uint8 (N, C, H, W) → the same images with corruption `kind` at `severity` (1-5), uint8, on the CPU.
    Deterministic: the same images, kind, severity and seed give the same pixels."""
    severity = check(kind, str(severity), f"corrupt:{kind}:{severity}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise OODBenchError(f"corrupt:{kind}: needs (N, C, H, W) images with 1 or 3 channels, "
                            f"got {tuple(images.shape)}")
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}:{severity}:{seed}".encode()))
    param = PARAMS[kind][severity - 1]
    fn = _FUNCTIONS.get(kind)
    out = torch.empty_like(images, device="cpu")
    for i in range(0, images.shape[0], CHUNK):
        x = images[i:i + CHUNK].cpu()
        if kind in _UINT8:   # PIL's own operations on the uint8 images
            out[i:i + CHUNK] = _UINT8[kind](x, param)
            continue
        x = x.float() / 255.0
        if kind in _COLOUR and x.shape[1] == 1:
            y = fn(x.expand(-1, 3, -1, -1), param, g)
            y = sum(w * y[:, c:c + 1] for c, w in enumerate(LUMA))
        else:
            y = fn(x, param, g)
        # truncated as np.uint8(img) in ImageNet-C (+1e-3: float32 k/255·255 may fall just below k)
        out[i:i + CHUNK] = (y.clamp(0, 1) * 255.0 + 1e-3).clamp(max=255).to(torch.uint8)
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def _gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / float(sigma)) ** 2)
    return k / k.sum()


def _pad(x, pad: tuple, mode: str):
    """Pad the last two dims by (left, right, top, bottom), any width: "replicate" (scipy nearest), "reflect"
    (cv2 BORDER_REFLECT_101 / scipy mirror) or "symmetric" (scipy / scikit-image reflect), repeated as often as the
    pad needs (a kernel wider than the image, as ImageNet-C's on small images)."""
    if mode == "replicate":
        return F.pad(x, pad, mode="replicate")
    left, right, top, bottom = pad
    rows = _reflect_index(x.shape[-2], top, bottom, mode)
    cols = _reflect_index(x.shape[-1], left, right, mode)
    return x.index_select(-2, rows).index_select(-1, cols)


def _reflect_index(n: int, before: int, after: int, mode: str) -> torch.Tensor:
    i = torch.arange(-before, n + after)
    if n == 1:
        return torch.zeros_like(i)
    if mode == "symmetric":          # ... 1 0 | 0 1 ... n-1 | n-1 n-2 ...
        m = i % (2 * n)
        return torch.where(m < n, m, 2 * n - 1 - m)
    m = i % (2 * n - 2)              # reflect_101: ... 2 1 | 0 1 ... n-1 | n-2 ...
    return torch.where(m < n, m, 2 * n - 2 - m)


def gaussian_blur(x: torch.Tensor, sigma, truncate: float = 4.0, mode: str = "replicate") -> torch.Tensor:
    """scikit-image's `gaussian` per channel (truncate 4; its default mode "nearest" = replicate, or "symmetric" =
    its "reflect"); sigma a number or (sy, sx)."""
    sy, sx = (sigma, sigma) if np.isscalar(sigma) else sigma
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    ky, kx = _gaussian_kernel1d(sy, truncate), _gaussian_kernel1d(sx, truncate)
    y = F.conv2d(_pad(y, (0, 0, len(ky) // 2, len(ky) // 2), mode), ky.view(1, 1, -1, 1))
    y = F.conv2d(_pad(y, (len(kx) // 2, len(kx) // 2, 0, 0), mode), kx.view(1, 1, 1, -1))
    return y.reshape(b, c, h, w)


def _filter(x: torch.Tensor, kernels: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    """Each image (B, C, H, W) filtered with its own 2-D kernel (B, K, K), or one (K, K) for all (grouped conv)."""
    b, c, h, w = x.shape
    if kernels.ndim == 2:
        kernels = kernels.expand(b, -1, -1)
    k = kernels.shape[-1]
    weight = kernels.repeat_interleave(c, dim=0).unsqueeze(1)          # (B*C, 1, K, K)
    y = _pad(x.reshape(1, b * c, h, w), (k // 2,) * 4, mode)
    return F.conv2d(y, weight, groups=b * c).reshape(b, c, h, w)


def _clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom into the centre by `zoom` (bilinear, as scipy.ndimage.zoom order 1) and crop back to the size."""
    h, w = x.shape[-2:]
    ch, cw = int(math.ceil(h / zoom)), int(math.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    zh, zw = int(round(ch * zoom)), int(round(cw * zoom))
    y = F.interpolate(crop, size=(zh, zw), mode="bilinear", align_corners=True)
    th, tw = (zh - h) // 2, (zw - w) // 2
    return y[..., th:th + h, tw:tw + w]


def _motion_kernels(radius: int, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """(B, K, K) one-sided line kernels: imagecorruptions' `_motion_blur` (weights exp(-i²/2σ²), i < 2·radius+1,
    offsets −ceil(i·sin/cos(angle) − 0.5)) as one kernel per image."""
    width = radius * 2 + 1
    weights = torch.exp(-torch.arange(width, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    weights = (weights / weights.sum()).float()
    size, centre = 2 * width + 1, width
    radians = torch.deg2rad(angles.double()).view(-1, 1)
    steps = torch.arange(width, dtype=torch.float64).view(1, -1)
    dy = -torch.ceil(steps * torch.sin(radians) - 0.5).long()
    dx = -torch.ceil(steps * torch.cos(radians) - 0.5).long()
    kernels = torch.zeros(len(angles), size, size)
    index = (torch.arange(len(angles)).view(-1, 1).expand(-1, width), centre - dy, centre - dx)
    kernels.index_put_(index, weights.expand(len(angles), -1).contiguous(), accumulate=True)
    return kernels     # out[p] += w_i · x[p − (dy_i, dx_i)]


def _plasma(n: int, mapsize: int, decay: float, g: torch.Generator) -> torch.Tensor:
    """(n, mapsize, mapsize) diamond-square fractals in [0, 1] (ImageNet-C's `plasma_fractal`), batched."""
    grid = torch.zeros(n, mapsize, mapsize, dtype=torch.float64)
    step, wibble = mapsize, 100.0

    def wibbled(a):
        return a / 4 + wibble * (torch.rand(a.shape, generator=g, dtype=torch.float64) * 2 * wibble - wibble)

    while step >= 2:
        half = step // 2
        corners = grid[:, 0::step, 0::step]
        square = corners + corners.roll(-1, 1)
        square = square + square.roll(-1, 2)
        grid[:, half::step, half::step] = wibbled(square)
        dr, ul = grid[:, half::step, half::step], grid[:, 0::step, 0::step]
        grid[:, 0::step, half::step] = wibbled(dr + dr.roll(1, 1) + ul + ul.roll(-1, 2))
        grid[:, half::step, 0::step] = wibbled(dr + dr.roll(1, 2) + ul + ul.roll(-1, 1))
        step //= 2
        wibble /= decay
    flat = grid.reshape(n, -1)
    flat = flat - flat.min(1, keepdim=True).values
    return (flat / flat.max(1, keepdim=True).values).reshape(n, mapsize, mapsize).float()


def _mapsize(h: int, w: int) -> int:
    """The fractal's side: the power of two at or above the image side (256 for ImageNet-C's 224, 32 for CIFAR)."""
    return max(2, 1 << (max(h, w) - 1).bit_length())


def _hsv_value(x):
    return x.max(1, keepdim=True).values


def _gray(x):
    return sum(w * x[:, c:c + 1] for c, w in enumerate(LUMA))


# ---------------------------------------------------------------------------------------------------- corruptions
def _gaussian_noise(x, c, g):
    return x + torch.randn(x.shape, generator=g) * c


def _shot_noise(x, c, g):
    return torch.poisson(x * c, generator=g) / c


def _impulse_noise(x, c, g):   # scikit-image random_noise(mode="s&p", amount=c): half salt, half pepper
    hit = torch.rand(x.shape, generator=g) < c
    salt = torch.rand(x.shape, generator=g) < 0.5
    return torch.where(hit, salt.float(), x)


def _speckle_noise(x, c, g):
    return x + x * torch.randn(x.shape, generator=g) * c


def _gaussian_blur(x, c, g):
    return gaussian_blur(x, c)


def _glass_blur(x, c, g):
    sigma, delta, iterations = c
    x = torch.floor(gaussian_blur(x, sigma) * 255) / 255          # the original shuffles np.uint8 pixels
    b, ch, h, w = x.shape
    rows = torch.arange(h).view(1, h, 1).expand(b, h, w)
    cols = torch.arange(w).view(1, 1, w).expand(b, h, w)
    for _ in range(iterations):   # each pixel takes a neighbour within [−delta, delta) (numpy randint's range)
        dy = torch.randint(-delta, delta, (b, h, w), generator=g)
        dx = torch.randint(-delta, delta, (b, h, w), generator=g)
        src = ((rows + dy).clamp(0, h - 1) * w + (cols + dx).clamp(0, w - 1)).view(b, 1, h * w).expand(-1, ch, -1)
        x = x.reshape(b, ch, h * w).gather(2, src).reshape(b, ch, h, w)
    return gaussian_blur(x, sigma)


def _defocus_blur(x, c, g):
    radius, alias = c
    span, ksize = (8, 3) if radius <= 8 else (radius, 5)
    t = torch.arange(-span, span + 1, dtype=torch.float32)
    disk = ((t.view(-1, 1) ** 2 + t.view(1, -1) ** 2) <= radius ** 2).float()
    disk = disk / disk.sum()
    k = torch.exp(-0.5 * (torch.arange(ksize, dtype=torch.float32) - ksize // 2) ** 2 / alias ** 2)
    k = k / k.sum()                                    # cv2.GaussianBlur(disk, (ksize, ksize), alias)
    disk = F.conv2d(F.pad(disk.view(1, 1, *disk.shape), (ksize // 2,) * 4, mode="reflect"),
                    (k.view(-1, 1) * k.view(1, -1)).view(1, 1, ksize, ksize))[0, 0]
    return _filter(x, disk, "reflect")


def _motion_blur(x, c, g):
    radius, sigma = c
    angles = torch.rand(x.shape[0], generator=g) * 90 - 45
    return _filter(x, _motion_kernels(radius, sigma, angles), "replicate")


def _zoom_blur(x, c, g):
    out = x.clone()
    for zoom in c:
        out += _clipped_zoom(x, float(zoom))
    return out / (len(c) + 1)


def _snow(x, c, g):
    loc, scale, zoom, threshold, radius, sigma, blend = c
    b, _, h, w = x.shape
    layer = torch.randn((b, 1, h, w), generator=g) * scale + loc
    layer = _clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    layer = torch.floor(layer.clamp(0, 1) * 255) / 255       # the original blurs an 8-bit image (astype uint8)
    angles = torch.rand(b, generator=g) * 90 - 135
    layer = _filter(layer, _motion_kernels(radius, sigma, angles), "replicate")
    x = blend * x + (1 - blend) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-1, -2)


def _frost(x, c, g):
    """Synthetic frost (the ImageNet-C photos are not shipped): a plasma fractal with blurred bright needles,
    bluish white, blended as ImageNet-C blends its frost crops (x·c0 + frost·c1)."""
    b, _, h, w = x.shape
    m = _mapsize(h, w)
    base = _plasma(b, m, 1.6, g)[:, :h, :w].unsqueeze(1)
    needles = (torch.rand((b, 1, h, w), generator=g) > 0.97).float()
    needles = gaussian_blur(needles, (0.5, 1.5)) + gaussian_blur(needles, (1.5, 0.5))
    frost = (0.35 + 0.45 * base + 2.0 * needles).clamp(0, 1)
    tint = torch.tensor([0.88, 0.94, 1.0]).view(1, 3, 1, 1)
    return x * c[0] + frost * tint * c[1]


def _fog(x, c, g):
    b, _, h, w = x.shape
    peak = x.reshape(b, -1).max(1).values.view(b, 1, 1, 1)
    fog = _plasma(b, _mapsize(h, w), c[1], g)[:, :h, :w].unsqueeze(1)
    return (x + c[0] * fog) * peak / (peak + c[0])


def _brightness(x, c, g):   # HSV value + c (clipped), hue and saturation kept
    v = _hsv_value(x)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * v_new / v.clamp_min(1e-12), v_new.expand_as(x))


def _saturate(x, c, g):   # HSV saturation · c0 + c1 (clipped), hue and value kept; hue 0 for gray pixels
    v = _hsv_value(x)
    s = torch.where(v > 0, (v - x.min(1, keepdim=True).values) / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * c[0] + c[1]).clamp(0, 1)
    coloured = v - (v - x) * s_new / s.clamp_min(1e-12)
    gray = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], 1)
    return torch.where(s > 0, coloured, gray)


def _contrast(x, c, g):
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


def _elastic_transform(x, c, g):
    """ImageNet-C's elastic_transform: a random affine warp (three control points moved by up to c2 pixels, border
    reflect_101), then displacement fields of uniform(−1, 1) noise smoothed by a Gaussian (σ = c1, truncate 3,
    reflect) and scaled by c0, bilinear resampling with reflection. Its constants (244·k for 224-pixel images) are
    scaled by side/224 here, so a 224-pixel image gets the original's."""
    b, ch, h, w = x.shape
    scale = min(h, w) / 224.0
    alpha, sigma, affine = (v * scale for v in c)
    centre = torch.tensor([h // 2, w // 2], dtype=torch.float64)   # (as the original: float32(shape) // 2)
    side = min(h, w) // 3
    pts1 = torch.stack([centre + side, torch.stack([centre[0] + side, centre[1] - side]), centre - side])  # (3, 2)
    pts2 = pts1 + (torch.rand((b, 3, 2), generator=g, dtype=torch.float64) * 2 - 1) * affine
    ones = torch.ones(3, 1, dtype=torch.float64)
    src = torch.cat([pts1, ones], 1)                                # cv2.getAffineTransform: pts1 → pts2
    forward = torch.linalg.solve(src, pts2).transpose(1, 2)         # (b, 2, 3) in cv2's (x, y) convention
    full = torch.cat([forward, torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64).expand(b, -1, -1)], 1)
    inverse = torch.linalg.inv(full)[:, :2]                         # warpAffine samples src at M⁻¹ · dst
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    dst = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    sx, sy = (dst @ inverse.transpose(1, 2)).view(b, h, w, 2).unbind(-1)
    grid = torch.stack([2 * sx / max(w - 1, 1) - 1, 2 * sy / max(h - 1, 1) - 1], -1).float()
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)   # reflect_101
    fields = torch.rand((b, 2, h, w), generator=g) * 2 - 1
    fields = gaussian_blur(fields, sigma, truncate=3.0, mode="symmetric") * alpha
    dx, dy = fields[:, 0], fields[:, 1]
    rows = torch.arange(h, dtype=torch.float32).view(1, h, 1) + dy
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, w) + dx
    # map_coordinates(order=1, mode="reflect"): reflection about the outer pixel edges = align_corners=False
    grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _pixelate(images: torch.Tensor, c: float) -> torch.Tensor:
    """PIL BOX down to int(side·c) and BOX back up, as ImageNet-C (one image at a time: PIL has no batch)."""
    from PIL import Image

    n, ch, h, w = images.shape
    out = []
    for image in images.permute(0, 2, 3, 1).numpy():
        pil = Image.fromarray(image[..., 0] if ch == 1 else image)
        pil = pil.resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
        out.append(np.asarray(pil.resize((w, h), Image.Resampling.BOX)).reshape(h, w, ch))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _spatter(x, c, g):
    loc, scale, sigma, threshold, intensity, mud = c
    b, _, h, w = x.shape
    liquid = gaussian_blur(torch.randn((b, 1, h, w), generator=g) * scale + loc, sigma)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if not mud:   # water drops: the liquid layer, blurred, added in light cyan (no OpenCV edge/emboss steps)
        m = gaussian_blur(liquid, 1.0)
        m = m / m.reshape(b, -1).max(1).values.clamp_min(1e-12).view(b, 1, 1, 1) * intensity
        colour = torch.tensor([175 / 255, 238 / 255, 238 / 255]).view(1, 3, 1, 1)
        return x + m * colour
    m = gaussian_blur((liquid > threshold).float(), intensity)
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    colour = torch.tensor([63 / 255, 42 / 255, 20 / 255]).view(1, 3, 1, 1)
    return x * (1 - m) + colour * m


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """PIL JPEG at `quality` and back, as ImageNet-C (one encode per image: PIL has no batched codec)."""
    import io

    from PIL import Image

    out = []
    for image in images.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer))
        out.append(decoded.reshape(image.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


_UINT8 = {"jpeg_compression": _jpeg, "pixelate": _pixelate}
_FUNCTIONS = {name: globals()[f"_{name}"] for name in TYPES if name not in _UINT8}
_COLOUR = ("brightness", "saturate", "snow", "frost", "spatter")
