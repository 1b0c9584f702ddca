"""The PixMix recipe (oodbench/data/pixmix.py, recipes.PixMix) and its offline mixing set `fractals`: the mixing equals
a transcription of OpenOOD v1.5's pixmix_preprocessor.py written here, fed the same random draws; defining
properties; a tiny CLI run; one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from oodbench import config as configs
from oodbench import data
from oodbench.cli import main
from oodbench.data import pixmix as ops
from oodbench.detectors import recipes

from conftest import fails
from test_recipes import TINY, first_batch, load_net, train_cli


class TorchNumpyRandom:
    """`np.random` as OpenOOD's preprocessor calls it, each call one draw of torch's generator (the draws oodbench
    makes: random / uniform one torch.rand, randint / choice one torch.randint, beta one Beta sample)."""

    def random(self):
        return float(torch.rand(()))

    def uniform(self, low=0.0, high=1.0):
        return low + (high - low) * float(torch.rand(()))

    def randint(self, n):
        return int(torch.randint(n, ()))

    def choice(self, seq):
        return seq[int(torch.randint(len(seq), ()))]

    def beta(self, a, b):
        return float(torch.distributions.Beta(float(a), float(b)).sample())


def to_tensor(img):
    """torchvision's ToTensor."""
    from torchvision.transforms.functional import to_tensor as tv

    return tv(img)


# -- transcription of OpenOOD v1.5 openood/preprocessors/pixmix_preprocessor.py (its np.random -> `rnd`) ---------
def openood_ops(rnd, size):
    def int_parameter(level, maxval):
        return int(level * maxval / 10)

    def float_parameter(level, maxval):
        return float(level) * maxval / 10.

    def sample_level(n):
        return rnd.uniform(low=0.1, high=n)

    def autocontrast(pil_img, _):
        return ImageOps.autocontrast(pil_img)

    def equalize(pil_img, _):
        return ImageOps.equalize(pil_img)

    def posterize(pil_img, level):
        level = int_parameter(sample_level(level), 4)
        return ImageOps.posterize(pil_img, 4 - level)

    def rotate(pil_img, level):
        degrees = int_parameter(sample_level(level), 30)
        if rnd.uniform() > 0.5:
            degrees = -degrees
        return pil_img.rotate(degrees, resample=Image.BILINEAR)

    def solarize(pil_img, level):
        level = int_parameter(sample_level(level), 256)
        return ImageOps.solarize(pil_img, 256 - level)

    def shear_x(pil_img, level):
        level = float_parameter(sample_level(level), 0.3)
        if rnd.uniform() > 0.5:
            level = -level
        return pil_img.transform((size, size), Image.AFFINE, (1, level, 0, 0, 1, 0), resample=Image.BILINEAR)

    def shear_y(pil_img, level):
        level = float_parameter(sample_level(level), 0.3)
        if rnd.uniform() > 0.5:
            level = -level
        return pil_img.transform((size, size), Image.AFFINE, (1, 0, 0, level, 1, 0), resample=Image.BILINEAR)

    def translate_x(pil_img, level):
        level = int_parameter(sample_level(level), size / 3)
        if rnd.random() > 0.5:
            level = -level
        return pil_img.transform((size, size), Image.AFFINE, (1, 0, level, 0, 1, 0), resample=Image.BILINEAR)

    def translate_y(pil_img, level):
        level = int_parameter(sample_level(level), size / 3)
        if rnd.random() > 0.5:
            level = -level
        return pil_img.transform((size, size), Image.AFFINE, (1, 0, 0, 0, 1, level), resample=Image.BILINEAR)

    def color(pil_img, level):
        return ImageEnhance.Color(pil_img).enhance(float_parameter(sample_level(level), 1.8) + 0.1)

    def contrast(pil_img, level):
        return ImageEnhance.Contrast(pil_img).enhance(float_parameter(sample_level(level), 1.8) + 0.1)

    def brightness(pil_img, level):
        return ImageEnhance.Brightness(pil_img).enhance(float_parameter(sample_level(level), 1.8) + 0.1)

    def sharpness(pil_img, level):
        return ImageEnhance.Sharpness(pil_img).enhance(float_parameter(sample_level(level), 1.8) + 0.1)

    augmentations = [autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x, translate_y]
    return augmentations, augmentations + [color, contrast, brightness, sharpness]


