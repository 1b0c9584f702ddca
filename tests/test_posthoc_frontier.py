"""AdaSCALE-A / AdaSCALE-L: equal to a transcription, written here, of OpenOOD v1.5's `adascale` postprocessor
(openood/postprocessors/adascale_postprocessor.py, openood/networks/adascale_net.py) on the same model and images,
plus the defining property: the percentile adapts to the measured shift, and a fixed one is SCALE."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from oodbench.data import ImageSet
from oodbench.detectors import method
from oodbench.errors import OODBenchError
from oodbench.models import wrap

K, D = 5, 32


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, D, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(D, K)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture(scope="module")
def setup(tiny_images):
    torch.manual_seed(0)
    net = SmallNet()
    model = wrap(net, mean=[0.5] * 3, std=[0.25] * 3)
    x_val, x = tiny_images(200, 2), tiny_images(80, 3)
    return dict(model=model, net=net, val=ImageSet(x_val, None, "val"), x_val=x_val, x=x)


def close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=rtol, atol=atol)


# -- the reference: OpenOOD's postprocessor, re-written from its code on an OpenOOD-style (x → logits, feature) net --
def openood_features(net, data):
    """(logits, feature) of an OpenOOD backbone's forward(x, return_feature=True)."""
    feature = net.body(data)
    return net.fc(feature), feature


def openood_shift(net, data, o):
    """setup()/postprocess(): gradient of the top logit, perturb the o·CHW smallest-|grad| inputs by 0.5·sign."""
    data = data.clone().requires_grad_(True)
    output, feature = openood_features(net, data)
    labels = output.detach().argmax(dim=1)
    net.zero_grad()
    output[torch.arange(len(labels)), labels].backward(torch.ones(len(labels)))
    grad = data.grad.detach()
    b, c, h, w = data.shape
    n_pixels = int(c * h * w * o)
    abs_grad = grad.abs().view(b, c * h * w)
    idx = torch.topk(abs_grad, n_pixels, dim=1, largest=False)[1]
    mask = torch.zeros_like(abs_grad, dtype=torch.uint8).scatter_(1, idx, 1).view(b, c, h, w)
    with torch.no_grad():
        _, perturbed = openood_features(net, data.detach() + grad.sign() * mask * 0.5)
    return feature.detach(), perturbed, (feature.detach() - perturbed).abs()


def openood_norm(feature, perturbed, shift, k1, k2, lmbda):
    k1_, k2_ = int(D * k1 / 100), int(D * k2 / 100)
    top1 = torch.topk(feature, k=k1_, dim=1)[1]
    top2 = torch.topk(feature, k=k2_, dim=1)[1]
    return torch.gather(torch.relu(perturbed), 1, top1).sum(1) + lmbda * torch.gather(shift, 1, top2).sum(1)


def openood_adascale(net, inp_val, inp, percentile=(75, 85), k1=5, k2=1, lmbda=10, o=0.05, logit_scaling=False):
    val_norms = openood_norm(*openood_shift(net, inp_val, o), k1, k2, lmbda).numpy()
    feature, perturbed, shift = openood_shift(net, inp, o)
    norms = openood_norm(feature, perturbed, shift, k1, k2, lmbda).numpy()
    ecdf = (val_norms[None, :] <= norms[:, None]).mean(1)          # statsmodels ECDF: P(X <= t)
    pct = torch.from_numpy(percentile[0] + (1 - ecdf) * (percentile[1] - percentile[0]))
    x = torch.relu(feature)                                        # adascale_net.ada_scale
    n = x.shape[1]
    ks = n - torch.round(n * pct / 100.0).to(torch.int)
    values, _ = torch.topk(x, int(ks.max()), dim=1)
    mask = torch.arange(int(ks.max()))[None, :] < ks[:, None]
    scale = x.sum(1, keepdim=True) / (values * mask).sum(1, keepdim=True)
    with torch.no_grad():
        if logit_scaling:
            logits = net.fc(feature) * scale.float() ** 2.0
        else:
            logits = net.fc(feature * torch.exp(scale.float()))
    return torch.logsumexp(logits, dim=1), pct


