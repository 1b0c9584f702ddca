"""NAC (equal to pytorch-ood 0.4.0's NACUE), VRA, Relation and iODIN on a tiny model and images, each against its
reference, plus each method's defining property."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from oodbench.data import ImageSet
from oodbench.detectors import method
from oodbench.errors import OODBenchError
from oodbench.models import wrap

K, D = 5, 16


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, D, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(D, K)

    def forward(self, x):
        return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))))


MEAN, STD = [0.5] * 3, [0.25] * 3


@pytest.fixture(scope="module")
def conv(tiny_images):
    torch.manual_seed(0)
    net = ConvNet().eval()
    model = wrap(net, mean=MEAN, std=STD, layers=["act1", "act2"])
    x_train, x = tiny_images(120, 4), tiny_images(40, 5)
    return dict(model=model, net=net, train=ImageSet(x_train, None, "train"), x_train=x_train, x=x)


def normalise(x):
    return (x.float() / 255 - 0.5) / 0.25


def close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=rtol, atol=atol)


# -- NAC -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, dict(alpha=[10.0, 1000.0], m_bins=[7, 20], o_star=[3, 10])])
def test_nac_equals_pytorch_ood_nacue(conv, options):
    from pytorch_ood.detector import NACUE

    net = conv["net"]
    ref = NACUE(net, layers=[net.act1, net.act2], **options)
    loader = torch.utils.data.DataLoader(normalise(conv["x_train"]), batch_size=32)
    ref.fit(loader)
    expected = ref.predict(normalise(conv["x"]))
    m = method("nac", **options).fit(conv["model"], conv["train"])
    close(m.score(conv["x"]), expected)
    # the fitted counts are NACUE's, layer by layer
    for (name, *_), stats in zip(m.settings(), ref._stats):
        assert torch.equal(m.stats_[name].cpu(), stats.counts)


def test_nac_coverage_of_the_fit_images_is_full_with_o_star_one(conv):
    """Every neuron state of a fit image lies in a bin the fit saw: with O* = 1 each layer's coverage is 1, so a fit
    image scores −(number of layers); images outside the fit set cover less."""
    m = method("nac", o_star=1).fit(conv["model"], conv["train"])
    close(m.score(conv["x_train"][:30]), torch.full((30,), -2.0))
    other = m.score(conv["x"])
    assert (other >= -2.0).all() and (other <= 0).all()
    # coverage grows with the counts: refitting on the fit set twice (counts doubled) with O* doubled is the same
    twice = method("nac", o_star=100).fit(conv["model"], ImageSet(torch.cat([conv["x_train"]] * 2), None, "2x"))
    once = method("nac", o_star=50).fit(conv["model"], conv["train"])
    close(twice.score(conv["x"]), once.score(conv["x"]))


def test_nac_geometric_bins_are_dense_near_0_and_1():
    from oodbench.detectors.nac import geometric_bins

    z = torch.tensor([1e-7, 1e-4, 0.49, 0.51, 1 - 1e-4, 1 - 1e-7])
    idx = geometric_bins(z, 10)
    assert idx.tolist()[0] == 0 and idx.tolist()[-1] == 9
    assert idx[2] == 4 and idx[3] == 5          # the two middle bins meet at 0.5
    assert 0 < idx[1] < 4 and 5 < idx[4] < 9


def test_nac_options_and_state(conv):
    m = method("nac").fit(conv["model"], conv["train"])
    m2 = method("nac").use_model(conv["model"]).load_state_dict(m.state_dict())
    close(m2.score(conv["x"]), m.score(conv["x"]))
    with pytest.raises(OODBenchError, match="nac.m_bins"):
        method("nac", m_bins=[5]).fit(conv["model"], conv["train"])
    with pytest.raises(OODBenchError, match="nac.alpha"):
        method("nac", alpha=-1.0).fit(conv["model"], conv["train"])
    counts = m.stats_
    m.set_params(m_bins=20)                     # drops the fitted counts of 50 bins; put them back by hand
    m.stats_, m.fitted_ = counts, True
    with pytest.raises(OODBenchError, match="fit again"):
        m.score(conv["x"])


# -- VRA -------------------------------------------------------------------------------------------------------------
def openood_features(net, data):
    """(logits, feature) of an OpenOOD backbone's forward(x, return_feature=True)."""
    feature = net.pool(net.act2(net.conv2(net.act1(net.conv1(data)))))
    return net.fc(feature), feature


