"""Training recipes of the classifier (oodbench/detectors/recipes.py): each loss equal to pytorch-ood 0.4.0 where it
has it and to a transcription of OpenOOD v1.5's trainer written here; a defining property each; tiny CLI runs whose
logged first loss is the recipe's loss of the initial network on the first batch (the recipe is really used)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from oodbench import config as configs
from oodbench import data
from oodbench import detectors as registry
from oodbench.cli import main
from oodbench.detectors import recipes
from oodbench.detectors.classifier import ClassifierTrainer
from oodbench.engine import checkpoint
from oodbench.engine.loop import EpochSampler
from oodbench.nets.classifiers import build_classifier

from conftest import fails

TINY = ["--in", "digits", "--preset", "quick", "--set", "data.limit=64", "--set", "train.batch_size=16",
        "--set", "model.width=8", "--set", "train.ckpt_every=100", "--set", "train.log_every=1", "--device", "cpu"]


def logits_and_labels(n=12, c=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randint(0, c, (n,), generator=g)


# -- transcriptions of OpenOOD v1.5 (openood/trainers/*.py, openood/networks/*.py), written from reading them -----
def openood_logitnorm(x, target, tau):
    """logitnorm_trainer.py LogitNormLoss."""
    norms = torch.norm(x, p=2, dim=-1, keepdim=True) + 1e-7
    return F.cross_entropy(torch.div(x, norms) / tau, target)


def openood_oe(logits, labels, lambda_oe):
    """oe_trainer.py: CE on the ID rows + lambda_oe * -(mean logit - logsumexp) on the outlier rows."""
    b = len(labels)
    loss = F.cross_entropy(logits[:b], labels)
    return loss + lambda_oe * -(logits[b:].mean(1) - torch.logsumexp(logits[b:], dim=1)).mean()


def openood_ish_select(x, param):
    """ish_trainer.py ISHReshaper.cache_minksample_expscale + load_minksample_expscale: the scattered tensor."""
    shape = x.shape
    x = x.reshape(shape[0], -1)
    s1 = x.sum(dim=[1])
    v, idxs = x.abs().topk(int(x.shape[1] * (1 - param)), dim=1, sorted=False)
    s2 = v.sum(dim=[1])
    v = v * torch.exp((s1 / s2)[:, None])
    return torch.zeros(shape, dtype=x.dtype).scatter_(1, idxs, v)


def openood_rotations(data):
    """rotpred_trainer.py: the rotated batch and its labels."""
    b = len(data)
    x_rot = torch.cat([data, torch.rot90(data, 1, [2, 3]), torch.rot90(data, 2, [2, 3]), torch.rot90(data, 3, [2, 3])])
    y_rot = torch.cat([torch.zeros(b), torch.ones(b), 2 * torch.ones(b), 3 * torch.ones(b)]).long()
    return x_rot, y_rot


def vos_paper_energy(value, weight):
    """The authors' log_sum_exp (deeplearning-wisc/vos, train_virtual.py): m + log sum relu(w) exp(value - m)."""
    m, _ = torch.max(value, dim=1, keepdim=True)
    return m.squeeze(1) + torch.log(torch.sum(F.relu(weight) * torch.exp(value - m), dim=1))


# -- LogitNorm ------------------------------------------------------------------------------------------------------
def test_logitnorm_equals_pytorch_ood_and_openood():
    from pytorch_ood.loss import LogitNorm

    z, y = logits_and_labels()
    ours = recipes.logitnorm_loss(z, y, 0.04)
    torch.testing.assert_close(ours, LogitNorm(t=0.04)(z, y), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, openood_logitnorm(z, y, 0.04), rtol=1e-6, atol=1e-6)


def test_logitnorm_softmax_sees_logits_of_norm_one_over_tau():
    z, y = logits_and_labels(scale=7.0)
    tau = 0.04
    # the loss is CE of z / (tau ||z||): logits of norm 1/tau, so it is blind to the logits' scale
    normed = z / (tau * (z.norm(dim=1, keepdim=True) + 1e-7))
    torch.testing.assert_close(normed.norm(dim=1), torch.full((len(z),), 1 / tau), rtol=1e-5, atol=1e-5)
    for c in (0.01, 1.0, 100.0):
        torch.testing.assert_close(recipes.logitnorm_loss(c * z, y, tau), F.cross_entropy(normed, y),
                                   rtol=1e-4, atol=1e-4)
    assert not torch.isclose(F.cross_entropy(0.01 * z, y), F.cross_entropy(100 * z, y))