def openood_pixmix(orig, mixing_pic, rnd, k=4, beta=3, aug_severity=3, all_ops=True):
    """PixMixPreprocessor.pixmix after its transforms (orig and mixing_pic given transformed), before normalize."""
    augmentations, augmentations_all = openood_ops(rnd, orig.size[0])

    def get_ab(beta):
        if rnd.random() < 0.5:
            a = np.float32(rnd.beta(beta, 1))
            b = np.float32(rnd.beta(1, beta))
        else:
            a = 1 + np.float32(rnd.beta(1, beta))
            b = -np.float32(rnd.beta(1, beta))
        return a, b

    def add(img1, img2, beta):
        a, b = get_ab(beta)
        img1, img2 = img1 * 2 - 1, img2 * 2 - 1
        out = a * img1 + b * img2
        return (out + 1) / 2

    def multiply(img1, img2, beta):
        a, b = get_ab(beta)
        img1, img2 = img1 * 2, img2 * 2
        out = (img1 ** a) * (img2.clip(1e-37) ** b)
        return out / 2

    def augment_input(image):
        aug_list = augmentations_all if all_ops else augmentations
        op = rnd.choice(aug_list)
        return op(image.copy(), aug_severity)

    mixings = [add, multiply]
    if rnd.random() < 0.5:
        mixed = to_tensor(augment_input(orig))
    else:
        mixed = to_tensor(orig)
    for _ in range(rnd.randint(k + 1)):
        if rnd.random() < 0.5:
            aug_image_copy = to_tensor(augment_input(orig))
        else:
            aug_image_copy = to_tensor(mixing_pic)
        mixed_op = rnd.choice(mixings)
        mixed = mixed_op(mixed, aug_image_copy, beta)
        mixed = torch.clip(mixed, 0, 1)
    return mixed


def images(n, c, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("channels, all_ops, k", [(3, True, 4), (1, True, 4), (3, False, 6)])
def test_pixmix_equals_openood_with_the_same_draws(channels, all_ops, k):
    x, pics = images(12, channels), images(12, channels, seed=1)
    for i in range(len(x)):
        torch.manual_seed(100 + i)
        ours = ops.pixmix(ops.to_pil(x[i]), pics[i].float() / 255, k, 3.0, 3, all_ops, ops.TorchDraws())
        after_ours = torch.rand(())
        torch.manual_seed(100 + i)
        ref = openood_pixmix(ops.to_pil(x[i]), ops.to_pil(pics[i]), TorchNumpyRandom(), k=k, all_ops=all_ops)
        assert torch.rand(()) == after_ours          # the same number of draws
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        assert ours.shape == (channels, 12, 12) and ours.dtype == torch.float32


def test_pixmix_views_are_openoods_pixmix_of_a_random_cropped_mixing_picture():
    recipe = recipes.PixMix(mixing_resize=1.5)
    pics = images(5, 3, size=8, seed=2)
    recipe.use_images(pics)
    assert recipe.mixing.shape == (5, 3, 12, 12)           # resized once by mixing_resize
    x = images(6, 3, size=8, seed=3)
    torch.manual_seed(7)
    (view,) = recipe.views_of(x, lambda b: b)
    torch.manual_seed(7)
    rnd = TorchNumpyRandom()
    for i in range(len(x)):
        pic = recipe.mixing[rnd.randint(5)]
        top, left = rnd.randint(12 - 8 + 1), rnd.randint(12 - 8 + 1)
        crop = ops.to_pil(pic[:, top:top + 8, left:left + 8])
        torch.testing.assert_close(view[i], openood_pixmix(ops.to_pil(x[i]), crop, rnd), rtol=1e-6, atol=1e-6)


def test_pixmix_output_is_in_the_unit_range_and_uses_the_mixing_picture():
    """The same draws with two different mixing pictures: the outputs differ exactly where a mixing round picked
    the picture, at most mean over n = 0..k of (1 - 2^-n) = 0.6125 of the images for k = 4 (a later round can
    wipe it out, e.g. multiplied by a black augmentation), and never with k = 0 (no rounds)."""
    x = images(300, 1, size=10, seed=4)

    def run(value, k):
        recipe = recipes.PixMix(k=k)
        recipe.use_images(torch.full((3, 1, 10, 10), value, dtype=torch.uint8))
        torch.manual_seed(0)
        (out,) = recipe.views_of(x, lambda b: b)
        return out

    a, b = run(204, 4), run(51, 4)
    assert a.min() >= 0 and a.max() <= 1 and b.min() >= 0 and b.max() <= 1
    differs = ((a - b).abs().flatten(1).amax(1) > 0).float().mean()
    assert 0.3 < differs < 0.6125 + 0.06
    changed = ((a - x.float() / 255).abs().flatten(1).amax(1) > 1e-6).float().mean()
    assert changed > 0.6                        # most images are augmented or mixed
    assert torch.equal(run(204, 0), run(51, 0))


def test_fractals_are_a_deterministic_seeded_synthetic_set():
    a = data.load("fractals:6", split="train", like=(3, 16, 16))
    b = data.load("fractals:6", split="train", like=(3, 16, 16))
    t = data.load("fractals:6", split="test", like=(3, 16, 16))
    g = data.load("fractals:6", split="train", like=(1, 16, 16))
    assert a.images.shape == (6, 3, 16, 16) and a.images.dtype == torch.uint8 and g.images.shape == (6, 1, 16, 16)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, t.images)
    lum = (0.299 * a.images[:, 0:1].float() + 0.587 * a.images[:, 1:2].float() + 0.114 * a.images[:, 2:3].float())
    assert (g.images.float() - lum).abs().max() <= 1.0      # gray is the colour images' luminance (+- rounding)
    lit = (a.images.amax(1) > 0).float().flatten(1).mean(1)
    assert ((lit > 0.02) & (lit < 0.98)).all()              # a figure on a black ground, never empty or full
    assert data.has_split("fractals")
    assert "use fractals[:N]" in str(pytest.raises(Exception, data.check_spec, "fractals:x").value)


