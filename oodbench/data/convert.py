"""Shape conversions of uint8 image tensors: luminance, channel count, size (torch on the device, or PIL)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from oodbench.errors import OODBenchError

RESIZE_METHODS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
CHUNK = 4096   # images per interpolation call, bounds the float working memory


def luminance(images: torch.Tensor) -> torch.Tensor:
    """RGB uint8 (N, 3, H, W) -> (N, 1, H, W), ITU-R 601-2 luma computed exactly as PIL's convert("L")."""
    x = images.to(torch.int32)
    y = (x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 0x8000) >> 16
    return y.to(torch.uint8).unsqueeze(1)


def gray(images: torch.Tensor) -> torch.Tensor:
    """Luminance replicated to the source's channel count (a 1-channel set is returned unchanged)."""
    c = images.shape[1]
    if c == 1:
        return images
    if c != 3:
        raise OODBenchError(f"gray: needs 1 or 3 channels, got {c}")
    return luminance(images).expand(-1, 3, -1, -1).contiguous()


def resize_torch(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing (torch.nn.functional.interpolate), rounded back to uint8, in chunks."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], *size), dtype=torch.uint8, device=images.device)
    for i in range(0, images.shape[0], CHUNK):
        x = images[i:i + CHUNK].float()
        y = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[i:i + CHUNK] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def mnist_layout(images: torch.Tensor) -> torch.Tensor:
    """MNIST's layout: each image resized (antialiased bilinear) so its longer side is 20 pixels, centred on a black
    28x28 canvas. MNIST's digits were size-normalised into a 20x20 box and centred the same way, which leaves
    about 80% of MNIST's pixels black; frame-filling sets such as scikit-learn's `digits` then look like MNIST."""
    n, c, h, w = images.shape
    box_h, box_w = max(1, round(20 * h / max(h, w))), max(1, round(20 * w / max(h, w)))
    top, left = (28 - box_h) // 2, (28 - box_w) // 2
    out = torch.zeros((n, c, 28, 28), dtype=torch.uint8, device=images.device)
    out[:, :, top:top + box_h, left:left + box_w] = resize_torch(images, (box_h, box_w))
    return out


def convert_like(images: torch.Tensor, like) -> tuple[torch.Tensor, str]:
    """Convert to `like` = (C, H, W): channels 1->3 by replication, 3->1 by luminance; size by antialiased bilinear.

    Returns the images and a description of the rule applied ("" when nothing changed).
    """
    c_to, h_to, w_to = (int(v) for v in like)
    n, c, h, w = images.shape
    rules = []
    if c != c_to:
        if (c, c_to) not in ((1, 3), (3, 1)):
            raise OODBenchError(f"cannot convert {c} channels to {c_to}; only 1<->3 conversions are defined")
        rules.append("3->1 channels by luminance" if c == 3 else "1->3 channels by replication")
    if (h, w) != (h_to, w_to):
        rules.append(f"{h}x{w} -> {h_to}x{w_to} by antialiased bilinear resize")
    if c == 3 and c_to == 1:
        images = luminance(images)
    images = resize_torch(images, (h_to, w_to))
    if c == 1 and c_to == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    return images, ", ".join(rules)


def pil_mode(channels: int) -> str:
    if channels not in (1, 3):
        raise OODBenchError(f"images with {channels} channels cannot be handled by PIL here; use 1 or 3 channels")
    return "L" if channels == 1 else "RGB"


def to_pil(image: np.ndarray) -> Image.Image:
    """One uint8 (C, H, W) array as a PIL image (L or RGB)."""
    mode = pil_mode(image.shape[0])
    return Image.fromarray(image[0] if mode == "L" else image.transpose(1, 2, 0), mode=mode)


def from_pil(image: Image.Image) -> np.ndarray:
    """A PIL L or RGB image as a uint8 (C, H, W) array."""
    a = np.asarray(image, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def check_method(method: str) -> int:
    if method not in RESIZE_METHODS:
        raise OODBenchError(f"unknown resize method {method!r}; use one of {', '.join(RESIZE_METHODS)}")
    return RESIZE_METHODS[method]


def resize_pil(images: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    """Resize every image with PIL's `method` (nearest|bilinear|bicubic|lanczos) to size (H, W)."""
    resample = check_method(method)
    h, w = size
    if tuple(images.shape[-2:]) == (h, w):
        return images
    src = images.cpu().numpy()
    out = np.empty((src.shape[0], src.shape[1], h, w), dtype=np.uint8)
    for i, image in enumerate(src):
        out[i] = from_pil(to_pil(image).resize((w, h), resample=resample))
    return torch.from_numpy(out).to(images.device)
