"""Ensembles (issue 24): deep ensembles of models (`--model A,B,C`, `oodbench.ensemble`) and score ensembles across
methods (`--method combo:knn+energy+vim`), each against an independent transcription, a defining property, and
one-line errors on bad input."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import oodbench
from oodbench.errors import OODBenchError

from conftest import fails


def tiny_net(seed, classes=4, channels=3, width=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))


def members():
    return [oodbench.wrap(tiny_net(0), mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]),
            oodbench.wrap(tiny_net(1, width=5), mean=0.45, std=0.22),
            oodbench.wrap(tiny_net(2), mean=[0.0], std=[1.0])]


def by_hand(models, x):
    """The members' logits and features as each member computes them alone (uint8 → [0, 1] → its mean/std)."""
    unit = x.float() / 255
    logits, features = [], []
    for m in models:
        inp = (unit - torch.tensor(m.mean).view(1, -1, 1, 1)) / torch.tensor(m.std).view(1, -1, 1, 1)
        with torch.no_grad():
            h = m.net[:4](inp)
            features.append(h)
            logits.append(m.net[4](h))
    return torch.stack(logits), torch.cat(features, 1)


def test_mean_logits_and_mean_softmax_equal_a_transcription(tiny_images):
    x = tiny_images(7, 3)
    parts = members()
    logits, features = by_hand(parts, x)
    mean_logits = oodbench.ensemble(parts)
    f, z = mean_logits.features_and_logits(x)
    torch.testing.assert_close(z, logits.mean(0))                       # OpenOOD's ensemble: mean of the logits
    torch.testing.assert_close(f, features)                             # the members' features side by side
    torch.testing.assert_close(mean_logits.head(f), z)
    msp = oodbench.method("msp").fit(mean_logits)
    torch.testing.assert_close(msp.score(x), -logits.mean(0).softmax(1).amax(1))   # OpenOOD's conf, negated
    mean_softmax = oodbench.ensemble(parts, combine="softmax")
    probs = logits.softmax(2).mean(0)
    torch.testing.assert_close(mean_softmax.logits(x).softmax(1), probs)
    torch.testing.assert_close(oodbench.method("msp").fit(mean_softmax).score(x), -probs.amax(1))
    entropy = -(probs * probs.log()).sum(1)
    torch.testing.assert_close(oodbench.method("entropy").fit(mean_softmax).score(x), entropy, rtol=1e-5,
                               atol=1e-6)


def test_an_ensemble_of_one_model_repeated_is_that_model(tiny_images):
    x, fit = tiny_images(9, 4), tiny_images(80, 5)
    single = members()[0]
    twice = oodbench.ensemble([single, single])
    torch.testing.assert_close(twice.logits(x), single.logits(x))
    torch.testing.assert_close(oodbench.ensemble([single, single], combine="softmax").logits(x).softmax(1),
                               single.logits(x).softmax(1))
    for name in ("msp", "energy", "maxlogit", "gen", "knn"):      # knn: [f, f] normalised is f normalised
        alone = oodbench.method(name).fit(single, fit).score(x)
        joined = oodbench.method(name).fit(twice, fit).score(x)
        torch.testing.assert_close(joined, alone, rtol=1e-5, atol=1e-5, msg=name)


def test_feature_and_gradient_methods_score_the_mean_logits_ensemble(tiny_images):
    x, fit = tiny_images(6, 6), tiny_images(60, 7)
    model = oodbench.ensemble(members())
    for name in ("vim", "react", "odin", "gradnorm", "mahalanobis"):
        scores = oodbench.method(name).fit(model, fit, labels=torch.arange(60) % 4).score(x) \
            if name == "mahalanobis" else oodbench.method(name).fit(model, fit).score(x)
        assert scores.shape == (6,) and torch.isfinite(scores).all(), name


def test_load_model_splits_commas_and_seeds_members_apart():
    model = oodbench.load_model("torchvision:resnet18:none,torchvision:resnet18:none")
    one, two = model.net.nets
    assert not torch.equal(one.conv1.weight, two.conv1.weight)          # member i gets seed + i
    assert torch.equal(two.conv1.weight, oodbench.load_model("torchvision:resnet18:none", seed=1).net.conv1.weight)
    assert model.head.in_features == 1024 and model.num_classes == 1000


def test_bad_ensembles_are_one_line_errors():
    parts = members()
    with pytest.raises(OODBenchError, match="class count"):
        oodbench.ensemble([parts[0], oodbench.wrap(tiny_net(3, classes=5))])
    with pytest.raises(OODBenchError, match="differ in size"):
        oodbench.ensemble([oodbench.wrap(tiny_net(0), size=8), oodbench.wrap(tiny_net(1), size=16)])
    with pytest.raises(OODBenchError, match="differ in channels"):
        oodbench.ensemble([parts[0], oodbench.wrap(tiny_net(3, channels=1), mean=0.5, std=0.5)])
    with pytest.raises(OODBenchError, match="logits or softmax"):
        oodbench.ensemble(parts, combine="median")
    with pytest.raises(OODBenchError, match="at least two"):
        oodbench.ensemble(parts[:1])
    with pytest.raises(OODBenchError, match="none empty"):
        oodbench.load_model("torchvision:resnet18:none,")
    with pytest.raises(OODBenchError, match="model.ensemble applies"):
        oodbench.load_model("torchvision:resnet18:none", ensemble_mode="softmax")
    with pytest.raises(OODBenchError, match="no features/head split"):
        oodbench.method("knn").fit(oodbench.ensemble(parts, combine="softmax"), torch.zeros(4, 3, 8, 8))


