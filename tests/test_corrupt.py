"""corrupt:TYPE:SEVERITY:D — the ImageNet-C corruptions (oodbench.data.corrupt): deterministic, shape-keeping,
stronger with severity, equal to independent formulas (scipy filters, colorsys HSV) where the corruption has one,
and one-line errors for bad specs."""
import colorsys

import numpy as np
import pytest
import torch
from scipy import ndimage

from oodbench import data
from oodbench.data import corrupt as C
from oodbench.errors import OODBenchError


def smooth_images(n=6, c=3, size=40):
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([xx, yy, 1 - xx * yy])[:c]
    shift = torch.rand((n, c, 1, 1), generator=g) * 0.3
    images = (base * 0.6 + shift).clamp(0, 1)
    images[:, :, 12:24, 12:24] = 0.9
    return (images * 255).round().to(torch.uint8)


@pytest.mark.parametrize("kind", C.TYPES)
def test_every_corruption_is_deterministic_keeps_shape_and_grows_with_severity(kind):
    texture = (torch.rand((6, 3, 40, 40), generator=torch.Generator().manual_seed(2)) * 60).to(torch.uint8)
    x = (smooth_images().int() * 3 // 4 + texture).to(torch.uint8)
    change = []
    for severity in (1, 5):
        y = C.corrupt(x, kind, severity)
        assert y.shape == x.shape and y.dtype == torch.uint8
        assert torch.equal(y, C.corrupt(x, kind, severity))              # the same pixels on every call
        change.append((y.float() - x.float()).abs().mean().item())
    if kind in ("saturate", "elastic_transform"):
        # not monotone in pixel change in ImageNet-C either: saturate 1-2 desaturate, 3-5 oversaturate; elastic
        # 1-2 are large smooth warps (affine ±24 px at 224), 3-5 small local jitter
        assert min(change) > 0
    else:
        assert change[1] > change[0] > 0


def test_gray_images_stay_gray_and_seeds_differ():
    x = smooth_images(c=1)
    for kind in C.TYPES:
        assert C.corrupt(x, kind, 3).shape == x.shape
    assert not torch.equal(C.corrupt(x, "gaussian_noise", 3, seed=0), C.corrupt(x, "gaussian_noise", 3, seed=1))
    assert torch.equal(C.corrupt(x, "saturate", 1), x)     # no saturation to scale: gray pixels are kept exactly


def test_contrast_equals_its_formula():
    x = smooth_images()
    f = x.numpy().astype(np.float64) / 255
    means = f.mean(axis=(2, 3), keepdims=True)
    want = np.clip((f - means) * 0.2 + means, 0, 1) * 255
    np.testing.assert_allclose(C.corrupt(x, "contrast", 3).numpy(), np.round(want), atol=1)


def test_gaussian_blur_equals_scipy():
    x = smooth_images().float() / 255
    want = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 2, 2), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(C.gaussian_blur(x, 2).numpy(), want, atol=1e-5)


def test_defocus_kernel_filter_equals_scipy_convolve():
    x = smooth_images().float() / 255
    k = torch.rand(5, 5)
    want = ndimage.correlate(x.numpy(), k.numpy()[None, None], mode="mirror")
    np.testing.assert_allclose(C._filter(x, k, "reflect").numpy(), want, atol=1e-5)


@pytest.mark.parametrize("kind,severity", [("brightness", 3), ("saturate", 1), ("saturate", 4)])
def test_hsv_corruptions_equal_colorsys(kind, severity):
    x = smooth_images(n=2, size=8)
    got = C.corrupt(x, kind, severity).numpy()
    c = C.PARAMS[kind][severity - 1]
    f = x.numpy().astype(np.float64) / 255
    for n in range(f.shape[0]):
        for i in range(f.shape[2]):
            for j in range(f.shape[3]):
                h, s, v = colorsys.rgb_to_hsv(*f[n, :, i, j])
                if kind == "brightness":
                    v = min(max(v + c, 0), 1)
                else:
                    s = min(max(s * c[0] + c[1], 0), 1)
                want = np.round(np.clip(colorsys.hsv_to_rgb(h, s, v), 0, 1) * 255)
                np.testing.assert_allclose(got[n, :, i, j], want, atol=1)


def test_noise_corruptions_have_their_scale():
    x = torch.full((20, 3, 32, 32), 128, dtype=torch.uint8)
    noisy = C.corrupt(x, "gaussian_noise", 1).float() / 255 - 128 / 255     # severity 1: sigma 0.08, no clipping
    assert noisy.std().item() == pytest.approx(0.08, rel=0.05)
    flipped = C.corrupt(x, "impulse_noise", 4) != 128
    assert flipped.float().mean().item() == pytest.approx(0.17, abs=0.02)


