"""PixMix's image mixing (Hendrycks et al., CVPR 2022), as OpenOOD v1.5's `pixmix_preprocessor.py` does it.

An image starts as itself or, with probability 1/2, one random augmentation of it; then 0..k times (uniformly) it is
mixed with either a fresh augmentation of the original or the mixing picture (1/2 each), by `add` or `multiply`
(1/2 each) with weights from Beta(beta, 1) / Beta(1, beta), and clipped to [0, 1]. The augmentations are the
AugMix operations on PIL images at `severity` (all_ops adds colour, contrast, brightness, sharpness).

Every random number comes from a `draws` object with NumPy's meanings (`random()`, `uniform(lo, hi)`,
`integer(n)`, `beta(a, b)`); `TorchDraws` takes them from torch's CPU generator, whose state the training
checkpoints hold, so a resumed run mixes the same images.
"""
from __future__ import annotations

import numpy as np
import torch

START_AUGMENTED = 0.5   # probability that the image starts as an augmentation of itself (OpenOOD, the authors)
MIX_AUGMENTED = 0.5     # probability that a mixing round uses a fresh augmentation, not the mixing picture


class TorchDraws:
    """PixMix's random draws from torch's default CPU generator."""

    def random(self) -> float:
        return float(torch.rand(()))

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def integer(self, n: int) -> int:
        return int(torch.randint(int(n), ()))

    def beta(self, a: float, b: float) -> float:
        return float(torch.distributions.Beta(float(a), float(b)).sample())


# -- the augmentation operations (PIL images; `level` is the severity, 0..10) ------------------------------------------
def _scaled_int(level: float, maxval: float) -> int:
    return int(level * maxval / 10)


def _scaled_float(level: float, maxval: float) -> float:
    return float(level) * maxval / 10.0


def _level(draws, severity: float) -> float:
    return draws.uniform(0.1, severity)


def _signed(draws, value):
    return -value if draws.random() > 0.5 else value


def _affine(img, coefficients):
    from PIL import Image

    return img.transform(img.size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR)


def _autocontrast(img, severity, draws):
    from PIL import ImageOps

    return ImageOps.autocontrast(img)


def _equalize(img, severity, draws):
    from PIL import ImageOps

    return ImageOps.equalize(img)


def _posterize(img, severity, draws):
    from PIL import ImageOps

    return ImageOps.posterize(img, 4 - _scaled_int(_level(draws, severity), 4))


def _rotate(img, severity, draws):
    from PIL import Image

    degrees = _signed(draws, _scaled_int(_level(draws, severity), 30))
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR)


def _solarize(img, severity, draws):
    from PIL import ImageOps

    return ImageOps.solarize(img, 256 - _scaled_int(_level(draws, severity), 256))


def _shear_x(img, severity, draws):
    return _affine(img, (1, _signed(draws, _scaled_float(_level(draws, severity), 0.3)), 0, 0, 1, 0))


def _shear_y(img, severity, draws):
    return _affine(img, (1, 0, 0, _signed(draws, _scaled_float(_level(draws, severity), 0.3)), 1, 0))


def _translate_x(img, severity, draws):
    return _affine(img, (1, 0, _signed(draws, _scaled_int(_level(draws, severity), img.size[0] / 3)), 0, 1, 0))


def _translate_y(img, severity, draws):
    return _affine(img, (1, 0, 0, 0, 1, _signed(draws, _scaled_int(_level(draws, severity), img.size[1] / 3))))


def _enhance(kind: str):
    def op(img, severity, draws):
        from PIL import ImageEnhance

        return getattr(ImageEnhance, kind)(img).enhance(_scaled_float(_level(draws, severity), 1.8) + 0.1)

    op.__name__ = kind.lower()
    return op


OPS = (_autocontrast, _equalize, _posterize, _rotate, _solarize, _shear_x, _shear_y, _translate_x, _translate_y)
ALL_OPS = OPS + tuple(_enhance(k) for k in ("Color", "Contrast", "Brightness", "Sharpness"))


# -- the mixings (float tensors in [0, 1]) -----------------------------------------------------------------------------
def _weights(draws, beta: float) -> tuple[float, float]:
    """(a, b): (Beta(beta, 1), Beta(1, beta)) or (1 + Beta(1, beta), -Beta(1, beta)), 1/2 each, in float32."""
    if draws.random() < 0.5:
        a, b = draws.beta(beta, 1), draws.beta(1, beta)
    else:
        a, b = 1 + float(np.float32(draws.beta(1, beta))), -draws.beta(1, beta)
    return float(np.float32(a)), float(np.float32(b))


def mix_add(x: torch.Tensor, y: torch.Tensor, beta: float, draws) -> torch.Tensor:
    """(a (2x - 1) + b (2y - 1) + 1) / 2."""
    a, b = _weights(draws, beta)
    return (a * (x * 2 - 1) + b * (y * 2 - 1) + 1) / 2


def mix_multiply(x: torch.Tensor, y: torch.Tensor, beta: float, draws) -> torch.Tensor:
    """(2x)^a (2y)^b / 2, with 2y floored at 1e-37."""
    a, b = _weights(draws, beta)
    return (x * 2) ** a * (y * 2).clip(1e-37) ** b / 2


MIXINGS = (mix_add, mix_multiply)


def to_pil(image: torch.Tensor):
    """uint8 (C, H, W), C = 1 or 3 -> a PIL image (L or RGB)."""
    from PIL import Image

    array = image.numpy()
    return Image.fromarray(array[0] if len(array) == 1 else np.ascontiguousarray(array.transpose(1, 2, 0)))


def to_unit(img) -> torch.Tensor:
    """A PIL image -> float32 (C, H, W) in [0, 1] (torchvision's to_tensor)."""
    array = torch.from_numpy(np.array(img, copy=True))
    array = array[None] if array.ndim == 2 else array.permute(2, 0, 1)
    return array.contiguous().to(torch.float32).div(255)


def pixmix(orig, mixing: torch.Tensor, k: int, beta: float, severity: float, all_ops: bool, draws) -> torch.Tensor:
    """One PixMix image: `orig` a PIL image (already through the training transform), `mixing` the mixing picture as
    float (C, H, W) in [0, 1]; returns float32 (C, H, W) in [0, 1]."""
    ops = ALL_OPS if all_ops else OPS

    def augmented():
        return to_unit(ops[draws.integer(len(ops))](orig.copy(), severity, draws))

    mixed = augmented() if draws.random() < START_AUGMENTED else to_unit(orig)
    for _ in range(draws.integer(k + 1)):
        other = augmented() if draws.random() < MIX_AUGMENTED else mixing
        mixed = MIXINGS[draws.integer(len(MIXINGS))](mixed, other, beta, draws).clip(0, 1)
    return mixed