@pytest.mark.parametrize("name,logit_scaling", [("adascale_a", False), ("adascale_l", True)])
@pytest.mark.parametrize("options", [{}, dict(percentile=[60, 95], k1=20, k2=10, lmbda=1.0, o=0.2)])
def test_adascale_equals_openood(setup, name, logit_scaling, options):
    model = setup["model"]
    ref_opts = dict(options, percentile=tuple(options.get("percentile", (75, 85))))
    ref, _ = openood_adascale(setup["net"], model.prepare(setup["x_val"]), model.prepare(setup["x"]),
                              logit_scaling=logit_scaling, **ref_opts)
    ours = method(name, **options).fit(model, val=setup["val"]).score(setup["x"])
    close(ours, -ref, rtol=1e-4, atol=1e-5)


def test_adascale_percentile_falls_as_the_measured_shift_grows(setup):
    model = setup["model"]
    m = method("adascale_a", percentile=[60, 95]).fit(model, val=setup["val"])
    out = m.outputs(setup["x"])
    norms = m.shift_norm(out["features"], out["perturbed"]).double()
    pct = m.percentiles(out["features"], out["perturbed"])
    order = norms.argsort()
    assert (pct[order].diff() <= 1e-12).all()                  # larger Q' → lower percentile (more kept)
    assert pct.min() >= 60 and pct.max() <= 95 and pct.max() - pct.min() > 10   # it really adapts
    _, ref_pct = openood_adascale(setup["net"], model.prepare(setup["x_val"]), model.prepare(setup["x"]),
                                  percentile=(60, 95))
    close(pct, ref_pct, rtol=0, atol=1e-9)
    # more shift on the same features → a lower percentile
    bigger = m.percentiles(out["features"], out["perturbed"] * 0 + out["perturbed"] + 1.0)
    assert (bigger <= pct + 1e-12).all() and (bigger < pct).any()


def test_adascale_a_with_a_fixed_percentile_is_scale(setup):
    model = setup["model"]
    ours = method("adascale_a", percentile=[85, 85]).fit(model, val=setup["val"]).score(setup["x"])
    close(ours, method("scale", percentile=85).fit(model).score(setup["x"]), rtol=1e-5, atol=1e-5)


def test_adascale_options_grid_and_state(setup):
    from oodbench.detectors.adascale import AdaScaleA

    assert AdaScaleA.defaults()["percentile"] == [75, 85]
    grid = AdaScaleA.sweep()["percentile"]
    assert len(grid) == 36 and [60, 65] in grid and [95, 99] in grid and all(a < b for a, b in grid)
    model = setup["model"]
    m = method("adascale_l").fit(model, val=setup["val"])
    again = method("adascale_l").use_model(model).load_state_dict(m.state_dict())
    close(again.score(setup["x"]), m.score(setup["x"]), rtol=0, atol=0)
    for bad in (dict(percentile=[90, 80]), dict(percentile=[0, 50]), dict(percentile=85), dict(k1=0),
                dict(o=1.5), dict(lmbda=-1.0), dict(num_samples=0)):
        with pytest.raises(OODBenchError):
            method("adascale_a", **bad).fit(model, val=setup["val"])
    with pytest.raises(OODBenchError, match="validation"):
        method("adascale_a").fit(model, setup["val"])
    with pytest.raises(OODBenchError):
        method("adascale_a").fit_features(np.zeros((4, D), np.float32), np.zeros((4, K), np.float32))


