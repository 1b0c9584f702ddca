"""Likelihood ratio with PixelCNN++: causality, the discretised likelihood, perturbation, selection, bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit

from oodbench.data.imageset import ImageSet
from oodbench.detectors import llr
from oodbench.errors import OODBenchError
from oodbench.nets.pixelcnnpp import PixelCNNpp, discretized_logistic_log_prob, mixture_log_prob

REPO = Path(__file__).resolve().parent.parent


def tiny_net(channels=1, hierarchies=1, mix=2, rescale=False, seed=0):
    torch.manual_seed(seed)
    return PixelCNNpp(channels, num_filters=4, num_resnet=1, num_hierarchies=hierarchies,
                      num_logistic_mix=mix, rescale=rescale).double().eval()


def per_position_params(net, x):
    """Distribution parameters of every pixel-channel, (B, 3 * K, C, H, W): mixture logit, mean, scale."""
    logits, means, scales = net.distribution(x)
    return torch.cat([logits.unsqueeze(2).expand_as(means), means, scales], dim=1)


@pytest.mark.parametrize("channels,hierarchies,rescale", [(1, 1, False), (1, 2, False), (3, 1, True), (3, 2, False)])
def test_changing_a_pixel_channel_changes_no_earlier_distribution(channels, hierarchies, rescale):
    net = tiny_net(channels, hierarchies, rescale=rescale)
    c, h, w = channels, (8 if channels == 1 else 6), (8 if channels == 1 else 6)
    x = torch.randint(0, 256, (1, c, h, w)).double()
    # One image per position k (raster order, channels within a pixel), with entry k changed: one batched forward.
    edited = x.repeat(c * h * w, 1, 1, 1)
    order = torch.arange(h * w * c).view(h, w, c).permute(2, 0, 1)        # order[c, i, j] = (i * W + j) * C + c
    flat = edited.view(c * h * w, -1)
    position_index = order.reshape(-1)                                     # flat (c, i, j) -> raster rank
    rows = torch.arange(c * h * w)
    flat[position_index, rows] = (flat[position_index, rows] + 97) % 256
    base = per_position_params(net, x)
    moved = (per_position_params(net, edited) - base).abs().amax(dim=1)     # (N, C, H, W)
    for k in range(c * h * w):
        assert moved[k][order <= k].max() == 0, f"entry {k} leaks into earlier or its own distribution"
    # ... and the dependence is real: each entry but the last changes some later distribution.
    changed_later = [(moved[k][order > k] > 0).any().item() for k in range(c * h * w - 1)]
    assert all(changed_later)


def test_discretised_logistic_sums_to_one_and_matches_direct_computation():
    values = torch.arange(256, dtype=torch.float64)
    cdf = expit                                                     # the logistic cdf
    for mean, scale in [(0.0, 0.25), (127.3, 3.0), (300.0, 40.0), (-50.0, 8.0), (254.8, 0.3), (90.0, 900.0)]:
        log_p = discretized_logistic_log_prob(values, torch.tensor(mean, dtype=torch.float64),
                                              torch.tensor(scale, dtype=torch.float64))
        assert abs(log_p.exp().sum().item() - 1) < 1e-10
        v = values.numpy()
        upper = np.where(v == 255, 1.0, cdf((v + 0.5 - mean) / scale))
        lower = np.where(v == 0, 0.0, cdf((v - 0.5 - mean) / scale))
        # right of the mean, subtract survival functions instead (no cancellation near cdf = 1)
        upper_sf = np.where(v == 0, 1.0, cdf(-(v - 0.5 - mean) / scale))
        lower_sf = np.where(v == 255, 0.0, cdf(-(v + 0.5 - mean) / scale))
        direct = np.where(v > mean, upper_sf - lower_sf, upper - lower)
        ok = direct > 1e-12
        np.testing.assert_allclose(log_p.numpy()[ok], np.log(direct[ok]), rtol=1e-9, atol=1e-9)


def test_model_log_prob_matches_a_direct_rgb_computation():
    net = tiny_net(channels=3, mix=2, rescale=True, seed=3)
    with torch.no_grad():  # coefficients of a trained-net size (x 255 they still move the means by ~1 unit)
        for k in range(2):
            net.out.weight[k * 10 + 7:k * 10 + 10] *= 0.01
            net.out.bias[k * 10 + 7:k * 10 + 10] *= 0.01
    x = torch.randint(0, 256, (2, 3, 5, 5)).double()
    out = net.raw_output(x).detach().view(2, 2, 10, 5, 5).numpy()           # per component: logit, 3 means, 3 scales, 3 coeffs
    cdf = expit                                                     # the logistic cdf
    softplus = lambda z: np.log1p(np.exp(z))  # noqa: E731
    expected = np.zeros((2, 5, 5))
    for b in range(2):
        for i in range(5):
            for j in range(5):
                logits = out[b, :, 0, i, j]
                total = 0.0
                for k in range(2):
                    m = out[b, k, 1:4, i, j].copy()
                    s = (softplus(out[b, k, 4:7, i, j]) + math.exp(-7)) * 127.5
                    a = out[b, k, 7:10, i, j]                           # raw coefficients (the original)
                    r, g = x[b, 0, i, j].item(), x[b, 1, i, j].item()   # raw 0..255 values, not rescaled
                    m[1] += a[0] * r                                    # g depends on r
                    m[2] += a[1] * r + a[2] * g                         # b depends on r and g
                    m = (m + 1) * 127.5
                    p = 1.0
                    for ch in range(3):
                        v = x[b, ch, i, j].item()
                        hi = 1.0 if v == 255 else cdf((v + 0.5 - m[ch]) / s[ch])
                        lo = 0.0 if v == 0 else cdf((v - 0.5 - m[ch]) / s[ch])
                        p *= hi - lo
                    total += np.exp(logits[k]) / np.exp(logits).sum() * p
                expected[b, i, j] = np.log(total)
    got = net.log_prob_per_pixel(x).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(net(x).detach().numpy(), expected.sum(axis=(1, 2)), rtol=1e-9)


def test_mixture_of_one_channel_sums_to_one_over_the_256_values():
    torch.manual_seed(0)
    logits, means, scales = torch.randn(1, 3, 1, 1), torch.rand(1, 3, 1, 1, 1) * 255, torch.rand(1, 3, 1, 1, 1) * 20
    values = torch.arange(256.).view(256, 1, 1, 1)
    log_p = mixture_log_prob(values, logits.expand(256, -1, -1, -1), means.expand(256, -1, -1, -1, -1),
                             scales.expand(256, -1, -1, -1, -1) + 0.25)
    assert abs(log_p.exp().sum().item() - 1) < 1e-5


# --- perturbation and the loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.1, 0.3, 1.0])
def test_perturbation_rate_is_mu_within_sampling_error(rate):
    torch.manual_seed(1)
    x = torch.full((64, 3, 32, 32), 7, dtype=torch.uint8)
    out = llr.mutate(x, rate)
    assert out.dtype == torch.uint8 and out.device == x.device
    n = x.numel()
    changed = (out != x).double().mean().item()
    expected = rate * 255 / 256                 # a replacement draws the old value again with probability 1/256
    assert abs(changed - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-12
    # replacements are uniform on 0..255
    replaced = out[out != x].double()
    assert abs(replaced.mean().item() - 127.5) < 4 * 74 / math.sqrt(len(replaced))
    # redrawn at every read
    assert not torch.equal(llr.mutate(x, rate), out)


def test_no_perturbation_at_rate_zero():
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(llr.mutate(x, 0.0), x)


def test_background_loss_perturbs_training_batches_and_adds_l2_on_weights_only():
    net = tiny_net().float()
    x = torch.randint(0, 256, (4, 1, 6, 6), dtype=torch.uint8)
    clean = llr.likelihood_loss(0.0, 0.0)
    assert clean(net, (x, None))[0].item() == clean(net, (x, None))[0].item() == -net(x).mean().item()
    noisy = llr.likelihood_loss(0.5, 0.0)
    assert noisy(net, (x, None))[0].item() != noisy(net, (x, None))[0].item()
    weights = sum((m.weight ** 2).sum() for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert torch.isclose(llr.l2_penalty(net), weights)
    torch.manual_seed(5)
    with_l2 = llr.likelihood_loss(0.0, 10.0)(net, (x, None))[0]
    assert torch.isclose(with_l2, -net(x).mean() + 10 * weights)


def make_state(channels=1, seed=0):
    fg, bg = tiny_net(channels, seed=seed).float(), tiny_net(channels, seed=seed + 1).float()
    return {"net": {"in_channels": channels, "num_filters": 4, "num_resnet": 1, "num_hierarchies": 1,
                    "num_logistic_mix": 2, "dropout_p": 0.0, "rescale": False},
            "fg": fg.state_dict(), "bg": bg.state_dict(), "selected": {"mutation_rate": 0.1, "reg_weight": 0.0},
            "selection": [], "likelihood_val_auroc": None}, fg, bg


def test_scores_use_clean_images_and_rows_have_the_right_sign():
    state, fg, bg = make_state()
    det = llr.LikelihoodRatio({"llr": {}}, "cpu")
    det.load_state_dict(state)
    x = torch.randint(0, 256, (5, 1, 6, 6), dtype=torch.uint8)
    rows = det.score_rows(x)
    again = det.score_rows(x)
    with torch.no_grad():
        lp_fg, lp_bg = fg(x), bg(x)
    assert set(rows) == {"llr", "likelihood", "_bpd"}
    torch.testing.assert_close(rows["llr"], -(lp_fg - lp_bg))
    torch.testing.assert_close(rows["likelihood"], -lp_fg)
    torch.testing.assert_close(rows["_bpd"], -lp_fg / (36 * math.log(2)))
    for k in rows:
        assert torch.equal(rows[k], again[k])                       # no perturbation at scoring time
    torch.testing.assert_close(llr.log_prob(fg, x, 2), lp_fg)        # the helper used for validation: clean too
    base = llr.Likelihood({"llr": {}}, "cpu")
    base.load_state_dict(state)
    assert set(base.score_rows(x)) == {"likelihood", "_bpd"}
    torch.testing.assert_close(base.score(x), -lp_fg)


# --- bad input ---------------------------------------------------------------------------------------------------
class NoTraining:
    device, run_dir, is_main = torch.device("cpu"), Path("."), True

    def fit(self, *a, **k):
        raise AssertionError("training must not start on bad input")


def base_cfg(**llr_options):
    options = {"mutation_rates": [0.1], "reg_weights": [0.0], "val_ood": None, "val_limit": 50,
               "eval_batch_size": 64, **llr_options}
    return {"seed": 0, "data": {"in": "synthetic", "root": None},
            "model": {"num_filters": 4, "num_resnet": 1, "num_hierarchies": 1, "num_logistic_mix": 1,
                      "dropout_p": 0.0, "rescale_pixel_value": False},
            "train": {"steps": 6, "batch_size": 8, "lr": 2e-3, "ckpt_every": 3, "eval_every": 3, "log_every": 3},
            "llr": options}


@pytest.mark.parametrize("options,message", [
    ({"mutation_rates": [0.1, 1.5]}, "mutation_rates"),
    ({"mutation_rates": [-0.1]}, "mutation_rates"),
    ({"reg_weights": [0.0, -1.0]}, "negative"),
    ({"mutation_rates": [0.1, 0.2], "val_ood": None}, "validation"),
    ({"mutation_rates": []}, "at least one"),
    ({"background_l2": "nope"}, "background_l2"),
    ({"fg_checkpoint": "last"}, "fg_checkpoint"),
])
def test_bad_options_fail_before_training(options, message):
    images = ImageSet(torch.randint(0, 256, (20, 1, 6, 6), dtype=torch.uint8))
    det = llr.LikelihoodRatio(base_cfg(**options), "cpu")
    with pytest.raises(OODBenchError, match=message):
        det.train(images, images, NoTraining())


def test_images_that_are_not_8bit_are_rejected():
    with pytest.raises(OODBenchError, match="8-bit"):
        llr.check_8bit(torch.rand(2, 1, 4, 4), "x")
    with pytest.raises(OODBenchError, match="8-bit"):
        llr.check_8bit(torch.full((2, 1, 4, 4), 300.0), "x")
    llr.check_8bit(torch.full((2, 1, 4, 4), 200.0), "x")
    state, _, _ = make_state()
    det = llr.LikelihoodRatio({"llr": {}}, "cpu")
    det.load_state_dict(state)
    with pytest.raises(OODBenchError, match="8-bit"):
        det.score_rows(torch.rand(2, 1, 6, 6))


# --- fit through the engine ----------------------------------------------------------------------------------------
def blobs(n, bright, seed):
    """Dark images with a bright square (ID) — a pattern a tiny PixelCNN learns in a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 30, (n, 1, 6, 6), generator=g, dtype=torch.uint8)
    x[:, :, 2:4, 2:4] = bright
    return x