# -- Outlier exposure ---------------------------------------------------------------------------------------------------
def test_outlier_exposure_equals_openood_and_pytorch_ood():
    from pytorch_ood.loss import OutlierExposureLoss

    z, _ = logits_and_labels(n=20)
    y = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(1))
    ours, stats = recipes.outlier_exposure_loss(z, y, 0.5)
    torch.testing.assert_close(ours, openood_oe(z, y, 0.5))
    # pytorch-ood averages CE and OE over all rows together: compare the sums (labels < 0 are outliers)
    target = torch.cat([y, torch.full((12,), -1)])
    total = OutlierExposureLoss(alpha=0.5, reduction="sum")(z, target)
    torch.testing.assert_close(total, 8 * stats["ce"] + 0.5 * 12 * stats["oe"], rtol=1e-5, atol=1e-5)


def test_uniform_ce_is_smallest_for_uniform_predictions():
    z, _ = logits_and_labels(n=30, c=7)
    flat = torch.full((30, 7), 3.3, requires_grad=True)
    low = recipes.uniform_ce(flat)
    torch.testing.assert_close(low, torch.tensor(math.log(7)))   # CE(U, U) = entropy of U = log C
    (grad,) = torch.autograd.grad(low, flat)
    assert grad.abs().max() < 1e-7                                 # a minimum
    assert recipes.uniform_ce(z) > math.log(7) + 0.1
    # per row it is KL(U || softmax) + log C
    p = z.softmax(1)
    kl = (1 / 7 * (torch.log(torch.tensor(1 / 7)) - p.log())).sum(1)
    torch.testing.assert_close(recipes.uniform_ce(z), (kl + math.log(7)).mean())


# -- T2FNorm ----------------------------------------------------------------------------------------------------------
def test_t2fnorm_equals_openood_net_in_training_and_inference():
    torch.manual_seed(0)
    net = build_classifier("small_cnn", 1, 4, width=4)
    recipes.T2FNorm(temperature=0.1).adapt(net)
    x = torch.randn(6, 1, 8, 8)
    net.eval()
    raw = net.body(x)   # the hook applies here too: take the plain features from the body's own layers
    plain = torch.nn.Sequential(*net.body)(x)
    torch.testing.assert_close(raw, plain / 0.1)                               # forward_ood_inference
    torch.testing.assert_close(net(x), net.head(plain / 0.1))
    net.train()
    plain = torch.nn.Sequential(*net.body)(x)
    torch.testing.assert_close(net(x), net.head(F.normalize(plain, dim=-1) / 0.1), rtol=1e-5, atol=1e-5)
    # defining property: in training the head sees features of norm exactly 1/tau
    torch.testing.assert_close(net.features(x).norm(dim=1), torch.full((6,), 10.0), rtol=1e-5, atol=1e-5)


# -- ISH --------------------------------------------------------------------------------------------------------------
def test_ish_weight_gradient_equals_openood():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(9, 40)).requires_grad_(True)
    head = recipes.ISHLinear(40, 3)
    head.param = 0.85
    ref = torch.nn.Linear(40, 3)
    ref.load_state_dict(head.state_dict())
    out = head(x)
    torch.testing.assert_close(out, ref(x))                   # the forward pass is unchanged
    g = torch.randn(9, 3)
    gx, gw, gb = torch.autograd.grad(out, (x, head.weight, head.bias), g)
    rx, rb = torch.autograd.grad(ref(x), (x, ref.bias), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gb, rb)
    # OpenOOD's _ISHTLinear.backward: grad_output.view(-1, out).T.mm(scattered shaped input)
    torch.testing.assert_close(gw, g.view(-1, 3).T.mm(openood_ish_select(x.detach(), 0.85)))
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(x), ref(x))


def test_ish_shaping_is_ash_s_and_its_factor_is_scales():
    """ISH trains the last layer on the features SCALE rescales at inference: the same exp(total / top-k sum)."""
    torch.manual_seed(1)
    feats = torch.relu(torch.randn(16, 100)) + 0.01   # width 100: int(100 * 0.15) = 100 - round(85) = 15 kept
    assert recipes.ish_kept(100, 0.85) == 15
    shaped = recipes.ish_shape(feats, 0.85)
    torch.testing.assert_close(shaped, registry.method("ash_s", percentile=85).shaped(feats))
    kept = shaped != 0
    assert (kept.sum(1) == 15).all()
    factor = shaped[kept].view(16, 15) / feats[kept].view(16, 15)
    scale_factor = registry.method("scale", percentile=85).shaped(feats) / feats
    torch.testing.assert_close(factor, scale_factor[:, :15], rtol=1e-5, atol=1e-5)