# -- MDS++ / RMDS++ (Mueller & Hein 2025, arXiv 2505.18032) -------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(tiny_images):
    torch.manual_seed(1)
    model = wrap(SmallNet(), mean=[0.5] * 3, std=[0.25] * 3)
    x_train, x = tiny_images(400, 4), tiny_images(60, 5)
    with torch.no_grad():   # a head centred on the training features, so that every class is predicted
        z = model.features(x_train)
        model.head.weight.copy_(torch.randn(K, D) / z.std(0).clamp_min(1e-3))
        model.head.bias.copy_(-(model.head.weight @ z.mean(0)))
        z_train, logits_train = model.features_and_logits(x_train)
        z_test, _ = model.features_and_logits(x)
    y = logits_train.argmax(1)
    assert set(y.tolist()) == set(range(K))
    return dict(model=model, train=ImageSet(x_train, y, "train"), x=x, z_train=z_train.numpy().astype(np.float64),
                y=y.numpy(), z=z_test.numpy().astype(np.float64))


def maha_norm_reference(z_train, y, z, relative):
    """The Mahalanobis++ authors' evaluate_(Relative_)Mahalanobis_norm (mueller-mp/maha-norm, NINCO/
    detection_methods.py), re-written: unit-norm features, class means, EmpiricalCovariance(assume_centered=True) of
    the class-centred rows; RMDS++ subtracts the distance to the global mean of the normalised training features."""
    from sklearn.covariance import EmpiricalCovariance

    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)   # noqa: E731
    f_train, f = unit(z_train), unit(z)
    means = np.stack([f_train[y == c].mean(0) for c in range(K)])
    centred = np.concatenate([f_train[y == c] - means[c] for c in range(K)])
    prec = EmpiricalCovariance(assume_centered=True).fit(centred).precision_
    d = np.stack([(((f - m) @ prec) * (f - m)).sum(-1) for m in means], 1)          # (B, C)
    if relative:
        m0 = f_train.mean(0)
        prec0 = EmpiricalCovariance(assume_centered=True).fit(f_train - m0).precision_
        d = d - ((((f - m0) @ prec0) * (f - m0)).sum(-1))[:, None]
    return d.min(1)        # the authors' score is minus this (higher = ID); oodbench's is this (higher = OOD)