def test_cli_ensemble_of_models_equals_the_api(capsys, tmp_path):
    from oodbench.cli import main

    spec = "torchvision:resnet18:none,torchvision:resnet18:none"
    args = ["eval", "--model", spec, "--in", "digits", "--out", "noise:gaussian", "--method", "msp,energy",
            "--limit", "20", "--fit-limit", "40", "--runs-dir", str(tmp_path / "runs"), "--format", "json",
            "--set", "model.ensemble=softmax"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    api = oodbench.Evaluator(spec, ["msp", "energy"], in_dataset="digits", fit_limit=40,
                             overrides=["model.ensemble=softmax"]).evaluate(["noise:gaussian"], limit=20)
    assert [(r["method"], round(r["auroc"], 10)) for r in rows] == [(r["method"], round(r["auroc"], 10))
                                                                      for r in api]
    line = fails(capsys, ["eval", "--model", spec, "--in", "digits", "--out", "noise:gaussian", "--method", "msp",
                          "--set", "model.ensemble=mean", "--runs-dir", str(tmp_path / "runs")])
    assert "logits or softmax" in line


# ---------------------------------------------------------------------------------------------------------------
# Score ensembles across methods: combo:A+B+C
def reference_p_values(test_statistic, sample):
    """edadaltocg/detectors src/detectors/ensemble.py p_value_fn, transcribed (ID-score convention, (n, m), (N, m))."""
    n = len(sample)
    lower = sample.min(0) * np.where(sample.min(0) > 0, 1 / n, n)
    upper = sample.max(0) * np.where(sample.max(0) > 0, n, 1 / n)
    padded = np.sort(np.concatenate([lower[None], sample, upper[None]]), axis=0)
    ecdf = np.arange(1, n + 3) / (n + 2)
    p = np.stack([np.interp(test_statistic[:, j], padded[:, j], ecdf) for j in range(sample.shape[1])], 1)
    return np.maximum(p, 1e-8)


# detectors' *_tau_method combinations, each negated where its small values mean OOD (ours: higher = more OOD)
REFERENCE_TAU = {
    "fisher": lambda p: -2 * np.log(p).sum(1),
    "stouffer": lambda p: -(__import__("scipy.stats").stats.norm.ppf(p).sum(1) / np.sqrt(p.shape[1])),
    "tippett": lambda p: -p.min(1),
    "wilkinson": lambda p: -p.max(1),
    "edgington": lambda p: -p.sum(1),
    "pearson": lambda p: 2 * np.log(1 - p + 1e-6).sum(1),
    "simes": lambda p: -np.min(np.sort(p, 1) / np.arange(1, p.shape[1] + 1) * p.shape[1], 1),
    "geometric_mean": lambda p: -np.prod(p, 1) ** (1 / p.shape[1]),
}


@pytest.fixture(scope="module")
def combo_data():
    from conftest import tiny_image_batch

    labels = torch.arange(120) % 4
    return oodbench.wrap(tiny_net(5)), tiny_image_batch(120, 11), labels, tiny_image_batch(60, 12), \
        tiny_image_batch(25, 13)


@pytest.mark.parametrize("rule", list(REFERENCE_TAU))
def test_combo_equals_a_transcription_of_the_detectors_package(combo_data, rule):
    model, fit, labels, val, x = combo_data
    names = ["knn", "energy", "vim", "mahalanobis"]
    alone = [oodbench.method(n, k=10) if n == "knn" else oodbench.method(n) for n in names]
    combo = oodbench.method("combo:" + "+".join(names), combine=rule)
    combo.members[0].set_params(k=10)
    combo.fit(model, fit, val, labels)
    val_scores = np.stack([m.fit(model, fit, labels=labels).score(val).numpy() for m in alone], 1)
    test_scores = np.stack([m.score(x).numpy() for m in alone], 1)
    p = reference_p_values(-test_scores.astype(np.float64), -val_scores.astype(np.float64))
    expected = REFERENCE_TAU[rule](p)
    np.testing.assert_allclose(combo.score(x).numpy(), expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(combo.score_set(oodbench.as_imageset(x))[combo.name].numpy(), expected, rtol=2e-5,
                               atol=1e-6)


def test_fisher_of_one_method_is_monotone_in_its_score_and_p_values_are_the_validation_ecdf(combo_data):
    model, fit, labels, val, x = combo_data
    combo = oodbench.method("combo:energy").fit(model, fit, val)
    wide = torch.cat([x, val, oodbench.as_imageset(torch.randint(0, 256, (30, 3, 8, 8),
                                                    generator=torch.Generator().manual_seed(2),
                                                    dtype=torch.uint8)).images])
    energy = oodbench.method("energy").fit(model).score(wide)
    fisher = combo.score(wide)
    order = energy.argsort()
    assert (fisher[order].diff() >= 0).all() and fisher[order].diff().sum() > 0
    # on the validation images themselves, p is the ECDF: the i-th most OOD of N has p = (i + 1) / (N + 2)
    p_val = torch.exp(-combo.score(val).double() / 2)
    rank = (-oodbench.method("energy").fit(model).score(val)).argsort().argsort().double()
    torch.testing.assert_close(p_val, (rank + 2) / (len(val) + 2), rtol=1e-5, atol=1e-7)


def test_combo_state_round_trips_and_its_options_reach_the_members(combo_data, tmp_path):
    model, fit, labels, val, x = combo_data
    combo = oodbench.method("combo:knn+msp", combine="stouffer")
    combo.members[0].set_params(k=5)
    combo.fit(model, fit, val)
    torch.save(combo.state_dict(), tmp_path / "combo.pt")
    again = oodbench.method("combo:knn+msp").load_state_dict(torch.load(tmp_path / "combo.pt", weights_only=True))
    again.use_model(model)
    assert again.options["combine"] == "stouffer" and again.members[0].options["k"] == 5
    torch.testing.assert_close(again.score(x), combo.score(x))


def test_bad_combos_are_one_line_errors(combo_data, capsys, tmp_path):
    model, fit, labels, val, x = combo_data
    for name, message in [("combo:knn+enrgy", "Did you mean 'energy'"), ("combo:", "write combo:METHOD"),
                          ("combo:msp+", "write combo:METHOD"), ("combo:msp+msp", "names a method twice"),
                          ("combo:msp+combo:knn", "not combos"), ("combo:msma+msp", "trains its own 'msma'")]:
        with pytest.raises(OODBenchError, match=message):
            oodbench.method(name)
    with pytest.raises(OODBenchError, match="combo.combine is one of"):
        oodbench.method("combo:msp", combine="max")
    with pytest.raises(OODBenchError, match="validation split"):
        oodbench.method("combo:msp+energy").fit(model, fit)
    with pytest.raises(OODBenchError, match="mahalanobis needs class labels"):
        oodbench.method("combo:mahalanobis+msp").fit(model, fit, val)
    logits_only = oodbench.ensemble([model, oodbench.wrap(tiny_net(6))], combine="softmax")
    with pytest.raises(OODBenchError, match="no features/head split"):
        oodbench.method("combo:msp+knn").fit(logits_only, fit, val)
    line = fails(capsys, ["eval", "--model", "torchvision:resnet18:none", "--in", "digits", "--out", "noise:gaussian",
                          "--method", "msp,combo:knn+enrgy", "--runs-dir", str(tmp_path / "runs")])
    assert "combo:knn+enrgy" in line and "energy" in line and not (tmp_path / "runs").exists()


def test_cli_combo_uses_the_members_options(capsys, tmp_path):
    from oodbench.cli import main

    base = ["eval", "--model", "torchvision:resnet18:none", "--in", "digits", "--out", "noise:gaussian", "--limit",
            "30", "--fit-limit", "150", "--runs-dir", str(tmp_path / "runs"), "--format", "json"]
    assert main(base + ["--method", "combo:knn+energy", "--set", "knn.k=5", "--set", "combo.combine=stouffer"]) == 0
    row, = json.loads(capsys.readouterr().out)
    assert row["method"] == "combo:knn+energy"
    run = next((tmp_path / "runs").iterdir())
    api = oodbench.Evaluator("torchvision:resnet18:none", ["combo:knn+energy"], in_dataset="digits", fit_limit=150,
                             overrides=["knn.k=5", "combo.combine=stouffer"]).evaluate(["noise:gaussian"], limit=30)
    assert math.isclose(api[0]["auroc"], row["auroc"], rel_tol=1e-12)
    assert main(base + ["--method", "combo:knn+energy", "--set", "knn.k=20"]) == 0
    other, = json.loads(capsys.readouterr().out)
    assert other["auroc"] != row["auroc"] or other["fpr95"] != row["fpr95"]
    assert (run / "scores").is_dir()


def test_combo_keeps_the_method_contract(combo_data):
    from oodbench.errors import NotFittedError

    model, fit, labels, val, x = combo_data
    combo = oodbench.method("combo:knn+energy+vim")
    combo.members[0].set_params(k=5)
    with pytest.raises(NotFittedError, match="is not fitted"):
        combo.use_model(model).score(x)
    assert combo.fit(model, fit, val) is combo and combo.name == "combo:knn+energy+vim" and combo.array_level
    features, logits = model.features_and_logits(x)
    torch.testing.assert_close(combo.score_features(features, logits), combo.score(x))
    assert combo.get_params() == {"combine": "fisher", "members": {"knn": {"k": 5, "backend": "auto"},
                                                                   "energy": {"temperature": 1.0},
                                                                   "vim": {"dim": 256}}}
    assert not oodbench.method("combo:odin+msp").array_level
