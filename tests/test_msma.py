"""MSMA: loss, learned score direction, batched multi-level scoring, auxiliary models, bad input, end to end."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from sklearn.metrics import roc_auc_score

from oodbench.aux_models import GMM, KNN, Flow
from oodbench.data.imageset import ImageSet
from oodbench.detectors.msma import MSMA, dsm_loss, score_norms, sigma_schedule
from oodbench.errors import OODBenchError
from oodbench.nets.score_nets import CondInstanceNormPlus, build_score_net, elu

ROOT = Path(__file__).resolve().parent.parent



def msma_cfg(**changes) -> dict:
    cfg = yaml.safe_load((ROOT / "oodbench" / "configs" / "msma.yaml").read_text())
    cfg.pop("presets")
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return cfg


# ----------------------------------------------------------------------------------------------------- schedules
def test_sigma_schedules_run_high_to_low():
    geo = sigma_schedule(0.01, 1.0, 10, "geometric")
    assert torch.allclose(geo[[0, -1]], torch.tensor([1.0, 0.01]))
    ratios = geo[1:] / geo[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-5)
    lin = sigma_schedule(0.01, 1.0, 10, "linear")
    assert torch.allclose(lin[1:] - lin[:-1], torch.full((9,), -0.11), atol=1e-6)


# ----------------------------------------------------------------------------------------------------- loss
class AffineScore(nn.Module):
    """s(x, i) = a_i * x + c_i: a hand-checkable 'network'."""

    def __init__(self, a, c):
        super().__init__()
        self.a, self.c = torch.tensor(a), torch.tensor(c)

    def forward(self, x, level):
        shape = (-1,) + (1,) * (x.dim() - 1)
        return self.a[level].view(shape) * x + self.c[level].view(shape)


def test_loss_equals_weighted_denoising_objective_on_hand_made_batch():
    x = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]], [[[1.0, 1.0], [0.0, 0.0]]], [[[0.2, 0.4], [0.6, 0.8]]]])
    z = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]], [[[0.0, 2.0], [-1.0, 1.0]]], [[[0.3, 0.3], [-0.3, 0.1]]]])
    sigmas = torch.tensor([1.0, 0.5, 0.1])
    level = torch.tensor([0, 2, 1])
    net = AffineScore([-1.0, 2.0, -3.0], [0.5, -0.5, 1.0])
    expected = 0.0
    for k in range(3):  # the original form: 1/2 sigma^2 || s(x~) + (x~ - x) / sigma^2 ||^2, summed over pixels
        sig, i = float(sigmas[level[k]]), int(level[k])
        noisy = x[k] + sig * z[k]
        s = float(net.a[i]) * noisy + float(net.c[i])
        expected += 0.5 * sig ** 2 * ((s + (noisy - x[k]) / sig ** 2) ** 2).sum().item()
    loss = dsm_loss(net, x, sigmas, level=level, noise=z)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-6)
    # the true denoising direction (s = -z / sigma) has zero loss
    zero = dsm_loss(lambda xn, lv: -z / sigmas[lv].view(-1, 1, 1, 1), x, sigmas, level=level, noise=z)
    assert zero.item() == pytest.approx(0.0, abs=1e-10)


class LevelAffine(nn.Module):
    """s(x, i) = A_i x + b_i: a per-level affine score model, rich enough for the score of a Gaussian."""

    def __init__(self, num_L, dim=2):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(num_L, dim, dim))
        self.b = nn.Parameter(torch.zeros(num_L, dim))

    def forward(self, x, level):
        return torch.einsum("bij,bj->bi", self.A[level], x) + self.b[level]


def test_learned_score_points_toward_the_data_on_a_gaussian():
    torch.manual_seed(0)
    mu, std = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.3])
    sigmas = sigma_schedule(0.05, 1.0, 5)
    net = LevelAffine(len(sigmas))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 600)
    for _ in range(600):
        loss = dsm_loss(net, mu + std * torch.randn(2048, 2), sigmas)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    x = mu + std * torch.randn(2000, 2)
    true_score = lambda i: -(x - mu) / (std ** 2 + sigmas[i] ** 2)   # noqa: E731  data convolved with N(0, s^2)
    with torch.no_grad():
        learned = [net(x, torch.full((2000,), i)) for i in range(len(sigmas))]
    cos = [torch.nn.functional.cosine_similarity(learned[i], true_score(i), dim=1).mean() for i in range(5)]
    assert cos[-1] > 0.9 and cos[-2] > 0.9, cos   # the two smallest sigmas (0.05, 0.11)
    assert min(cos) > 0.8, cos


# ----------------------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("model,shape", [("refinenet", (1, 13, 13)), ("refinenet", (3, 16, 16)),
                                         ("refinenet_ncsn", (1, 13, 13)), ("resnet", (1, 12, 12))])
def test_batched_multilevel_scoring_equals_separate_forwards(model, shape):
    torch.manual_seed(0)
    sigmas = sigma_schedule(0.01, 1.0, 5)
    net = build_score_net(model, shape[0], 4, len(sigmas)).eval()
    for p in net.parameters():   # make the per-level parameters differ so a level mix-up shows
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.rand(3, *shape)
    batched = score_norms(net, x, sigmas, chunk=4)   # 15 pairs in uneven chunks
    with torch.no_grad():
        separate = torch.stack([(sigmas[i] * net(x, torch.full((3,), i))).flatten(1).norm(dim=1)
                                for i in range(len(sigmas))], dim=1)
    assert batched.shape == (3, 5)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)
    assert net(x, torch.zeros(3, dtype=torch.long)).shape == x.shape


def test_cpu_elu_is_elu_with_the_same_gradient():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    ours, ref = elu(x), torch.nn.functional.elu(x)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


def test_original_refinenet_parameter_counts():
    """ahsanMah/msma RefineNet (filters 128, L 10): counted from its Keras layers by hand, 28 059 137 for one
    channel and 28 063 747 for three; the NCSN-v1 layout (`refinenet_ncsn`) has 29 195 009 / 29 199 619."""
    counts = {(m, c): sum(p.numel() for p in build_score_net(m, c, 128, 10).parameters())
              for m in ("refinenet", "refinenet_ncsn") for c in (1, 3)}
    assert counts == {("refinenet", 1): 28_059_137, ("refinenet", 3): 28_063_747,
                      ("refinenet_ncsn", 1): 29_195_009, ("refinenet_ncsn", 3): 29_199_619}
    net = build_score_net("refinenet", 1, 4, 3)
    assert len(net.preact) == 4                                            # 4 pre-activation blocks, not 8
    assert all(torch.equal(n.gamma.weight, torch.ones_like(n.gamma.weight)) and torch.equal(
        n.alpha.weight, torch.ones_like(n.alpha.weight)) for n in net.modules() if isinstance(n, CondInstanceNormPlus))


def test_original_cin_plus_plus_on_a_fixed_input():
    """gamma * (x - mu) / sqrt(s + 1e-6) + beta + alpha * (mu - m) / sqrt(v + 1e-6): alpha not scaled by gamma."""
    norm = CondInstanceNormPlus(2, 2, original=True)
    with torch.no_grad():
        norm.gamma.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 3.0]]))
        norm.alpha.weight.copy_(torch.tensor([[1.0, 1.0], [0.5, -1.0]]))
        norm.beta.weight.copy_(torch.tensor([[0.0, 0.0], [0.1, 0.2]]))
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 5.0]]]])     # channel means 1.5 and 2
    mu, s = torch.tensor([1.5, 2.0]).view(1, 2, 1, 1), torch.tensor([1.25, 3.0]).view(1, 2, 1, 1)
    m, v = 1.75, 0.0625
    g, a, b = torch.tensor([2.0, 3.0]).view(1, 2, 1, 1), torch.tensor([0.5, -1.0]).view(1, 2, 1, 1), torch.tensor(
        [0.1, 0.2]).view(1, 2, 1, 1)
    expected = g * (x - mu) / torch.sqrt(s + 1e-6) + b + a * (mu - m) / math.sqrt(v + 1e-6)
    torch.testing.assert_close(norm(x, torch.tensor([1])), expected, rtol=1e-5, atol=1e-5)
    ncsn = CondInstanceNormPlus(2, 2)
    ncsn.load_state_dict(norm.state_dict())
    assert not torch.allclose(ncsn(x, torch.tensor([1])), expected, atol=1e-2)   # the NCSN form scales alpha by gamma


def test_original_refinenet_takes_x_in_unit_range_as_it_is():
    """The first convolution sees x itself (the original feeds [0, 1] images; the NCSN layout feeds 2x - 1)."""
    torch.manual_seed(0)
    net = build_score_net("refinenet", 1, 4, 2).eval()
    calls = []
    net.begin.register_forward_hook(lambda mod, inp, out: calls.append(inp[0]))
    x = torch.rand(2, 1, 8, 8)
    net(x, torch.zeros(2, dtype=torch.long))
    assert torch.equal(calls[0], x)


def test_conditional_instance_norm_depends_on_level_and_keeps_mean_information():
    norm = CondInstanceNormPlus(3, 2)
    with torch.no_grad():
        norm.gamma.weight.copy_(torch.tensor([[1.0] * 3, [2.0] * 3]))
        norm.alpha.weight.fill_(1.0)
        norm.beta.weight.zero_()
    x = torch.randn(1, 3, 5, 5)
    shifted = x + torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1)   # channel means change
    out0, out1 = norm(x, torch.tensor([0])), norm(x, torch.tensor([1]))
    torch.testing.assert_close(out1, 2 * out0)
    assert not torch.allclose(norm(shifted, torch.tensor([0])), out0, atol=1e-3)   # plain IN would erase this


# ----------------------------------------------------------------------------------------------------- aux models
def two_blob_vectors(n, shift=0.0, seed=0):
    mix = torch.randn(6, 6, generator=torch.Generator().manual_seed(123)) * 0.3 + torch.eye(6)   # one distribution
    centre = torch.where(torch.rand(n, 1, generator=torch.Generator().manual_seed(seed + 1)) < 0.5, 2.0, -2.0)
    return (torch.randn(n, 6, generator=torch.Generator().manual_seed(seed + 2)) @ mix + centre + shift).abs()


def auroc(id_scores, ood_scores):
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    return roc_auc_score(y, np.r_[id_scores.numpy(), ood_scores.numpy()])


@pytest.mark.parametrize("make", [lambda: GMM([1, 2, 4], cv_folds=3), lambda: KNN(5),
                                  lambda: Flow(hidden=32, epochs=100, batch_size=32, lr=1.0),  # lr 0.01 is slow
                                  lambda: Flow("stabilised", hidden=32, layers=2, steps=200, lr=1e-3, batch_size=256,
                                               eval_every=50)],
                         ids=["gmm", "knn", "flow", "flow-stabilised"])
def test_aux_model_generalises_separates_shift_and_survives_weights_only_reload(make, tmp_path):
    train, test, shifted = two_blob_vectors(600, seed=0), two_blob_vectors(600, seed=10), \
        two_blob_vectors(600, shift=1.5, seed=20)
    model = make().fit(train)
    s_train, s_test, s_shift = model.score(train), model.score(test), model.score(shifted)
    assert abs(auroc(s_train, s_test) - 0.5) < 0.1          # no overfit to the training vectors
    assert auroc(s_test, s_shift) > 0.9                      # a shifted set scores higher (= more OOD)
    torch.save(model.state_dict(), tmp_path / "aux.pt")
    again = type(model).from_state(torch.load(tmp_path / "aux.pt", weights_only=True))
    torch.testing.assert_close(again.score(shifted), s_shift)


def test_original_flow_is_one_tfp_made_trained_with_adadelta_to_the_last_epoch(monkeypatch):
    """The original's train_flow: one MAF, MADE [128, 128] ELU with TFP's degrees, Adadelta(0.01), batch 128,
    n // 128 batches per epoch, final weights, no standardisation."""
    from oodbench import aux_models

    flow = Flow()
    assert (flow.variant, flow.hidden, flow.epochs, flow.batch_size, flow.lr) == ("original", 128, 1000, 128, 0.01)
    made = aux_models.TFPMade(10, (128, 128))
    assert [tuple(layer.weight.shape) for layer in made.layers] == [(128, 10), (128, 128), (20, 128)]
    # TFP "equal" degrees for 10 inputs: ceil(k * 9 / 129), k = 1..128, at least 1
    expected = np.maximum(1, np.ceil(np.arange(1, 129) * 9 / 129)).astype(int)
    np.testing.assert_array_equal(made.mask0.numpy(), (np.arange(1, 11)[None, :] <= expected[:, None]))
    x = torch.randn(4, 10)
    jac = torch.autograd.functional.jacobian(lambda v: torch.stack(made(v[None])).squeeze(1), x[0])   # (2, 10, 10)
    assert torch.all(jac.triu() == 0)                     # output i depends on inputs < i only
    steps, seen = [], []

    class Spy(torch.optim.Adadelta):
        def __init__(self, params, **kw):
            seen.append(kw)
            super().__init__(params, **kw)

        def step(self, closure=None):
            steps.append(1)
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adadelta", Spy)
    vectors = two_blob_vectors(300)
    fitted = Flow(hidden=16, epochs=3).fit(vectors)
    assert seen == [{"lr": 0.01, "rho": 0.95, "eps": 1e-7}] and len(steps) == 3 * (300 // 128)
    assert isinstance(fitted.maf, aux_models.TFPMade)     # one MADE, nothing standardised before it


def test_all_training_vectors_fit_the_aux_models_by_default():
    """The original fits the auxiliary models on every training image's vector (SVHN: 73 257), no cap."""
    det = MSMA(msma_cfg())
    assert det.options["max_train_vectors"] is None and det.n_train_vectors(73_257) == 73_257
    assert MSMA(msma_cfg(msma__max_train_vectors=50_000)).n_train_vectors(73_257) == 50_000


def test_gmm_picks_the_component_count_by_cross_validation():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    x = centres[torch.randint(0, 3, (900,), generator=g)] + 0.5 * torch.randn(900, 2, generator=g)
    model = GMM([1, 2, 3], cv_folds=3).fit(x)
    assert model.n_components == 3
    assert model.cv_loglik[2] > model.cv_loglik[0]


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("changes,message", [
    ({"model__sigma_low": 1.0, "model__sigma_high": 0.5}, "sigma_low"),
    ({"model__sigma_low": 0.5, "model__sigma_high": 0.5}, "sigma_low"),
    ({"model__num_L": 0}, "num_L"),
    ({"model__sigma_sequence": "cosine"}, "sigma_sequence"),
    ({"model__model": "unet"}, "model.model"),
    ({"msma__default": "svm"}, "msma.default"),
    ({"msma__aux_models": ["gmm", "svm"]}, "aux_models"),
    ({"msma__flow": "glow"}, "msma.flow"),
    ({"data__hflip": "sometimes"}, "data.hflip"),
])
def test_bad_settings_fail_before_training(changes, message):
    with pytest.raises(OODBenchError, match=message):
        MSMA(msma_cfg(**changes)).check(60000)


@pytest.mark.parametrize("setting,data_in,flips", [("auto", "cifar10", True), ("auto", "fashion_mnist", False),
                                                   ("True", "fashion_mnist", True), ("false", "cifar100", False)])
def test_hflip_setting(setting, data_in, flips):
    assert MSMA(msma_cfg(data__hflip=setting, data__in=data_in)).hflip() is flips


def test_too_few_training_vectors_for_the_gmm_grid_is_a_clear_error():
    det = MSMA(msma_cfg())   # grid up to 20 components, 10-fold CV, 10 levels
    det.check(245)
    with pytest.raises(OODBenchError, match="needs at least 245 training vectors, got 244"):
        det.check(244)
    with pytest.raises(OODBenchError, match="got 100"):
        MSMA(msma_cfg(msma__max_train_vectors=100)).check(60000)


def test_train_refuses_too_few_images_before_training(tmp_path):
    class NoTraining:   # an engine whose fit must never be reached
        def fit(self, *a, **k):
            raise AssertionError("training started")

    few = ImageSet(torch.zeros(50, 1, 8, 8, dtype=torch.uint8), name="few")
    with pytest.raises(OODBenchError, match="training vectors"):
        MSMA(msma_cfg()).train(few, None, NoTraining())


# ----------------------------------------------------------------------------------------------------- detector
def blob_images(n, seed):
    """8x8 one-channel images: a smooth bright blob on a dark background, slightly jittered."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    cy, cx = 3.5 + torch.randn(n, 1, 1, generator=g) * 0.5, 3.5 + torch.randn(n, 1, 1, generator=g) * 0.5
    img = 200 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6) + 10 * torch.rand(n, 8, 8, generator=g)
    return img.clamp(0, 255).to(torch.uint8).unsqueeze(1)


def test_detector_fits_scores_all_rows_in_one_pass_and_reloads(tmp_path):
    from oodbench.engine import Engine

    cfg = msma_cfg(model__model="resnet", model__filters=8, model__num_L=4, model__sigma_low=0.05,
                   train__steps=30, train__batch_size=32, train__lr=0.003, train__ckpt_every=1000,
                   msma__gmm_components=[1, 2], msma__gmm_cv_folds=3, msma__flow_epochs=30,
                   msma__flow_hidden=8, msma__score_chunk=64)
    det = MSMA(cfg)
    det.train(ImageSet(blob_images(200, 0), name="blobs"), None, Engine(tmp_path, device="cpu", seed=0))
    x_id = blob_images(64, 1)
    x_noise = torch.randint(0, 256, (64, 1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    rows = det.score_rows(x_id)
    assert set(rows) == {"msma-gmm", "msma-knn", "msma-flow", "_score_norms"}
    assert rows["_score_norms"].shape == (64, 4)
    torch.testing.assert_close(det.score(x_id), rows["msma-gmm"])
    noise_rows = det.score_rows(x_noise)
    for row in ("msma-gmm", "msma-knn", "msma-flow"):
        assert auroc(rows[row], noise_rows[row]) > 0.95, row

    torch.save(det.state_dict(), tmp_path / "detector.pt")
    state = torch.load(tmp_path / "detector.pt", weights_only=True)
    again = MSMA(cfg)
    again.load_state_dict(state)
    for key, value in again.score_rows(x_noise).items():
        torch.testing.assert_close(value, noise_rows[key])

    changed = MSMA({**cfg, "msma": {**cfg["msma"], "knn_k": 1}})   # a scoring option: kNN refitted, no network
    changed.load_state_dict(copy.deepcopy(state))
    refit = changed.score_rows(x_noise)
    expected = KNN(1).fit(state["train_norms"]).score(refit["_score_norms"])
    torch.testing.assert_close(refit["msma-knn"], expected)
    torch.testing.assert_close(refit["msma-gmm"], noise_rows["msma-gmm"])


# ----------------------------------------------------------------------------------------------------- end to end
FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_cli_end_to_end_on_fashion_mnist_subset(tmp_path):
    """quick preset (small ResNet score net) on a Fashion-MNIST subset; Gaussian noise must be easy to separate."""
    runner = "import sys, oodbench.detectors.msma; from oodbench.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OODBENCH_PROGRESS": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def cli(*args):
        done = subprocess.run([sys.executable, "-c", runner, *args, "--runs-dir", str(tmp_path)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    cli("train", "--method", "msma", "--in", "fashion_mnist", "--preset", "quick",
        "--set", "data.limit=1500", "--set", "train.steps=150")
    out = cli("eval", "--method", "msma", "--in", "fashion_mnist", "--out", "noise:gaussian", "--limit", "500",
              "--format", "json")
    rows = {r["method"]: r for r in json.loads(out[out.index("["):])}
    assert set(rows) == {"msma-gmm", "msma-knn", "msma-flow"}
    for name, row in rows.items():
        assert row["auroc"] > 0.95, (name, row)
    run = next(tmp_path.glob("msma-fashion_mnist-s0*"))
    with np.load(next((run / "scores" / "msma").glob("noise*gaussian*.npz"))) as f:
        assert f["_score_norms"].shape == (500, 10)