def test_fit_trains_fg_and_grid_selects_on_validation_pair_and_keeps_table(tmp_path, monkeypatch):
    engine_mod = pytest.importorskip("oodbench.engine")
    import oodbench.data as data

    ood = ImageSet(torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8), name="valood")
    seen = {}

    def fake_load(spec, split="test", root=None, device="cpu", like=None):
        seen.update(spec=spec, split=split, like=like)
        return ood

    monkeypatch.setattr(data, "load", fake_load, raising=False)
    train, val = ImageSet(blobs(64, 220, 0)), ImageSet(blobs(40, 220, 1))
    cfg = base_cfg(mutation_rates=[0.0, 0.3], reg_weights=[0.0], val_ood="hflip:{in}_other")
    engine = engine_mod.Engine(run_dir=tmp_path, device="cpu", seed=0)
    det = llr.LikelihoodRatio(cfg, "cpu")
    det.train(train, val, engine)
    assert seen == {"spec": "hflip:synthetic_other", "split": "train", "like": (1, 6, 6)}  # never a test split
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["bg-mu0-l0", "bg-mu0.3-l0", "fg"]
    assert not list(tmp_path.glob("llr_selection*"))   # a detector writes no files: the workflow writes its artifacts
    files = det.artifacts()
    assert sorted(files) == ["llr_selection.csv", "llr_selection.json"]
    table = json.loads(files["llr_selection.json"])
    assert [(r["mutation_rate"], r["reg_weight"]) for r in table["table"]] == [(0.0, 0.0), (0.3, 0.0)]
    aurocs = [r["val_auroc"] for r in table["table"]]
    assert all(0 <= a <= 1 for a in aurocs)
    best = table["table"][int(np.argmax(aurocs))]
    assert table["selected"] == {"mutation_rate": best["mutation_rate"], "reg_weight": best["reg_weight"]}
    assert table["val_ood"] == "hflip:synthetic_other"
    assert files["llr_selection.csv"].count("\n") == 3
    # the state restores exactly the selected scorer
    x = val.images[:8]
    rows = det.score_rows(x)
    again = llr.LikelihoodRatio(cfg, "cpu")
    again.load_state_dict(torch.load(_save(det.state_dict(), tmp_path), weights_only=True))
    for k, v in again.score_rows(x).items():
        torch.testing.assert_close(v, rows[k])
    assert again.selection == det.selection
    assert again.artifacts() == files                  # the table is part of the state