def openood_vra(net, inp_val, inp, percentile_high=90, percentile_low=10):
    """vra_postprocessor.py: one pair of thresholds over every validation activation; clip; energy (its conf)."""
    with torch.no_grad():
        log = openood_features(net, inp_val)[1].numpy()
        high, low = np.percentile(log.flatten(), percentile_high), np.percentile(log.flatten(), percentile_low)
        feature = openood_features(net, inp)[1].clip(min=low, max=high)
        return torch.logsumexp(net.fc(feature.view(len(feature), -1)), dim=1)


@pytest.mark.parametrize("high,low", [(90, 10), (99, 1), (85, 15)])
def test_vra_equals_openood(conv, high, low):
    net = conv["net"]
    m = method("vra", percentile_high=high, percentile_low=low).fit(conv["model"], val=conv["train"])
    close(m.score(conv["x"]), -openood_vra(net, normalise(conv["x_train"]), normalise(conv["x"]), high, low))


@pytest.mark.parametrize("high,low", [(90, 10), (99, 1)])
def test_vra_per_feature_equals_pytorch_ood(conv, high, low):
    from pytorch_ood.detector import VRA

    net = conv["net"]
    ref = VRA(backbone=lambda x: openood_features(net, x)[1], head=net.fc, lower_percentile=low / 100,
              upper_percentile=high / 100)
    data = torch.utils.data.TensorDataset(normalise(conv["x_train"]), torch.zeros(len(conv["x_train"])).long())
    with torch.no_grad():
        ref.fit(torch.utils.data.DataLoader(data, batch_size=32))
        expected = ref.predict(normalise(conv["x"]))
    m = method("vra", percentile_high=high, percentile_low=low, thresholds="per_feature", fit_split="train")
    close(m.fit(conv["model"], conv["train"]).score(conv["x"]), expected)


def test_vra_clips_between_its_percentiles_and_is_energy_when_nothing_is_clipped(conv):
    model, train = conv["model"], conv["train"]
    features, logits = model.features_and_logits(conv["x_train"])
    m = method("vra", percentile_high=80, percentile_low=20).fit(model, val=train)
    shaped = m.shaped(features)
    low, high = m.stats_["low"], m.stats_["high"]
    assert shaped.min() >= low and shaped.max() <= high and low < high
    n = features.numel()   # a linearly interpolated percentile lies between two neighbouring order statistics

    def below(t, strict):
        return int(((features < t) if strict else (features <= t)).sum())

    for t, q in ((low, 0.2), (high, 0.8)):
        assert below(t, True) <= q * (n - 1) + 1 and below(t, False) >= q * (n - 1)
    # thresholds at the extremes of the fit set clip none of its activations: the energy score
    full = method("vra", percentile_high=100, percentile_low=0).fit(model, val=train)
    close(full.score(conv["x_train"]), -torch.logsumexp(logits, 1))
    for t in ("global", "per_feature"):
        f = method("vra", percentile_high=100, percentile_low=0, thresholds=t).fit(model, val=train)
        close(f.score_features(features, logits), -torch.logsumexp(logits, 1))


def test_vra_options_grid_and_state(conv):
    from oodbench.detectors import get

    assert get("vra").sweep() == {"percentile_high": [85, 90, 95, 99], "percentile_low": [1, 5, 10, 15]}
    m = method("vra").fit(conv["model"], val=conv["train"])
    m2 = method("vra").load_state_dict(m.state_dict()).use_model(conv["model"])
    close(m2.score(conv["x"]), m.score(conv["x"]))
    with pytest.raises(OODBenchError, match="percentile_low <= percentile_high"):
        method("vra", percentile_high=10, percentile_low=20).fit(conv["model"], val=conv["train"])
    with pytest.raises(OODBenchError, match="vra.thresholds"):
        method("vra", thresholds="channel").fit(conv["model"], val=conv["train"])
    with pytest.raises(OODBenchError, match="vra.fit_split"):
        method("vra", fit_split="test").fit(conv["model"], conv["train"])