def test_cli_pixmix_run_trains_on_mixed_images_and_is_scored(tmp_path):
    runs = tmp_path / "runs"
    extra = ("--set", "pixmix.mixing_set=fractals:20")
    initial = train_cli(runs, "pixmix", 0, "init", *extra)
    run = train_cli(runs, "pixmix", 2, "pixmix", *extra)
    cfg = configs.read_yaml(run / "config.yaml")
    assert cfg["train"]["recipe"] == "pixmix" and cfg["pixmix"]["mixing_set"] == "fractals:20"
    assert cfg["pixmix"]["k"] == 4 and cfg["pixmix"]["beta"] == 3.0
    icfg, trainer = load_net(initial)
    _, x, y = first_batch(icfg)
    with torch.no_grad():
        plain = float(F.cross_entropy(trainer.net.train()(trainer.normalize(x)), y))
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(logged[0]["loss"]) and abs(logged[0]["loss"] - plain) > 1e-4   # not the unmixed batch's CE
    assert main(["eval", "--method", "msp,energy", "--in", "digits", "--runs-dir", str(runs), "--run-name", "pixmix",
                 "--out", "noise:gaussian", "--limit", "60", "--device", "cpu"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--set", "pixmix.mixing_set=null"], "train.recipe=pixmix needs a mixing set"),
    (["--set", "pixmix.mixing_set=nosuchset"], "pixmix.mixing_set: unknown dataset 'nosuchset'"),
    (["--set", "pixmix.k=-1"], "pixmix.k must be a whole number >= 0"),
    (["--set", "pixmix.beta=0"], "pixmix.beta must be a number > 0"),
    (["--set", "pixmix.aug_severity=11"], "pixmix.aug_severity must be a number in [0.1, 10]"),
    (["--set", "pixmix.mixing_resize=0.5"], "pixmix.mixing_resize must be a number >= 1"),
    (["--set", "pixmix.ks=1"], "unknown config key 'pixmix.ks'"),
])
def test_bad_pixmix_input_is_one_line_and_writes_nothing(extra, message, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert message in fails(capsys, ["train", "--method", "pixmix", *extra, "--runs-dir", str(runs), *TINY,
                                     "--set", "train.steps=1"])
    assert not runs.exists()


def test_pixmix_with_an_empty_mixing_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    runs = tmp_path / "runs"
    assert "holds no images" in fails(capsys, ["train", "--method", "pixmix", "--set",
                                               f"pixmix.mixing_set=folder:{tmp_path / 'empty'}", "--runs-dir",
                                               str(runs), *TINY, "--set", "train.steps=1"])
    assert not runs.exists()


def test_pixmix_without_usable_mixing_pictures_is_an_error():
    recipe = recipes.PixMix()
    with pytest.raises(Exception, match="has no images"):
        recipe.use_images(torch.zeros(0, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(Exception, match="no mixing set was given"):
        recipe.views_of(images(2, 1), lambda b: b)
    recipe.use_images(images(2, 3))
    with pytest.raises(Exception, match="mixing set has 3 channels"):
        recipe.views_of(images(2, 1), lambda b: b)