def test_ish_gives_the_last_layer_its_own_weight_decay():
    net = build_classifier("small_cnn", 1, 3, width=4)
    recipe = recipes.ISH(head_weight_decay=0.25)
    model = recipes.RecipeNet(recipe.adapt(net), recipe)
    groups = model.optimizer_groups(0.5)
    assert [g["weight_decay"] for g in groups] == [0.5, 0.25]
    assert {id(p) for p in groups[1]["params"]} == {id(net.head.weight), id(net.head.bias)}
    assert len(groups[0]["params"]) + 2 == len(list(model.parameters()))


# -- RotPred ----------------------------------------------------------------------------------------------------------
def test_rotpred_batch_and_loss_equal_openood():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8)
    stacked, labels = recipes.rotations(x)
    ref_x, ref_y = openood_rotations(x)
    torch.testing.assert_close(stacked, ref_x)
    assert torch.equal(labels, ref_y)
    torch.testing.assert_close(torch.rot90(stacked[3:6], 3, [2, 3]), x)   # label k: rotated k quarter turns
    recipe = recipes.RotPred()
    net = recipe.adapt(build_classifier("small_cnn", 1, 4, width=4))
    model = recipes.RecipeNet(net, recipe)
    y = torch.tensor([0, 1, 3])
    loss, stats = recipe.loss(model, x, y)
    feats = net.features(ref_x)   # RotNet: fc and rot_fc on the same features of the rotated batch
    expected = F.cross_entropy(net.head(feats)[:3], y) + F.cross_entropy(net.rot_head(feats), ref_y)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


# -- VOS --------------------------------------------------------------------------------------------------------------
def test_vos_regularizer_equals_pytorch_ood_and_the_authors_energy():
    from pytorch_ood.loss import VOSRegLoss

    z_in, _ = logits_and_labels(n=10, c=4, seed=2)
    z_out, _ = logits_and_labels(n=6, c=4, seed=3)
    state = recipes.VOSState(4, 8, 5)
    torch.testing.assert_close(recipes.weighted_logsumexp(z_in, state.class_weights),
                               vos_paper_energy(z_in, state.class_weights))
    ours = recipes.vos_regularizer(z_in, z_out, state.class_weights, state.logistic)
    weights_energy = torch.nn.Linear(4, 1)
    with torch.no_grad():
        weights_energy.weight.copy_(state.class_weights)
    # pytorch-ood feeds E = -logsumexp to phi: the same logistic regression with its weight negated
    phi = torch.nn.Linear(1, 2)
    with torch.no_grad():
        phi.weight.copy_(-state.logistic.weight)
        phi.bias.copy_(state.logistic.bias)
    reference = VOSRegLoss(phi, weights_energy)._regularization(torch.cat([z_in, z_out]),
                                                                     torch.cat([torch.zeros(10), -torch.ones(6)]).long())
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_vos_queue_fills_then_slides_like_the_authors_loop():
    state = recipes.VOSState(3, 2, 4)
    g = torch.Generator().manual_seed(0)
    ref = torch.zeros(3, 4, 2)
    counts, sliding = [0, 0, 0], 0
    for _ in range(10):
        feats, labels = torch.randn(5, 2, generator=g), torch.randint(0, 3, (5,), generator=g)
        full = sum(counts) == 12          # the authors' sum_temp == num_classes * sample_number
        sliding += full
        for i in range(5):
            c = int(labels[i])
            if full:
                ref[c] = torch.cat([ref[c][1:], feats[i].view(1, -1)])
            elif counts[c] < 4:
                ref[c][counts[c]] = feats[i]
                counts[c] += 1
        state.push(feats, labels)
        torch.testing.assert_close(state.queue, ref)
        assert state.count.tolist() == counts
    assert state.full() and sliding >= 3


