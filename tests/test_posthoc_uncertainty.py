"""LTS, PNML, GradUncertainty and MC-dropout: each equals pytorch-ood 0.4.0 (and MC-dropout's features mode a
transcription of OpenOOD's `dropout` postprocessor) on the same model and images, plus its defining property."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.data import ImageSet
from oodbench.detectors import method
from oodbench.detectors.pnml import pnml_regret
from oodbench.errors import OODBenchError
from oodbench.models import wrap

pood = pytest.importorskip("pytorch_ood.detector", reason="pytorch-ood is in the test extra")
K, D = 5, 32


class DropNet(nn.Module):
    def __init__(self, p=0.3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, D, 3), nn.BatchNorm2d(D), nn.ReLU(), nn.Dropout(p),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(D, K)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture(scope="module")
def setup(tiny_images):
    torch.manual_seed(0)
    net = DropNet()
    with torch.no_grad():
        net.body[1].running_mean.uniform_(-0.2, 0.2)
        net.body[1].running_var.uniform_(0.5, 2.0)
    model = wrap(net, mean=[0.5] * 3, std=[0.25] * 3)
    x_train, x = tiny_images(300, 1), tiny_images(60, 3)
    with torch.no_grad():
        z_train, _ = model.features_and_logits(x_train)
        z, logits = model.features_and_logits(x)
    return dict(model=model, net=net, train=ImageSet(x_train, None, "train"), x=x, z=z, logits=logits,
                z_train=z_train, inp=model.prepare(x))


def close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=rtol, atol=atol)


# -- LTS ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("percentile", [95, 65])
def test_lts_equals_pytorch_ood(setup, percentile):
    ref = pood.LTS(None, setup["model"].head, p=1 - percentile / 100).predict_features(setup["z"])
    close(method("lts", percentile=percentile).fit(setup["model"]).score(setup["x"]), ref)


def test_lts_scales_the_logits_by_at_least_one_and_keeping_everything_is_energy(setup):
    from oodbench.detectors.logit_scaling import lts_factor

    assert (lts_factor(setup["z"], 90) >= 1).all()
    sparse = torch.zeros(4, 10)
    sparse[:, :2] = torch.rand(4, 2) + 0.1               # all the mass in the top 2 of 10: S = 1
    close(lts_factor(sparse, 80), torch.ones(4))
    energy = method("energy").fit(setup["model"]).score(setup["x"])
    close(method("lts", percentile=0).fit(setup["model"]).score(setup["x"]), energy)


# -- PNML --------------------------------------------------------------------------------------------------------------
def test_pnml_equals_pytorch_ood(setup):
    ref = pood.PNML(None, setup["model"].head)
    ref.fit_features(setup["z_train"], torch.zeros(len(setup["z_train"]), dtype=torch.long))
    ours = method("pnml").fit(setup["model"], setup["train"]).score(setup["x"])
    close(ours, ref.predict_features(setup["z"]), rtol=1e-4, atol=1e-6)


def test_pnml_regret_is_zero_without_projection_and_grows_with_it(setup):
    z = F.normalize(setup["z"], dim=1)
    logits = setup["model"].head(z).detach()
    regrets = [pnml_regret(z, logits, c * torch.eye(D, dtype=torch.float64)) for c in (0.0, 0.1, 1.0, 10.0)]
    close(regrets[0], torch.zeros(len(z)), atol=1e-6, rtol=0)
    for lower, higher in zip(regrets, regrets[1:]):
        assert (higher > lower).all() and (higher <= 1 + 1e-6).all()


# -- GradUncertainty ---------------------------------------------------------------------------------------------------
def test_graduncertainty_equals_pytorch_ood_on_every_parameter_and_on_the_head(setup):
    net, inp = setup["net"], setup["inp"]
    ref_all = pood.GradUncertainty(net).predict(inp)
    close(method("graduncertainty", micro_batch=16).fit(setup["model"]).score(setup["x"]), ref_all, rtol=1e-4)
    ref_head = pood.GradUncertainty(net, param_filter=lambda n: n.startswith("fc")).predict(inp)
    close(method("graduncertainty", params="head").fit(setup["model"]).score(setup["x"]), ref_head, rtol=1e-4)


def test_graduncertainty_is_zero_for_a_uniform_prediction_and_negative_otherwise(setup):
    det = method("graduncertainty", params="head").fit(setup["model"])
    close(det.score_features(setup["z"], torch.zeros(len(setup["z"]), K)), torch.zeros(len(setup["z"])))
    assert (det.score_features(setup["z"], setup["logits"]) < 0).all()


# -- MC-dropout --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score,mode", [("mean_softmax", "mean"), ("var", "var")])
def test_mcdropout_equals_pytorch_ood_mcd_seeded(setup, score, mode):
    torch.manual_seed(7)
    ref = pood.MCD(setup["net"], samples=6, mode=mode).predict(setup["inp"])
    assert not setup["net"].training
    ours = method("mcdropout", passes=6, score=score, seed=7).fit(setup["model"]).score(setup["x"])
    close(ours, ref)
    assert not setup["net"].body[3].training and not setup["net"].body[1].training   # back in evaluation mode


def openood_dropout(features, fc, p, times, seed):
    """OpenOOD's DropoutPostProcessor.postprocess with forward_with_dropout = dropout on the penultimate features:
    mean of the T logits, softmax, max = confidence (higher = ID)."""
    torch.manual_seed(seed)
    logits_list = [fc(F.dropout(features, p=p, training=True)) for _ in range(times)]
    logits_mean = torch.zeros_like(logits_list[0])
    for logits in logits_list:
        logits_mean += logits
    logits_mean /= times
    conf, _ = torch.max(torch.softmax(logits_mean, dim=1), dim=1)
    return conf


def test_mcdropout_on_features_equals_openood_dropout(setup):
    with torch.no_grad():
        conf = openood_dropout(setup["z"], setup["model"].head, 0.5, 5, 3)
    det = method("mcdropout", where="features", seed=3).fit(setup["model"])
    close(det.score(setup["x"]), -conf)
    close(det.score_features(setup["z"], setup["logits"]), -conf)


def test_mcdropout_with_one_pass_and_no_dropout_is_msp(setup):
    msp = method("msp").fit(setup["model"]).score(setup["x"])
    close(method("mcdropout", where="features", p=0.0, passes=1).fit(setup["model"]).score(setup["x"]), msp)
    det = method("mcdropout", passes=4, score="mean_softmax").fit(setup["model"])
    passes = det.passes_of(setup["inp"])
    assert passes.shape == (60, 4, K) and not torch.allclose(passes[:, 0], passes[:, 1])   # dropout is active


def test_mcdropout_on_a_model_without_dropout_is_a_one_line_error_naming_the_fix(setup):
    model = wrap(DropNet(p=0.0), mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(OODBenchError, match="has no dropout layer.*mcdropout.where=features") as e:
        method("mcdropout").fit(model)
    assert "\n" not in str(e.value)
    with pytest.raises(OODBenchError, match="mcdropout.passes must be >= 1"):
        method("mcdropout", passes=0, where="features").fit(model)