def test_pixelate_equals_pil_box():
    from PIL import Image

    x = smooth_images(n=2, size=37)
    small = Image.fromarray(x[0].permute(1, 2, 0).numpy()).resize((14, 14), Image.Resampling.BOX)
    want = np.asarray(small.resize((37, 37), Image.Resampling.BOX)).transpose(2, 0, 1)
    np.testing.assert_array_equal(C.corrupt(x, "pixelate", 3)[0].numpy(), want)        # int(37 * 0.4) = 14


def test_kernels_wider_than_the_image_pad_as_scipy():
    """ImageNet-C's kernels on small images are wider than the image; the padding repeats as scipy's does."""
    x = smooth_images(n=2, size=9).float() / 255
    want = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 6, 6), mode="reflect", truncate=3.0)
    np.testing.assert_allclose(C.gaussian_blur(x, 6, truncate=3.0, mode="symmetric").numpy(), want, atol=1e-5)
    k = torch.rand(21, 21)
    want = ndimage.correlate(x.numpy(), k.numpy()[None, None], mode="mirror")
    np.testing.assert_allclose(C._filter(x, k, "reflect").numpy(), want, rtol=1e-5)
    want = ndimage.correlate(x.numpy(), k.numpy()[None, None], mode="nearest")
    np.testing.assert_allclose(C._filter(x, k, "replicate").numpy(), want, rtol=1e-5)


def test_jpeg_equals_pil():
    import io

    from PIL import Image

    x = smooth_images(n=2)
    buffer = io.BytesIO()
    Image.fromarray(x[1].permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=15)
    want = np.asarray(Image.open(buffer)).transpose(2, 0, 1)
    np.testing.assert_array_equal(C.corrupt(x, "jpeg_compression", 3)[1].numpy(), want)


def test_corrupt_spec_keeps_labels_and_is_deterministic():
    clean = data.load("digits")
    a, b = data.load("corrupt:shot_noise:2:digits"), data.load("corrupt:shot_noise:2:digits")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, clean.labels)
    assert a.fingerprint != clean.fingerprint and not torch.equal(a.images, clean.images)
    assert data.has_split("corrupt:shot_noise:2:digits")
    train = data.load("corrupt:shot_noise:2:digits", split="train")
    assert train.fingerprint != a.fingerprint


@pytest.mark.parametrize("spec,message", [
    ("corrupt:gausian_noise:3:digits", "unknown corruption 'gausian_noise'; did you mean 'gaussian_noise'"),
    ("corrupt:fog:0:digits", "severity must be an integer 1-5"),
    ("corrupt:fog:6:digits", "severity must be an integer 1-5"),
    ("corrupt:fog:high:digits", "severity must be an integer 1-5"),
    ("corrupt:fog:digits", "use corrupt:TYPE:SEVERITY:<spec>"),
    ("corrupt:fog:2:nosuchset", "unknown dataset 'nosuchset'"),
])
def test_bad_corrupt_specs_are_one_line_errors(spec, message):
    with pytest.raises(OODBenchError, match=message) as e:
        data.check_spec(spec)
    assert "\n" not in str(e.value)


def test_motion_blur_is_the_sum_of_shifted_copies():
    """imagecorruptions' _motion_blur: Σ_i w_i · x shifted by (dy_i, dx_i) = −ceil(i·(sin, cos)(angle) − 0.5),
    edges replicated, w_i ∝ exp(−i²/2σ²) for i < 2·radius + 1; here one grouped kernel per image."""
    import math

    x = smooth_images(n=3).float() / 255
    angles = torch.tensor([-40.0, 7.5, 33.0])
    got = C._filter(x, C._motion_kernels(3, 2.0, angles), "replicate")
    h, w = x.shape[-2:]
    for b, angle in enumerate(angles.tolist()):
        weights = np.exp(-np.arange(7) ** 2 / 8.0)
        weights /= weights.sum()
        want = np.zeros((3, h, w))
        for i, wi in enumerate(weights):
            dy = -math.ceil(i * math.sin(math.radians(angle)) - 0.5)
            dx = -math.ceil(i * math.cos(math.radians(angle)) - 0.5)
            rows = np.clip(np.arange(h) - dy, 0, h - 1)
            cols = np.clip(np.arange(w) - dx, 0, w - 1)
            want += wi * x[b].numpy()[:, rows][:, :, cols]
        np.testing.assert_allclose(got[b].numpy(), want, atol=1e-5)