def test_vos_virtual_outliers_lie_in_the_low_density_tail():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
    queue = centres[:, None] + torch.randn(2, 500, 3, generator=g)
    torch.manual_seed(0)
    picked, log_density = recipes.virtual_outliers(queue, sample_from=2000, select=5)
    assert picked.shape == (10, 3)
    # refit the Gaussians as VOS does and check: each pick is one of the 5 least likely of its class's draws,
    # far less likely than the class's own features
    means = queue.mean(1)
    centred = (queue - means[:, None]).reshape(-1, 3)
    cov = centred.T @ centred / len(centred) + 1e-4 * torch.eye(3)
    for c in range(2):
        gauss = torch.distributions.MultivariateNormal(means[c], covariance_matrix=cov)
        torch.testing.assert_close(gauss.log_prob(picked[5 * c:5 * c + 5]), log_density[5 * c:5 * c + 5])
        id_density = gauss.log_prob(queue[c])
        assert log_density[5 * c:5 * c + 5].max() < torch.quantile(id_density, 0.01)
        assert ((picked[5 * c:5 * c + 5] - means[c]).norm(dim=1) > 2.5).all()   # beyond ~2.5 sigma of the centre
    torch.manual_seed(0)
    gauss = torch.distributions.MultivariateNormal(means, covariance_matrix=cov)
    draws = gauss.rsample((2000,))
    densities = gauss.log_prob(draws)
    for c in range(2):
        assert log_density[5 * c:5 * c + 5].max() <= densities[:, c].sort().values[4] + 1e-5


# -- options and bad input ----------------------------------------------------------------------------------------------
def test_recipe_options_are_config_sections_and_training_options():
    cfg = configs.load_config("classifier", sections=registry.option_sections("classifier"))
    assert cfg["train"]["recipe"] == "plain"
    assert cfg["logitnorm"] == {"temperature": 0.04} and cfg["outlier_exposure"]["weight"] == 0.5
    assert cfg["t2fnorm"]["temperature"] == 0.1 and cfg["ish"]["param"] == 0.85 and cfg["vos"]["weight"] == 0.1
    assert cfg["cider"]["proto_m"] == 0.95 and cfg["regmixup"]["alpha"] == 20.0
    for key in ("train.recipe", "logitnorm.temperature", "outlier_exposure.outliers", "vos.sample_number"):
        assert registry.is_training("classifier", key), key
    assert "outlier_exposure.outliers" in registry.dataset_keys("classifier")
    assert not set(recipes.RECIPES) & set(registry.REGISTRY)     # a recipe section never collides with a method's


