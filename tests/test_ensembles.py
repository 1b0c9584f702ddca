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
