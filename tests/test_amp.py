"""AMP (neural network anchoring): the anchored forward, the calibration and score math, training, bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oodbench.data.imageset import ImageSet
from oodbench.detectors import amp
from oodbench.errors import OODBenchError
from oodbench.nets.anchoring import Anchored, anchor_corruption, build_anchored
from oodbench.nets.classifiers import build_classifier

ROOT = Path(__file__).resolve().parents[1]



def tiny_anchored(channels=1, classes=5, seed=0):
    torch.manual_seed(seed)
    return build_anchored("small_cnn", channels, classes, width=8).eval()


def digits(n=None):
    """scikit-learn's handwritten digits as a uint8 ImageSet (N, 1, 8, 8), 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target).long()
    return ImageSet(images[:n], labels[:n], "digits")


def amp_cfg(k=3, score="xent", anchors="fixed", **train_opts):
    train = {"anchor_sampling": "per_batch", "corrupt_every": 5, "pool_size": 16, "augment": "none",
             "crop_padding": 1, "steps": 30, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
             "weight_decay": 5e-4, "schedule": "constant", "ckpt_every": 1000, "log_every": 1000}
    train.update(train_opts)
    return {"seed": 0, "model": {"arch": "small_cnn", "width": 8, "dropout": 0.0}, "train": train,
            "amp": {"k": k, "score": score, "anchors": anchors}}


# ---- the anchored network ---------------------------------------------------------------------------------------

def test_batched_k_anchor_forward_equals_k_separate_forwards():
    model = tiny_anchored(channels=2)
    x, anchors = torch.randn(4, 2, 12, 12), torch.randn(3, 2, 12, 12)
    with torch.no_grad():
        batched = model.logits_per_anchor(x, anchors)
        separate = torch.stack([model(x, anchors[k:k + 1]) for k in range(3)])
        by_hand = torch.stack([model.net(torch.cat([a.expand_as(x), x - a], 1)) for a in anchors])
        sliced = model.logits_per_anchor(x, anchors, max_batch=5)  # slices that cut across anchors
    assert batched.shape == (3, 4, 5)
    torch.testing.assert_close(sliced, batched, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, by_hand, rtol=1e-5, atol=1e-5)


def test_anchored_input_is_anchor_then_residual():
    seen = {}

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(2, 1, 1)

        def forward(self, z):
            seen["z"] = z
            return z.flatten(1)[:, :3]

    x, c = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    Anchored(Probe(), 1)(x, c)
    torch.testing.assert_close(seen["z"], torch.cat([c, x - c], 1))


def test_identical_anchors_give_zero_sigma_and_temperature_two():
    model = tiny_anchored()
    x = torch.randn(6, 1, 10, 10)
    anchors = torch.randn(1, 1, 10, 10).repeat(5, 1, 1, 1)
    with torch.no_grad():
        logits = model.logits_per_anchor(x, anchors)
    assert torch.sigmoid(logits).std(0).abs().max() < 1e-6
    z, temperature = amp.calibrate(logits)
    torch.testing.assert_close(temperature, torch.full((6,), 2.0))
    torch.testing.assert_close(z, logits[0] / 2)


def test_calibration_and_scores_equal_hand_computation():
    rows = [[[1.0, 2.0, -1.0], [0.5, 0.0, 2.0]],   # anchor 0: image 0, image 1
            [[3.0, 2.0, 0.0], [0.5, -1.0, 1.0]]]   # anchor 1
    logits = torch.tensor(rows, dtype=torch.float64)
    z, temperature = amp.calibrate(logits)
    scores = amp.ood_scores(z)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    for b in range(2):
        a0, a1 = rows[0][b], rows[1][b]
        mu = [(p + q) / 2 for p, q in zip(a0, a1)]
        sigma = [abs(sig(p) - sig(q)) / math.sqrt(2) for p, q in zip(a0, a1)]  # unbiased std of two values
        t = 1 + math.exp(sum(sigma) / 3)
        zz = [m / t for m in mu]
        lse = math.log(sum(math.exp(v) for v in zz))
        probs = [math.exp(v - lse) for v in zz]
        assert temperature[b].item() == pytest.approx(t, abs=1e-12)
        assert z[b].tolist() == pytest.approx(zz, abs=1e-12)
        assert scores["xent"][b].item() == pytest.approx(-(lse - sum(zz) / 3), abs=1e-12)
        assert scores["energy"][b].item() == pytest.approx(-lse, abs=1e-12)
        assert scores["entropy"][b].item() == pytest.approx(-sum(p * math.log(p) for p in probs), abs=1e-12)
        assert scores["msp"][b].item() == pytest.approx(-max(probs), abs=1e-12)


