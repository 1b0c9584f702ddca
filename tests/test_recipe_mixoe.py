"""MixOE (Zhang et al., WACV 2023): equal to a transcription of OpenOOD v1.5's mixoe_trainer.py; its defining
properties; a CLI run and its bad-input errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodbench.detectors import recipes
from oodbench.nets.classifiers import build_classifier

from conftest import fails
from test_recipes import TINY, train_cli


# -- a transcription of openood/trainers/mixoe_trainer.py, written from reading it ----------------------------------
def openood_rand_bbox(size, lam, cx, cy):
    """rand_bbox with its two np.random.randint draws given (cx along size[2], cy along size[3])."""
    W, H = size[2], size[3]
    cut_rat = np.sqrt(1. - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    bbx1, bby1 = np.clip(cx - cut_w // 2, 0, W), np.clip(cy - cut_h // 2, 0, H)
    bbx2, bby2 = np.clip(cx + cut_w // 2, 0, W), np.clip(cy + cut_h // 2, 0, H)
    return bbx1, bby1, bbx2, bby2


def openood_mixoe_loss(net, x, y, oe_x, lam, mix_op, cx, cy, lambda_oe, num_classes):
    """MixOETrainer.train_epoch's loss for one batch, its Beta draw `lam` and randint draws given."""
    one_hot_y = torch.zeros(x.size(0), num_classes).scatter_(1, y.view(-1, 1), 1)
    id_loss = F.cross_entropy(net(x), y)
    if mix_op == "cutmix":
        mixed_x = x.clone().detach()
        bbx1, bby1, bbx2, bby2 = openood_rand_bbox(x.size(), lam, cx, cy)
        lam = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / (x.size()[-1] * x.size()[-2]))
        mixed_x[:, :, bbx1:bbx2, bby1:bby2] = oe_x[:, :, bbx1:bbx2, bby1:bby2]
    else:
        mixed_x = lam * x + (1 - lam) * oe_x
    oe_y = torch.ones(oe_x.size(0), num_classes) / num_classes
    soft_labels = lam * one_hot_y + (1 - lam) * oe_y
    mixed_loss = torch.mean(torch.sum(-soft_labels * net(mixed_x).log_softmax(dim=-1), dim=-1))
    return id_loss + lambda_oe * mixed_loss


def setup(seed=0, n=6, c=5, size=10):
    torch.manual_seed(seed)
    net = build_classifier("small_cnn", 1, c, width=4).eval()   # eval: BatchNorm uses no batch statistics
    x, oe = torch.randn(n, 1, size, size), torch.randn(n + 3, 1, size, size)
    return net, x, oe, torch.randint(0, c, (n,))


@pytest.mark.parametrize("mix_op, lam, cy, cx", [("cutmix", 0.37, 4, 7), ("cutmix", 0.05, 0, 9),
                                                 ("cutmix", 0.9, 9, 0), ("mixup", 0.37, 0, 0)])
def test_mixoe_batch_and_loss_equal_openood(mix_op, lam, cy, cx):
    net, x, oe, y = setup()
    mixed, lam_used = recipes.mixoe_batch(x, oe[:len(x)], lam, mix_op, cy, cx)
    loss, stats = recipes.mixoe_loss(net(x), net(mixed), y, lam_used, 1.0)
    # OpenOOD's first box axis is size[2] (ours the height: cy), its second size[3] (cx)
    expected = openood_mixoe_loss(net, x, y, oe[:len(x)], lam, mix_op, cy, cx, 1.0, 5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_recipe_loss_draws_lam_and_the_box_and_equals_openood():
    net, x, oe, y = setup(seed=1)
    recipe = recipes.MixOE(outliers="glyphs")
    model = recipes.RecipeNet(net, recipe).eval()
    torch.manual_seed(5)
    loss, stats = recipe.loss(model, torch.cat([x, oe]), y)
    torch.manual_seed(5)                    # the same draws: lam ~ Beta(0.1, 1), then the patch centre
    lam = float(torch.distributions.Beta(0.1, 1.0).sample())
    cy, cx = int(torch.randint(10, ())), int(torch.randint(10, ()))
    expected = openood_mixoe_loss(net, x, y, oe[:len(x)], lam, "cutmix", cy, cx, 1.0, 5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)   # eval mode: one pass equals OpenOOD's two


def test_defining_properties():
    net, x, oe, y = setup(seed=2)
    # cutmix: lam is the exact share of ID pixels left, and outside the patch the image is the ID image
    mixed, lam = recipes.mixoe_batch(x, oe[:len(x)], 0.4, "cutmix", 5, 5)
    from_id = (mixed == x).all(dim=1).float().mean().item()
    assert from_id == pytest.approx(lam, abs=1e-6) and 0 < lam < 1
    # mixup with lam 0: the mixed images are the outliers and their target the uniform distribution (classic OE)
    z_id, z_oe = net(x), net(oe[:len(x)])
    mixed, _ = recipes.mixoe_batch(x, oe[:len(x)], 0.0, "mixup", 0, 0)
    torch.testing.assert_close(mixed, oe[:len(x)])
    _, stats = recipes.mixoe_loss(z_id, z_oe, y, 0.0, 1.0)
    torch.testing.assert_close(stats["mixoe"], recipes.uniform_ce(z_oe))
    # lam 1: the mixed term is the ID cross-entropy again
    _, stats = recipes.mixoe_loss(z_id, z_id, y, 1.0, 1.0)
    torch.testing.assert_close(stats["mixoe"], F.cross_entropy(z_id, y))


def test_cli_run_trains_with_outliers_and_logs_the_mixed_term(tmp_path):
    run = train_cli(tmp_path / "runs", "mixoe", 2, "mixoe", "--set", "mixoe.outliers=glyphs",
                    "--set", "mixoe.outlier_batch=16")
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"step"' in line]
    assert len(logged) == 2 and all(r["mixoe"] > 0 and 0 <= r["lam"] <= 1 for r in logged)


@pytest.mark.parametrize("extra, message", [
    ([], "needs auxiliary outliers"),
    (["--set", "mixoe.outliers=glyphs", "--set", "mixoe.outlier_batch=8"], "must be >= train.batch_size"),
    (["--set", "mixoe.outliers=glyphs", "--set", "mixoe.mix_op=paste"], "cutmix or mixup"),
    (["--set", "mixoe.outliers=glyphs", "--set", "mixoe.alpha=0"], "mixoe.alpha must be a number > 0"),
])
def test_bad_input_is_one_line_before_training(extra, message, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert message in fails(capsys, ["train", "--method", "mixoe", "--runs-dir", str(runs), *TINY,
                                     "--set", "train.steps=1", *extra])
    assert not runs.exists() or not any(runs.rglob("*.pt"))