@pytest.mark.parametrize("extra, message", [
    (["--method", "outlier_exposure"], "needs auxiliary outliers: set outlier_exposure.outliers"),
    (["--method", "outlier_exposure", "--set", "outlier_exposure.outliers=nosuchset"],
     "outlier_exposure.outliers: unknown dataset 'nosuchset'"),
    (["--method", "msp", "--set", "train.recipe=logitnrom"], "unknown train.recipe 'logitnrom'. Did you mean 'logitnorm'"),
    (["--method", "logitnorm", "--set", "train.loss=bce"], "needs train.loss=ce"),
    (["--method", "ish", "--set", "oe.outliers=glyphs"], "cannot be combined"),
    (["--method", "logitnorm", "--set", "logitnorm.temperature=0"], "logitnorm.temperature must be a number > 0"),
    (["--method", "ish", "--set", "ish.param=1.5"], "ish.param must be in [0, 1)"),
    (["--method", "vos", "--set", "vos.select=20", "--set", "vos.sample_from=10"], "vos.select (20) must be at most"),
    (["--method", "logitnorm", "--set", "train.recipe=ish"], "--method logitnorm trains recipe logitnorm"),
    (["--method", "logitnorm", "--set", "logitnorm.tau=1"], "unknown config key 'logitnorm.tau'"),
    (["--method", "cider", "--set", "cider.head=deep"], "cider.head 'deep': use mlp or linear"),
    (["--method", "cider", "--set", "cider.proto_m=1"], "cider.proto_m must be in [0, 1)"),
    (["--method", "regmixup", "--set", "regmixup.alpha=-1"], "regmixup.alpha must be a number >= 0"),
])
def test_bad_recipe_input_is_one_line_and_writes_nothing(extra, message, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert message in fails(capsys, ["train", *extra, "--runs-dir", str(runs), *TINY, "--set", "train.steps=1"])
    assert not runs.exists()


# -- tiny runs through the CLI: the logged first loss is the recipe's loss of the initial network -----------------
def train_cli(runs, method, steps, name, *extra):
    assert main(["train", "--method", method, "--runs-dir", str(runs), "--run-name", name, *TINY,
                 "--set", f"train.steps={steps}", *extra]) == 0
    return runs / f"classifier-digits-s0-{name}"


def load_net(run_dir):
    cfg = configs.read_yaml(run_dir / "config.yaml")
    trainer = ClassifierTrainer(cfg, "cpu")
    trainer.load_state_dict(checkpoint.load(run_dir / "detector.pt"))
    return cfg, trainer


def first_batch(cfg):
    train, _ = data.run_split(cfg)
    idx = EpochSampler(len(train), cfg["train"]["batch_size"], cfg["seed"]).indices(0)
    return train, train.images[idx], train.labels[idx]


def first_logged(run_dir) -> dict:
    return json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("method, extra", [
    ("logitnorm", []),
    ("t2fnorm", []),
    ("outlier_exposure", ["--set", "outlier_exposure.outliers=glyphs", "--set", "outlier_exposure.outlier_batch=24"]),
    ("rotpred", []),
])
def test_cli_run_logs_the_recipes_loss_and_records_the_recipe(method, extra, tmp_path):
    runs = tmp_path / "runs"
    initial = train_cli(runs, method, 0, "init", *extra)          # 0 steps: the seeded initial weights
    run = train_cli(runs, method, 2, method, *extra)
    cfg, trainer = load_net(initial)
    assert cfg["train"]["recipe"] == method == configs.read_yaml(run / "config.yaml")["train"]["recipe"]
    train, x, y = first_batch(cfg)
    net = trainer.net.train()
    inp = trainer.normalize(x)
    with torch.no_grad():
        if method == "logitnorm":
            expected = openood_logitnorm(net(inp), y, 0.04)
        elif method == "t2fnorm":
            h = torch.nn.Sequential(*net.body)(inp)
            expected = F.cross_entropy(net.head(F.normalize(h, dim=-1) / 0.1), y)
        elif method == "outlier_exposure":
            outliers = data.load("glyphs", split="train", like=train.shape)
            oidx = EpochSampler(len(outliers), 24, cfg["seed"] + 7919).indices(0)
            expected = openood_oe(net(trainer.normalize(torch.cat([x, outliers.images[oidx]]))), y, 0.5)
        else:
            # check the classification part of the logged loss (the rotation head: tests/test_rotpred_score.py)
            rx, _ = openood_rotations(inp)
            expected = F.cross_entropy(net(rx)[:len(y)], y)
    logged = first_logged(run)
    value = logged["ce"] if method == "rotpred" else logged["loss"]
    assert value == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    if method in ("logitnorm", "outlier_exposure"):
        with torch.no_grad():
            plain = float(F.cross_entropy(net(inp), y))
        assert abs(plain - logged["loss"]) > 1e-3        # not the plain cross-entropy


def test_cli_ish_changes_only_the_last_layers_weight(tmp_path):
    """One Adam step of ISH next to one of plain CE from the same initial weights and batch: the body and the head's
    bias move identically (their gradients are unchanged), the head's weight differently."""
    runs = tmp_path / "runs"
    ish = train_cli(runs, "ish", 1, "ish", "--set", "ish.head_weight_decay=0.0")
    plain = train_cli(runs, "plain", 1, "plain")
    (_, a), (_, b) = load_net(ish), load_net(plain)
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert isinstance(a.net.head, recipes.ISHLinear) and not isinstance(b.net.head, recipes.ISHLinear)
    assert sa.keys() == sb.keys()
    for k in sa:
        if k != "head.weight":
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (sa["head.weight"] - sb["head.weight"]).abs().max() > 1e-4


def test_cli_vos_run_uses_virtual_outliers_and_scores(tmp_path, capsys):
    runs = tmp_path / "runs"
    run = train_cli(runs, "vos", 6, "vos", "--set", "vos.sample_number=2", "--set", "vos.sample_from=40")
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "step" in line]
    assert lines[0]["vos_reg"] == 0.0                 # queues still filling
    assert any(r["vos_reg"] > 0 for r in lines)       # then the uncertainty loss is on
    for r in lines:
        assert r["loss"] == pytest.approx(r["ce"] + 0.1 * r["vos_reg"], rel=1e-5)
    # every post-hoc method then scores the run like any other
    assert main(["eval", "--method", "msp,energy", "--in", "digits", "--runs-dir", str(runs), "--run-name", "vos",
                 "--out", "noise:gaussian", "--limit", "60", "--device", "cpu"]) == 0
    assert (run / "metrics.json").is_file()


