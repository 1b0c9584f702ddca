"""Classifier baselines: each score equals its formula on fixed logits; ODIN's perturbation raises confidence."""
import torch
import torch.nn as nn

from oodbench.detectors import get
from oodbench.models import wrap


class FixedNet(nn.Module):
    """Logits = a fixed linear map of the flattened input (so ODIN has a gradient to follow)."""

    def __init__(self, weight):
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.head.weight.data = weight

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


def detector(name, **options):
    det = get(name)(**options)
    torch.manual_seed(0)
    det.use_model(wrap(FixedNet(torch.randn(4, 12)), mean=[0.5, 0.5, 0.5], std=[0.25] * 3))
    return det


def batch():
    return torch.randint(0, 256, (6, 3, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_formulas_on_fixed_logits():
    x = batch()
    z = detector("msp").logits(x)
    assert torch.allclose(detector("msp").score(x), -z.softmax(1).amax(1))
    assert torch.allclose(detector("maxlogit").score(x), -z.amax(1))
    assert torch.allclose(detector("energy", temperature=2.0).score(x), -2.0 * torch.logsumexp(z / 2.0, 1))


def test_odin_without_perturbation_is_tempered_msp_and_perturbation_raises_confidence():
    x = batch()
    z = detector("msp").logits(x)
    plain = detector("odin", temperature=10.0, epsilon=0.0).score(x)
    assert torch.allclose(plain, -(z / 10.0).softmax(1).amax(1), atol=1e-6)
    perturbed = detector("odin", temperature=10.0, epsilon=0.01).score(x)
    assert (perturbed < plain).all()  # more confident = lower OOD score, for every image


def test_detectors_score_plain_tensors_on_their_own():
    logits, features = torch.randn(5, 4), torch.randn(5, 7)
    assert torch.equal(get("msp")().score_logits(logits), -logits.softmax(1).amax(1))
    assert torch.equal(get("maxlogit")().score_logits(logits), -logits.amax(1))
    assert torch.allclose(get("energy")().score_logits(logits), -torch.logsumexp(logits, 1))
    p = logits.softmax(1)
    expected = -features.abs().sum(1) * (p - 0.25).abs().sum(1)
    assert torch.allclose(get("gradnorm")().score_features(features, logits), expected)