def test_train_writes_the_selection_table_into_the_run_folder(tmp_path):
    """The workflow (workflow.train) writes a detector's `artifacts()` next to detector.pt, on the main rank."""
    from oodbench import workflow

    overrides = ["data.limit=60", "model.num_filters=2", "model.num_resnet=1", "train.steps=2",
                 "train.batch_size=8", "train.eval_every=1000", "train.ckpt_every=1000", "llr.val_ood=vflip:{in}",
                 "llr.mutation_rates=[0.1,0.3]", "llr.reg_weights=[0]", "llr.eval_batch_size=32"]
    run = workflow.train("llr", "digits", overrides=overrides, runs_dir=str(tmp_path), device="cpu")
    table = json.loads((run.path / "llr_selection.json").read_text())
    assert [(r["mutation_rate"], r["reg_weight"]) for r in table["table"]] == [(0.1, 0.0), (0.3, 0.0)]
    assert table["val_ood"] == "vflip:digits"
    csv_lines = (run.path / "llr_selection.csv").read_text().splitlines()
    assert csv_lines[0] == "mutation_rate,reg_weight,val_auroc,selected" and len(csv_lines) == 3
    assert table == json.loads(run.prepare("llr", device="cpu").det.artifacts()["llr_selection.json"])


def test_validation_ood_derived_from_the_in_distribution_set_is_its_validation_split(tmp_path, monkeypatch):
    """gray:<in> is the grayscale validation tail (the original's CIFAR-10 selection set), not the test split."""
    engine_mod = pytest.importorskip("oodbench.engine")
    import oodbench.data as data

    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("no dataset may be loaded for gray:{in}"))
    g = torch.Generator().manual_seed(0)
    train = ImageSet(torch.randint(0, 256, (24, 3, 4, 4), generator=g, dtype=torch.uint8))
    val = ImageSet(torch.randint(0, 256, (10, 3, 4, 4), generator=g, dtype=torch.uint8))
    cfg = base_cfg(val_ood="gray:{in}", val_limit=None)
    det = llr.LikelihoodRatio(cfg, "cpu")
    got = det.load_val_ood(train, val, engine_mod.Engine(run_dir=tmp_path, device="cpu", seed=0))
    from oodbench.data import convert

    assert torch.equal(got.images, convert.gray(val.images)) and det.val_ood_spec == "gray:synthetic"