@pytest.mark.parametrize("method, options", [
    ("vos", ["--set", "vos.sample_number=2", "--set", "vos.sample_from=40"]),
    ("npos", ["--set", "npos.sample_number=2", "--set", "npos.sample_from=10", "--set", "npos.k=2",
              "--set", "npos.select=2", "--set", "npos.id_points_num=3", "--set", "npos.start_epoch=0"]),
    ("pixmix", ["--set", "pixmix.mixing_set=fractals:20"]),
    ("mixoe", ["--set", "mixoe.outliers=glyphs", "--set", "mixoe.outlier_batch=16"]),
])
def test_cli_resume_of_a_recipe_run_is_bit_exact(method, options, tmp_path):
    """Queues, prototypes and the random draws (VOS's Gaussians, NPOS's noise and picks, PixMix's mixing, MixOE's lam and box) come back
    from the checkpoint: a run resumed at step 2 ends where an uninterrupted one does."""
    runs = tmp_path / "runs"
    extra = [*options, "--set", "train.ckpt_every=2"]
    whole = train_cli(runs, method, 4, "whole", *extra)
    part = train_cli(runs, method, 4, "part", *extra, "--set", "train.max_to_keep=5")
    # drop everything after step 2 and resume from it
    (part / "detector.pt").unlink()
    (part / "checkpoints" / "classifier" / "final.pt").unlink()
    (part / "checkpoints" / "classifier" / "step_00000004.pt").unlink()
    assert main(["train", "--method", method, "--runs-dir", str(runs), "--run-name", "part", *TINY,
                 "--set", "train.steps=4", *extra, "--set", "train.max_to_keep=5", "--resume"]) == 0
    (_, a), (_, b) = load_net(whole), load_net(part)
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k]), k


# -- CIDER ------------------------------------------------------------------------------------------------------------
def openood_cider_losses(features, labels, prototypes, proto_m, temp, w):
    """cider_trainer.py: DisLoss.forward (per-sample EMA of the prototypes, then the dispersion of all of them)
    and CompLoss.forward on the updated prototypes; loss = w * comp + dis."""
    n_cls = len(prototypes)
    prototypes = prototypes.clone()
    for j in range(len(features)):
        prototypes[labels[j].item()] = F.normalize(prototypes[labels[j].item()] * proto_m + features[j] * (1 - proto_m),
                                                   dim=0)
    updated = prototypes.detach()
    lab = torch.arange(0, n_cls).contiguous().view(-1, 1)
    mask = 1 - torch.eq(lab, lab.T).float()
    logits = torch.div(torch.matmul(prototypes, prototypes.T), temp)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(n_cls).view(-1, 1), 0)
    mask = mask * logits_mask
    mean_prob_neg = torch.log((mask * torch.exp(logits)).sum(1) / mask.sum(1))
    mean_prob_neg = mean_prob_neg[~torch.isnan(mean_prob_neg)]
    dis = temp / 0.1 * mean_prob_neg.mean()
    protos = F.normalize(updated, dim=1)
    mask = torch.eq(labels.view(-1, 1), torch.arange(0, n_cls)).float()   # OpenOOD: proxy_labels.T of a 1-D range
    feat_dot = torch.div(torch.matmul(features, protos.T), temp)
    lg = feat_dot - torch.max(feat_dot, dim=1, keepdim=True)[0].detach()
    log_prob = lg - torch.log(torch.exp(lg).sum(1, keepdim=True))
    comp = -(temp / 0.07) * (mask * log_prob).sum(1).mean()
    return w * comp + dis, updated


def test_cider_losses_and_gradients_equal_openood():
    torch.manual_seed(0)
    raw = torch.randn(14, 6, requires_grad=True)
    labels = torch.randint(0, 4, (14,))
    protos = F.normalize(torch.randn(4, 6), dim=1)
    for temp in (0.1, 0.5):
        z = F.normalize(raw, dim=1)
        ref, ref_protos = openood_cider_losses(z, labels, protos, 0.95, temp, 2.0)
        ours_protos = recipes.ema_prototypes(protos, z, labels, 0.95)
        ours = (2.0 * recipes.cider_compactness(z, ours_protos.detach(), labels, temp)
                + recipes.cider_dispersion(ours_protos, temp))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_protos.detach(), ref_protos)
        (g_ours,) = torch.autograd.grad(ours, raw, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, raw)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