def test_scores_rank_confident_logits_as_less_ood():
    confident = torch.tensor([[[8.0, 0.0, 0.0]], [[8.0, 0.0, 0.0]]])
    unsure = torch.tensor([[[1.0, 0.5, 0.0]], [[0.0, 1.0, 0.5]]])
    s_conf, s_unsure = (amp.ood_scores(amp.calibrate(t)[0]) for t in (confident, unsure))
    for name in amp.SCORE_TYPES:
        assert s_conf[name].item() < s_unsure[name].item(), name


# ---- anchor corruption and the training step ------------------------------------------------------------------

def test_corruption_is_one_draw_per_batch_on_normalised_tensors():
    """torchvision on a batched tensor: every image gets the same crop/flip/jitter/blur/gray (as the original)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16).repeat(6, 1, 1, 1)   # normalised values, negative ones included
    ys = [anchor_corruption(16, 16)(x) for _ in range(30)]
    assert all(y.shape == x.shape for y in ys)
    assert all(torch.equal(y[0], y[i]) for y in ys for i in range(6))
    assert any(not torch.allclose(y, x) for y in ys)
    assert any(y.min() < 0 for y in ys) and any(y.min() == 0 for y in ys)  # jitter clamps at 0 when drawn


def test_corrupted_step_keeps_the_clean_anchor_in_the_residual(monkeypatch):
    """On a corrupted step the network sees cat([corrupt(c), x - c]); on the others cat([c, x - c])."""
    model = tiny_anchored(classes=10).train()
    seen = []
    model.net.forward = lambda inp: seen.append(inp) or torch.zeros(inp.shape[0], 10, requires_grad=True)
    monkeypatch.setattr(amp, "anchor_corruption", lambda h, w: (lambda a: a + 100.0))
    x = torch.randint(0, 256, (12, 1, 10, 10), dtype=torch.uint8)
    y = torch.randint(0, 10, (12,))
    xn = (x.float() / 255 - 0.5) / 0.25
    for sampling in amp.ANCHOR_SAMPLING:
        seen.clear()
        loss_fn = amp.anchored_loss([0.5], [0.25], sampling, corrupt_every=5, augment="none")
        model.train_steps.zero_()
        for _ in range(6):
            loss_fn(model, (x, y))
        for step, inp in enumerate(seen):
            ref, resid = inp[:, :1], inp[:, 1:]
            clean = xn - resid                                   # the anchor used in the residual
            assert any(torch.allclose(clean[0], v, atol=1e-5) for v in xn)       # a real, uncorrupted image
            torch.testing.assert_close(ref, clean + (100.0 if step % 5 == 0 else 0.0))
        if sampling == "per_batch":
            assert torch.allclose((xn - seen[1][:, 1:]).std(0), torch.zeros(1, 10, 10), atol=1e-5)  # one anchor


def test_loss_samples_anchors_from_the_batch():
    seen = []
    model = tiny_anchored(classes=10).train()
    forward = model.forward
    model.forward = lambda x, anchors, residual: seen.append(residual) or forward(x, anchors, residual)
    x = torch.randint(0, 256, (12, 1, 10, 10), dtype=torch.uint8)
    y = torch.randint(0, 10, (12,))
    xn = (x.float() / 255 - 0.5) / 0.25
    amp.anchored_loss([0.5], [0.25], "per_batch", corrupt_every=0, augment="none")(model, (x, y))
    assert seen[-1].shape[0] == 1 and any(torch.allclose(seen[-1][0], v, atol=1e-5) for v in xn)
    seen.clear()
    loss, _ = amp.anchored_loss([0.5], [0.25], "per_sample", corrupt_every=0, augment="none")(model, (x, y))
    assert seen[0].shape == xn.shape
    dist = torch.cdist(seen[0].flatten(1), xn.flatten(1))  # anchors are the batch itself, shuffled
    assert dist.min(1).values.max() < 1e-4 and sorted(dist.argmin(1).tolist()) == list(range(12))
    assert int(model.train_steps) == 2 and torch.isfinite(loss)


@pytest.mark.parametrize("sampling", ["per_batch", "per_sample"])
def test_anchored_training_reaches_plain_classifier_accuracy(tmp_path, sampling):
    from oodbench.data import transforms
    from oodbench.engine import Engine, TrainSpec

    data = digits()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=g)
    train, test = data.subset(order[:1400]), data.subset(order[1400:])
    mean, std = amp.channel_stats(train.images)
    spec = TrainSpec(steps=200, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                     schedule="cosine", ckpt_every=10_000, log_every=10_000)
    engine = Engine(run_dir=tmp_path, device="cpu", seed=0)
    xt = transforms.normalize(transforms.to_unit(test.images), mean, std)

    def plain_loss(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(transforms.normalize(transforms.to_unit(x), mean, std)), y)

    torch.manual_seed(0)
    plain = engine.fit("plain", build_classifier("small_cnn", 1, 10, width=16), plain_loss, train, spec)
    torch.manual_seed(0)
    anchored = engine.fit("anchored", build_anchored("small_cnn", 1, 10, width=16),
                          amp.anchored_loss(mean, std, sampling, 5, augment="none"), train, spec)
    pool = transforms.normalize(transforms.to_unit(train.images[:5]), mean, std)
    with torch.no_grad():
        acc_plain = (plain(xt).argmax(1) == test.labels).float().mean().item()
        acc_anchored = (anchored.logits_per_anchor(xt, pool).mean(0).argmax(1) == test.labels).float().mean().item()
    assert acc_plain > 0.85
    assert acc_anchored > acc_plain - 0.03, (acc_anchored, acc_plain)  # seen: 0.990 plain, 0.985 / 0.995


# ---- the detector -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from oodbench.engine import Engine

    data = digits(600)
    det = amp.AMP(amp_cfg(), "cpu")
    det.train(data.subset(slice(0, 500)), data.subset(slice(500, 600)), Engine(tmp_path_factory.mktemp("amp"), "cpu", 0))
    return det, data


def test_detector_scores_are_reproducible_and_batch_independent(fitted, tmp_path):
    det, data = fitted
    x = data.images[500:540]
    rows = det.score_rows(x)
    again = det.score_rows(x)
    assert set(rows) == {"amp", "amp-energy", "amp-entropy", "amp-msp", "_temperature"}
    for name in rows:
        assert torch.equal(rows[name], again[name])
    torch.testing.assert_close(det.score_rows(x[:7])["amp"], rows["amp"][:7])
    torch.testing.assert_close(det.score(x), rows["amp"])
    # state round trip through torch.save / weights_only load: same pool, same net, same scores
    torch.save(det.state_dict(), tmp_path / "amp.pt")
    other = amp.AMP(amp_cfg(), "cpu")
    other.load_state_dict(torch.load(tmp_path / "amp.pt", weights_only=True))
    torch.testing.assert_close(other.score_rows(x)["amp"], rows["amp"])
    assert torch.all(rows["_temperature"] >= 2) and torch.all(rows["_temperature"] < 1 + math.e)


def test_pool_is_seeded_and_score_option_selects_row(fitted):
    det, data = fitted
    g = torch.Generator().manual_seed(0)
    expected = data.images[:500][torch.randperm(500, generator=g)[:16]]
    assert torch.equal(det.state["pool"], expected)
    energy = amp.AMP(amp_cfg(score="energy"), "cpu")
    energy.load_state_dict(det.state_dict())
    x = data.images[500:520]
    rows, erows = det.score_rows(x), energy.score_rows(x)
    torch.testing.assert_close(erows["amp"], rows["amp-energy"])
    torch.testing.assert_close(erows["amp-xent"], rows["amp"])


def _fresh(det, data, mode, k=3):
    other = amp.AMP(amp_cfg(k=k, anchors=mode), "cpu")
    other.load_state_dict(det.state_dict())
    other.use_training_images(data.subset(slice(0, 500)))   # as the workflow hands it over
    return other


def _which_training_images(det, anchors):
    train = det.training_images.images
    flat = det._normalise(train).flatten(1)
    dist = torch.cdist(anchors.reshape(-1, flat.shape[1]), flat, compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.min(1).values.max() < 1e-4          # every anchor is a (normalised) training image
    return dist.argmin(1).view(anchors.shape[:-3])


@pytest.mark.parametrize("mode", ["shared", "per_image"])
def test_fresh_anchors_per_batch_are_seeded_training_images(fitted, mode):
    """shared (paper-era): K distinct training anchors per batch, shared by its images; per_image (HEAD): K per
    image from one pool of train.pool_size per batch. Same batch -> same anchors; another batch -> others."""
    det, data = fitted
    fresh = _fresh(det, data, mode)
    x, other = data.images[500:540], data.images[540:580]
    a = fresh.anchors_for(x)
    assert torch.equal(a, fresh.anchors_for(x))
    assert not torch.equal(a, fresh.anchors_for(other))
    idx = _which_training_images(fresh, a)
    if mode == "shared":
        assert a.shape == (3, 1, 8, 8) and len(set(idx.tolist())) == 3
    else:
        assert a.shape == (3, 40, 1, 8, 8) and len(set(idx.flatten().tolist())) <= 16  # one pool of 16
        assert len({tuple(idx[:, b].tolist()) for b in range(40)}) > 20               # anchors differ by image
    rows = fresh.score_rows(x)
    with torch.no_grad():
        logits = fresh.model.logits_per_anchor(fresh._normalise(x), a)
    torch.testing.assert_close(rows["amp"], amp.ood_scores(amp.calibrate(logits)[0])["xent"])
    seeded = amp.AMP({**amp_cfg(k=3, anchors=mode), "seed": 1}, "cpu")
    seeded.load_state_dict(det.state_dict())
    seeded.use_training_images(fresh.training_images)
    assert not torch.equal(seeded.anchors_for(x), a)              # the run's seed is part of the draw


def test_fresh_anchors_need_the_training_split_and_a_known_mode(fitted):
    det, data = fitted
    alone = amp.AMP(amp_cfg(anchors="shared"), "cpu")
    alone.load_state_dict(det.state_dict())
    with pytest.raises(OODBenchError, match="training split"):
        alone.score_rows(data.images[:4])
    bad = _fresh(det, data, "per_pixel")
    with pytest.raises(OODBenchError, match="amp.anchors 'per_pixel'"):
        bad.score_rows(data.images[:4])


def test_default_anchor_mode_is_the_paper_era_one():
    from oodbench import config as configs

    assert configs.read_yaml(configs.config_path("amp"))["amp"]["anchors"] == "shared"


def test_accuracy_matches_argmax_of_anchor_mean(fitted):
    det, data = fitted
    held = data.subset(slice(500, 600))
    acc = det.accuracy(held, batch_size=33)
    expected = (det.anchor_logits(held.images).mean(0).argmax(1) == held.labels).float().mean().item()
    assert acc == pytest.approx(expected)


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_k_larger_than_pool_is_an_error(fitted):
    det, data = fitted
    big = amp.AMP(amp_cfg(k=17), "cpu")  # the pool holds 16
    big.load_state_dict(det.state_dict())
    with pytest.raises(OODBenchError, match="larger than the anchor pool"):
        big.score_rows(data.images[:4])
    one = amp.AMP(amp_cfg(k=1), "cpu")
    one.load_state_dict(det.state_dict())
    with pytest.raises(OODBenchError, match="at least 2 anchors"):
        one.score_rows(data.images[:4])


def test_k_larger_than_pool_fails_before_training(tmp_path):
    from oodbench.engine import Engine

    det = amp.AMP(amp_cfg(k=20, pool_size=8), "cpu")
    with pytest.raises(OODBenchError, match="larger than the anchor pool"):
        det.train(digits(100), None, Engine(tmp_path, "cpu", 0))
    assert not (tmp_path / "checkpoints").exists()


def test_stem_that_cannot_take_doubled_channels_is_an_error():
    with pytest.raises(OODBenchError, match="takes 2 channels.*stem takes 1"):
        Anchored(build_classifier("small_cnn", 1, 10), 1)
    with pytest.raises(OODBenchError, match="no convolution"):
        Anchored(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2)), 1)


def test_unknown_score_type_and_sampling_are_errors(fitted):
    det, data = fitted
    bad = amp.AMP(amp_cfg(score="maxlogit"), "cpu")
    bad.load_state_dict(det.state_dict())
    with pytest.raises(OODBenchError, match="amp.score 'maxlogit'"):
        bad.score_rows(data.images[:4])
    with pytest.raises(OODBenchError, match="amp.anchor_sampling"):
        amp.anchored_loss([0.0], [1.0], "per_pixel")


# ---- end to end through the CLI -------------------------------------------------------------------------------------

def _cli(*args, cwd):
    """Run the oodbench CLI in a subprocess, with the amp module registered."""
    code = "import sys, oodbench.detectors.amp; from oodbench.cli import main; raise SystemExit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OODBENCH_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=1800)


def test_cli_train_and_eval_separates_noise(tmp_path):
    common = ["--method", "amp", "--in", "fashion_mnist", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"]
    done = _cli("train", *common, "--preset", "quick", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = _cli("eval", *common, "--out", "noise:gaussian", "--limit", "1000", "--format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {r["method"]: r for r in json.loads(done.stdout)}
    assert set(rows) == {"amp", "amp-energy", "amp-entropy", "amp-msp"}
    assert rows["amp"]["out"] == "noise:gaussian" and rows["amp"]["auroc"] > 0.9  # seen: 0.97-0.99