def test_selection_sets_never_come_from_a_test_split():
    from oodbench.data.validation import derived_from, validation_ood

    val = ImageSet(torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8))
    asked = []

    def train_split(spec, like):
        asked.append(spec)
        return val

    assert derived_from("gray:vflip:cifar10", "cifar10") == ["gray", "vflip"]
    assert derived_from("gray:svhn", "cifar10") is None
    flipped = validation_ood("hflip:vflip:fashion_mnist", "fashion_mnist", val, train_split, (1, 4, 4))
    assert torch.equal(flipped.images, val.images.flip(-2).flip(-1)) and asked == []
    validation_ood("gray:mnist", "fashion_mnist", val, train_split, (1, 4, 4))
    assert asked == ["gray:mnist"]                                  # another dataset: its training split
    with pytest.raises(OODBenchError, match="validation split, which is empty"):
        validation_ood("gray:cifar10", "cifar10", ImageSet(val.images[:0]), train_split, (1, 4, 4))
    with pytest.raises(OODBenchError, match="test split is never used"):
        validation_ood("classes:0,1:cifar10", "cifar10", val, train_split, (1, 4, 4))


def test_default_validation_tail_is_the_originals_20_percent():
    from oodbench import config as configs

    cfg = configs.read_yaml(configs.config_path("llr"))
    assert cfg["data"]["val_fraction"] == 0.2 and cfg["llr"]["val_limit"] is None   # the whole tail selects