def test_cider_embeddings_and_prototypes_are_unit_norm():
    torch.manual_seed(0)
    net = build_classifier("small_cnn", 1, 3, width=4)
    recipe = recipes.CIDER(embed_dim=16)
    model = recipes.RecipeNet(net, recipe)
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(30) % 3
    prepare = lambda x: x.float() / 255   # noqa: E731
    recipe.initialise(model, images, labels, prepare, batch_size=7)
    state = model.extra["cider"]
    model.eval()
    with torch.no_grad():
        z = state(model(prepare(images))[0])
    torch.testing.assert_close(z.norm(dim=1), torch.ones(30))
    means = torch.stack([z[labels == c].mean(0) for c in range(3)])
    torch.testing.assert_close(state.prototypes, F.normalize(means, dim=1), rtol=1e-5, atol=1e-6)  # class means
    model.train()
    x = prepare(images[:12])
    loss, stats = recipe.loss(model, torch.cat([x, x]), labels[:12])   # two views
    torch.testing.assert_close(state.prototypes.norm(dim=1), torch.ones(3))
    assert loss.requires_grad and set(stats) == {"comp", "dis"}


def test_cli_cider_run_logs_its_loss_and_is_scored_with_knn(tmp_path):
    runs = tmp_path / "runs"
    initial = train_cli(runs, "cider", 0, "init", "--set", "cider.embed_dim=16")
    run = train_cli(runs, "cider", 2, "cider", "--set", "cider.embed_dim=16")
    assert configs.read_yaml(run / "config.yaml")["train"]["recipe"] == "cider"
    cfg, trainer = load_net(initial)
    recipe = recipes.recipe_from_config(cfg)
    model = recipes.RecipeNet(trainer.build(), recipe)
    model.load_state_dict(checkpoint.load(initial / "checkpoints" / "classifier" / "final.pt")["model"])
    _, x, y = first_batch(cfg)
    inp = trainer.normalize(x)
    model.train()
    z = model.extra["cider"](model(torch.cat([inp, inp]))[0])   # augment none: two equal views
    expected, _ = openood_cider_losses(z, y.repeat(2), model.extra["cider"].prototypes, 0.95, 0.1, 2.0)
    expected = expected.detach()
    logged = first_logged(run)
    assert logged["loss"] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    assert logged["loss"] == pytest.approx(2.0 * logged["comp"] + logged["dis"], rel=1e-5)
    assert main(["eval", "--method", "knn", "--in", "digits", "--runs-dir", str(runs), "--run-name", "cider",
                 "--out", "noise:gaussian", "--limit", "60", "--device", "cpu", "--set", "knn.k=5"]) == 0


# -- RegMixup ---------------------------------------------------------------------------------------------------------
def openood_regmixup(net, x, y, lam, index):
    """regmixup_trainer.py train_epoch with mixup_data's lam and index given."""
    mixup_x = lam * x + (1 - lam) * x[index]
    targets_a, targets_b = torch.cat([y, y]), torch.cat([y, y[index]])
    logits = net(torch.cat([x, mixup_x], dim=0))
    return lam * F.cross_entropy(logits, targets_a) + (1 - lam) * F.cross_entropy(logits, targets_b)


def test_regmixup_equals_openood_and_is_plain_ce_without_mixing():
    torch.manual_seed(0)
    net = build_classifier("small_cnn", 1, 4, width=4).eval()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    index = torch.randperm(6)
    batch, ta, tb = recipes.regmixup_batch(x, y, 0.3, index)
    torch.testing.assert_close(recipes.regmixup_loss(net(batch), ta, tb, 0.3), openood_regmixup(net, x, y, 0.3, index))
    torch.testing.assert_close(batch[6:], 0.3 * x + 0.7 * x[index])        # mixed rows: convex combinations
    # alpha = 0 (lam = 1): the mixed half is the batch itself and the loss is plain cross-entropy
    loss, stats = recipes.RegMixup(alpha=0).loss(recipes.RecipeNet(net, recipes.RegMixup()), x, y)
    assert stats["lam"] == 1.0
    torch.testing.assert_close(loss, F.cross_entropy(net(x), y))


def test_cli_regmixup_run_logs_the_recipes_loss(tmp_path):
    runs = tmp_path / "runs"
    initial = train_cli(runs, "regmixup", 0, "init")
    run = train_cli(runs, "regmixup", 2, "regmixup")
    cfg, trainer = load_net(initial)
    _, x, y = first_batch(cfg)
    logged = first_logged(run)
    torch.manual_seed(cfg["seed"])          # the engine seeds before its first step; the recipe draws lam, then index
    lam = float(torch.distributions.Beta(20.0, 20.0).sample())
    index = torch.randperm(len(y))
    assert logged["lam"] == pytest.approx(lam, rel=1e-6)
    net = trainer.net.train()
    with torch.no_grad():
        expected = openood_regmixup(net, trainer.normalize(x), y, lam, index)
    assert logged["loss"] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    assert configs.read_yaml(run / "config.yaml")["train"]["recipe"] == "regmixup"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vos", "cider", "rotpred", "npos"])
