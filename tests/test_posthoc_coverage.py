"""NAC (equal to pytorch-ood 0.4.0's NACUE), VRA, Relation and iODIN on a tiny model and images, each against its
reference, plus each method's defining property."""
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