def _save(state, folder):
    path = folder / "state.pt"
    torch.save(state, path)
    return path


# --- end to end through the CLI ------------------------------------------------------------------------------------
def test_cli_trains_and_evaluates_llr_and_likelihood_on_a_fashion_mnist_subset(tmp_path):
    run = [sys.executable, "-m", "oodbench"]
    where = ["--method", "llr", "--in", "fashion_mnist", "--runs-dir", str(tmp_path)]
    train = where + ["--preset", "quick", "--set", "data.limit=1200", "--set", "train.steps=30",
                     "--set", "llr.val_limit=100", "--set", "llr.mutation_rates=[0.2]",
                     "--set", "llr.reg_weights=[0,10]"]
    env = {**os.environ, "OODBENCH_PROGRESS": "0"}
    subprocess.run(run + ["train"] + train, check=True, cwd=REPO, env=env, timeout=900)
    table = json.loads(next(tmp_path.rglob("llr_selection.json")).read_text())
    assert [(r["mutation_rate"], r["reg_weight"]) for r in table["table"]] == [(0.2, 0.0), (0.2, 10.0)]
    out = subprocess.run(run + ["eval"] + where + ["--out", "noise:uniform", "--limit", "200", "--format", "json"],
                         check=True, cwd=REPO, env=env, timeout=900, capture_output=True, text=True).stdout
    rows = {r["method"]: r for r in json.loads(out)}
    assert set(rows) == {"llr", "likelihood"}
    assert rows["likelihood"]["auroc"] > 0.9          # uniform noise is far less likely than clothing
    for row in rows.values():                           # bits per dimension of both sets beside each row
        assert 0 < row["id_bpd"] < row["out_bpd"]     # uniform noise costs more bits than clothing