@pytest.mark.parametrize("name,relative", [("mahalanobis_pp", False), ("rmds_pp", True)])
def test_mahalanobis_pp_equals_the_authors_code(labelled, name, relative):
    ref = maha_norm_reference(labelled["z_train"], labelled["y"], labelled["z"], relative)
    ours = method(name).fit(labelled["model"], labelled["train"]).score(labelled["x"])
    close(ours.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,plain", [("mahalanobis_pp", "mahalanobis"), ("rmds_pp", "rmds")])
def test_mahalanobis_pp_ignores_feature_norms_and_is_the_plain_method_on_unit_features(labelled, name, plain):
    g = torch.Generator().manual_seed(0)
    z_train, z = torch.from_numpy(labelled["z_train"]).float(), torch.from_numpy(labelled["z"]).float()
    y = torch.from_numpy(labelled["y"])
    logits = torch.zeros(len(z), K)
    m = method(name).fit_features(z_train, torch.zeros(len(z_train), K), y)
    base = m.score_features(z, logits)
    scaled = m.score_features(z * (0.1 + 10 * torch.rand(len(z), 1, generator=g)), logits)   # per-image norms
    close(scaled, base, rtol=1e-5, atol=1e-5)
    refit = method(name).fit_features(z_train * (0.1 + 10 * torch.rand(len(z_train), 1, generator=g)),
                                      torch.zeros(len(z_train), K), y)
    close(refit.score_features(z, logits), base, rtol=1e-4, atol=1e-4)
    unit = torch.nn.functional.normalize
    on_unit = method(plain).fit_features(unit(z_train, dim=1), torch.zeros(len(z_train), K), y)
    close(on_unit.score_features(unit(z, dim=1), logits), base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(method(plain).fit_features(z_train, torch.zeros(len(z_train), K), y)
                              .score_features(z, logits), base, rtol=1e-2)


# -- GMM (OpenOOD gmm) and the class-conditional GMM (pytorch-ood GMM) --------------------------------------------------
def openood_gmm(z_train, z, components, pca, seed=0):
    """OpenOOD's get_GMM_stat / compute_GMM_score, re-written for the penultimate layer: PCA axes (uncentred
    projection), GaussianMixture(tied, random_state), conf = log Σ_k w_k exp(−½ d_k) (float64: no underflow here)."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    # OpenOOD's 'none' is np.eye (float64: the mixture then fits in float64); oodbench fits the float32 features
    # as they are (no N x D float64 copy), so the reference keeps their dtype here
    transform = PCA(n_components=pca).fit(z_train).components_.T if pca else np.eye(z_train.shape[1],
                                                                                 dtype=z_train.dtype)
    gm = GaussianMixture(n_components=components, random_state=seed, covariance_type="tied").fit(z_train @ transform)
    f = z @ transform
    prob = np.stack([np.exp(-0.5 * (((f - m) @ gm.precisions_) * (f - m)).sum(1)) for m in gm.means_], 1)
    return np.log(prob @ gm.weights_)


@pytest.mark.parametrize("components,pca", [(4, 8), (2, 0)])
def test_gmm_equals_openood(labelled, components, pca):
    z_train = labelled["z_train"].astype(np.float32)
    ref = openood_gmm(z_train, labelled["z"].astype(np.float32), components, pca)
    ours = method("gmm", components=components, pca=pca).fit(labelled["model"], labelled["train"]).score(labelled["x"])
    assert np.isfinite(ref).all()
    close(ours.double(), -torch.from_numpy(ref), rtol=1e-4, atol=1e-3)


def test_gmm_with_one_component_is_half_the_mahalanobis_distance_to_the_mean(labelled):
    z_train, z = torch.from_numpy(labelled["z_train"]), torch.from_numpy(labelled["z"])
    logits = torch.zeros(len(z), K)
    ours = method("gmm", components=1, pca=0, reg=0.0).fit_features(z_train.float(), torch.zeros(len(z_train), K))
    centred = z_train - z_train.mean(0)
    prec = torch.linalg.inv(centred.T @ centred / len(z_train))
    d = (((z - z_train.mean(0)) @ prec) * (z - z_train.mean(0))).sum(1)
    close(ours.score_features(z.float(), logits).double(), 0.5 * d, rtol=1e-3, atol=1e-3)
    again = method("gmm").load_state_dict(ours.state_dict())
    close(again.score_features(z.float(), logits), ours.score_features(z.float(), logits), rtol=0, atol=0)
    for bad in (dict(components=0), dict(pca=33), dict(pca=-1), dict(components=1000), dict(reg=-1.0)):
        with pytest.raises(OODBenchError):
            method("gmm", **bad).fit_features(z_train.float(), torch.zeros(len(z_train), K))


def test_gmm_class_equals_pytorch_ood(labelled):
    pood = pytest.importorskip("pytorch_ood.detector", reason="pytorch-ood is in the test extra")
    z_train, y = torch.from_numpy(labelled["z_train"]).float(), torch.from_numpy(labelled["y"])
    ref = pood.GMM(None, reg=1e-4).fit_features(z_train, y).predict_features(torch.from_numpy(labelled["z"]).float())
    ours = method("gmm_class", reg=1e-4).fit(labelled["model"], labelled["train"]).score(labelled["x"])
    close(ours.double(), ref.double(), rtol=1e-5, atol=1e-4)


def test_gmm_class_is_the_gaussian_negative_log_density():
    z_train = torch.tensor([[0.0], [2.0], [4.0], [10.0], [14.0]])
    y = torch.tensor([0, 0, 0, 1, 1])
    m = method("gmm_class", reg=0.0).fit_features(z_train, torch.zeros(5, 2), y)
    z = torch.tensor([[1.0], [30.0]])
    var0, var1 = 8.0 / 3.0, 4.0
    dens = lambda x, mu, var: np.exp(-(x - mu) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var)   # noqa: E731
    ref = [-np.log(0.6 * dens(x, 2.0, var0) + 0.4 * dens(x, 12.0, var1)) for x in (1.0, 30.0)]
    close(m.score_features(z, torch.zeros(2, 2)).double(), torch.tensor(ref), rtol=1e-6, atol=1e-6)