def test_recipes_with_extra_modules_train_under_ddp(method, tmp_path):
    """torchrun, 2 gloo processes: every trained parameter gets a gradient each step (DDP's requirement), with
    VOS's energy weights, CIDER's unused linear head, RotPred's rotation head and NPOS's MLP."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OODBENCH_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", "-m", "oodbench", "train", "--method", method, "--runs-dir", str(tmp_path),
                          *TINY, "--set", "data.limit=256", "--set", "train.batch_size=32", "--set", "train.steps=6",
                          "--set", "vos.sample_number=2", "--set", "vos.sample_from=40",
                          "--set", "npos.sample_number=2", "--set", "npos.sample_from=10", "--set", "npos.k=2",
                          "--set", "npos.select=2", "--set", "npos.id_points_num=3", "--set", "npos.start_epoch=0"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / f"classifier-digits-s0-{method}"
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"step"' in line]
    assert len(lines) == 6 and all(math.isfinite(r["loss"]) for r in lines)
    if method in ("vos", "npos"):
        assert any(r[f"{method}_reg"] > 0 for r in lines)
    load_net(run)


def test_methods_lists_the_recipes_and_their_options(capsys):
    assert main(["methods", "--options"]) == 0
    out = capsys.readouterr().out
    for name, cls in recipes.RECIPES.items():
        assert any(line.split()[:2] == [name, "[recipe]"] for line in out.splitlines()), name
    assert "logitnorm.temperature = 0.04" in out and "outlier_exposure.weight = 0.5" in out


# -- AugMix -----------------------------------------------------------------------------------------------------------
def openood_augmix_jsd(logits_clean, logits_aug1, logits_aug2, lam):
    """augmix_trainer.py, the jsd branch after the cross-entropy."""
    p_clean, p_aug1, p_aug2 = F.softmax(logits_clean, dim=1), F.softmax(logits_aug1, dim=1), F.softmax(logits_aug2, dim=1)
    p_mixture = torch.clamp((p_clean + p_aug1 + p_aug2) / 3., 1e-7, 1).log()
    return lam * (F.kl_div(p_mixture, p_clean, reduction='batchmean') + F.kl_div(p_mixture, p_aug1, reduction='batchmean')
                  + F.kl_div(p_mixture, p_aug2, reduction='batchmean')) / 3.


def test_augmix_consistency_equals_openood_and_vanishes_for_equal_views():
    a, _ = logits_and_labels(seed=4)
    b, _ = logits_and_labels(seed=5)
    c, _ = logits_and_labels(seed=6)
    torch.testing.assert_close(12 * recipes.augmix_jsd(a, b, c), openood_augmix_jsd(a, b, c, 12))
    assert recipes.augmix_jsd(a, b, c) > 0.01
    assert abs(float(recipes.augmix_jsd(a, a, a))) < 1e-6


def test_augmix_views_are_torchvisions_augmix_per_image():
    from torchvision.transforms import AugMix

    x = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    recipe = recipes.AugMix()
    torch.manual_seed(3)
    clean, aug1, aug2 = recipe.views_of(x, lambda b: b)
    torch.manual_seed(3)
    mix = AugMix(severity=1, mixture_width=3, chain_depth=-1, alpha=1.0, all_ops=True)   # augmix_preprocessor.yml
    ref1 = torch.cat([mix(x[i:i + 1]) for i in range(5)])
    ref2 = torch.cat([mix(x[i:i + 1]) for i in range(5)])
    assert torch.equal(clean, x) and torch.equal(aug1, ref1) and torch.equal(aug2, ref2)
    assert aug1.dtype == torch.uint8 and not torch.equal(aug1, x) and not torch.equal(aug1, aug2)


def test_cli_augmix_run_logs_its_loss(tmp_path):
    run = train_cli(tmp_path / "runs", "augmix", 2, "augmix", "--set", "augmix.group=4")
    cfg = configs.read_yaml(run / "config.yaml")
    assert cfg["train"]["recipe"] == "augmix" and cfg["augmix"]["group"] == 4
    for r in (json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()):
        assert r["jsd"] > 0 and r["loss"] == pytest.approx(r["ce"] + 12 * r["jsd"], rel=1e-5)
