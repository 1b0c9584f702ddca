"""Post-hoc methods: each equals pytorch-ood 0.4.0's implementation (or, where it has none or differs by convention,
a reference written here from the paper's / OpenOOD's formula) on the same small model and data."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import spearmanr
from sklearn.covariance import EmpiricalCovariance

from oodbench.data import ImageSet
from oodbench.detectors import get, method
from oodbench.errors import OODBenchError
from oodbench.models import wrap
from conftest import tiny_image_batch as images  # noqa: F401  (imported from here by other test files)

pood = pytest.importorskip("pytorch_ood.detector", reason="pytorch-ood is in the test extra")
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
    model = wrap(SmallNet(), mean=[0.5] * 3, std=[0.25] * 3)
    x_train, x_val, x_test = tiny_images(600, 1), tiny_images(200, 2), tiny_images(100, 3)
    with torch.no_grad():   # a head centred on the training features, so that every class is predicted
        z = model.features(x_train)
        fc = model.head
        fc.weight.copy_(torch.randn(K, D) / z.std(0).clamp_min(1e-3))
        fc.bias.copy_(-(fc.weight @ z.mean(0)))
        z_train, logits_train = model.features_and_logits(x_train)
        z_val, logits_val = model.features_and_logits(x_val)
        z_test, logits_test = model.features_and_logits(x_test)
    y_train, y_val = logits_train.argmax(1), logits_val.argmax(1)
    flip = torch.arange(len(y_train)) % 7 == 0                     # some training images misclassified
    y_train = torch.where(flip, (y_train + 1) % K, y_train)
    y_val = torch.where(torch.arange(len(y_val)) % 3 == 0, (y_val + 2) % K, y_val)   # an interior optimal T
    assert set(y_train.tolist()) == set(range(K))
    train, val = ImageSet(x_train, y_train, "train"), ImageSet(x_val, y_val, "val")
    return dict(model=model, train=train, val=val, x=x_test, z=z_test, logits=logits_test,
                z_train=z_train, y_train=y_train, logits_val=logits_val, y_val=y_val)


def fitted(setup, name, **options):
    """The method as a user makes it: options in the constructor, fitted on the ID training/validation images."""
    return method(name, **options).fit(setup["model"], setup["train"], val=setup["val"])


def ours(setup, name, **options):
    return fitted(setup, name, **options).score(setup["x"])


def head(setup):
    return setup["model"].head


def close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=rtol, atol=atol)


def ranks_equal(a, b):
    assert spearmanr(np.asarray(a), np.asarray(b)).statistic >= 0.9999


# -- logits ----------------------------------------------------------------------------------------------------------
def test_logit_scores_equal_pytorch_ood(setup):
    logits = setup["logits"]
    close(ours(setup, "msp"), pood.MaxSoftmax.score(logits))
    close(ours(setup, "maxlogit"), pood.MaxLogit.score(logits))
    close(ours(setup, "energy"), pood.EnergyBased.score(logits))
    close(ours(setup, "entropy"), pood.Entropy.score(logits))


@pytest.mark.parametrize("gamma,m", [(0.1, 100), (2.0, 3)])
def test_gen_with_clamp_is_pytorch_ood_times_m(setup, gamma, m):
    # pytorch-ood averages over the top-M probabilities; the paper (and OpenOOD) sums them: a constant factor.
    expected = pood.GEN.score(setup["logits"], gamma=gamma, M=m) * min(m, K)
    close(ours(setup, "gen", gamma=gamma, m=m, clamp=True), expected)


def openood_gen(logits: torch.Tensor, gamma: float, m: int) -> np.ndarray:
    """Transcription of OpenOOD v1.5's gen_postprocessor.generalized_entropy (the GEN authors' formula), in float64:
    sort the softmax, keep the top M, sum p^gamma (1 - p)^gamma; no clamp. OpenOOD's confidence is its negation."""
    from scipy.special import softmax

    probs = softmax(logits.double().numpy(), axis=1)
    top = np.sort(probs, axis=1)[:, -m:]
    return np.sum(top ** gamma * (1 - top) ** gamma, axis=1)


@pytest.mark.parametrize("scale", [1, 4, 8])
def test_gen_equals_openood_without_a_clamp_on_confident_logits(setup, scale):
    logits = setup["logits"] * scale * 4          # confident: 1 - p underflows the clamp's 1e-7 for many images
    det = method("gen", gamma=0.1, m=100)
    got = det.score_logits(logits).double().numpy()
    np.testing.assert_allclose(got, openood_gen(logits, 0.1, 100), rtol=1e-5, atol=1e-7)
    if scale == 8:    # where pytorch-ood's clamp is no longer a reference: its scores differ
        clamped = method("gen", gamma=0.1, m=100, clamp=True).score_logits(logits).double().numpy()
        assert np.abs(clamped - got).max() > 1e-3


def test_tempscale_finds_the_nll_optimum_on_validation(setup):
    det = fitted(setup, "tempscale")
    scores = det.score(setup["x"])
    logits_val, y_val = setup["logits_val"].double(), setup["y_val"]
    grid = torch.logspace(-1, 1.5, 20001, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits_val / t, y_val) for t in grid])
    assert det.stats_ == pytest.approx(grid[nll.argmin()].item(), rel=1e-3)
    close(scores, -(setup["logits"] / det.stats_).softmax(1).amax(1))
    # pytorch-ood's LBFGS (lr 0.01, 50 iterations) stops short of the optimum; it never reaches a lower NLL.
    ref = pood.TemperatureScaling(None).fit_logits(setup["logits_val"], y_val)
    nll_of = lambda t: torch.nn.functional.cross_entropy(logits_val / t, y_val).item()  # noqa: E731
    assert nll_of(det.stats_) <= nll_of(ref.t.item()) + 1e-9
    close(ref.predict_logits(setup["logits"]).detach(), -(setup["logits"] / ref.t.item()).softmax(1).amax(1))


def test_klm_equals_pytorch_ood(setup):
    ref = pood.KLMatching(None).fit_logits(setup["logits_val"], setup["y_val"])
    close(ours(setup, "klm"), ref.predict_logits(setup["logits"]))


# -- feature space ---------------------------------------------------------------------------------------------------
def test_vim_equals_pytorch_ood(setup):
    fc = head(setup)
    ref = pood.ViM(None, d=12, w=fc.weight, b=fc.bias).fit_features(setup["z_train"], setup["y_train"])
    # pytorch-ood's eigendecomposition is float32, ours float64
    close(ours(setup, "vim", dim=12), ref.predict_features(setup["z"]), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("split", ["train", "val"])
def test_residual_equals_openood_formula(setup, split):
    """OpenOOD's residual postprocessor fits on the validation features; ViM's code on the training ones."""
    with torch.no_grad():
        z_fit = setup["z_train"] if split == "train" else setup["model"].features(setup["val"].images)
    fc, z_fit, z = head(setup), z_fit.double().numpy(), setup["z"].double().numpy()
    w, b = fc.weight.detach().double().numpy(), fc.bias.detach().double().numpy()
    u = -np.linalg.pinv(w) @ b
    values, vectors = np.linalg.eig(EmpiricalCovariance(assume_centered=True).fit(z_fit - u).covariance_)
    ns = vectors.T[np.argsort(-values)[12:]].T
    close(ours(setup, "residual", dim=12, fit_split=split), np.linalg.norm((z - u) @ ns, axis=-1), rtol=1e-4,
          atol=1e-4)


def test_react_threshold_from_the_chosen_split(setup):
    """react.fit_split=val takes the clip threshold from the validation features (OpenOOD), train from the training
    ones (the paper, pytorch-ood); a split that is neither is a one-line error."""
    with torch.no_grad():
        z_val = setup["model"].features(setup["val"].images)
    for split, feats in (("train", setup["z_train"]), ("val", z_val)):
        det = fitted(setup, "react", percentile=90, fit_split=split)
        assert det.stats_ == pytest.approx(float(np.percentile(feats.numpy().ravel(), 90)))
    with pytest.raises(OODBenchError, match="react.fit_split is 'train' or 'val'"):
        fitted(setup, "react", fit_split="test")


def test_rmds_equals_the_paper_and_ranks_as_pytorch_ood(setup):
    z_train, y, z = setup["z_train"].double().numpy(), setup["y_train"].numpy(), setup["z"].double().numpy()
    means = np.stack([z_train[y == c].mean(0) for c in range(K)])
    precision = EmpiricalCovariance(assume_centered=True).fit(z_train - means[y]).precision_
    background = EmpiricalCovariance().fit(z_train)
    diff = z[:, None] - means[None]
    md = np.einsum("bcd,de,bce->bc", diff, precision, diff)
    md0 = background.mahalanobis(z)
    got = ours(setup, "rmds")
    close(got, (md - md0[:, None]).min(1), rtol=1e-4, atol=1e-3)
    # pytorch-ood's covariances are sums, not means (scale 1/N): the same ranking.
    ranks_equal(got, pood.RMD(None).fit_features(setup["z_train"], setup["y_train"]).predict_features(setup["z"]))


def test_mahalanobis_ranks_as_pytorch_ood(setup):
    ref = pood.Mahalanobis(None).fit_features(setup["z_train"], setup["y_train"]).predict_features(setup["z"])
    ranks_equal(ours(setup, "mahalanobis"), ref)


def test_she_equals_pytorch_ood(setup):
    ref = pood.SHE(lambda x: x, head(setup)).fit_features(setup["z_train"], setup["y_train"])
    close(ours(setup, "she"), ref.predict_features(setup["z"]).detach())


def test_nnguide_equals_pytorch_ood(setup):
    ref = pood.NNGuide(None, head(setup), k=7).fit_features(setup["z_train"], setup["y_train"])
    close(ours(setup, "nnguide", k=7), ref.predict_features(setup["z"]))


@pytest.mark.parametrize("normalizer", [True, False])
def test_fdbd_equals_pytorch_ood_and_openood(setup, normalizer):
    got = ours(setup, "fdbd", distance_as_normalizer=normalizer)
    if normalizer:
        ref = pood.fDBD(None, head(setup)).fit_features(setup["z_train"])
        close(got, ref.predict_features(setup["z"]))
    else:   # OpenOOD's validation-selected variant: the feature norm as normaliser
        logits, z = setup["logits"], setup["z"]
        w = head(setup).weight.detach()
        top, pred = logits.max(1)
        gaps = (w[pred][:, None, :] - w[None]).norm(dim=2)
        gaps[torch.arange(len(z)), pred] = 1.0
        close(got, -((top[:, None] - logits) / gaps).sum(1) / (K - 1) / z.norm(dim=1))


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_nci_equals_pytorch_ood(setup, alpha):
    ref = pood.NCI(None, head(setup), alpha=alpha).fit_features(setup["z_train"])
    close(ours(setup, "nci", alpha=alpha), ref.predict_features(setup["z"]))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_equals_pytorch_ood_on_both_backends(setup, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    ref = pood.KNN(None, k=9).fit_features(setup["z_train"], setup["y_train"]).predict_features(setup["z"])
    close(ours(setup, "knn", k=9, backend=backend), ref, rtol=1e-4, atol=1e-4)


# -- activation shaping ----------------------------------------------------------------------------------------------
def maps_head(setup):
    return lambda maps: head(setup)(maps.flatten(1))


@pytest.mark.parametrize("percentile", [65, 90])
def test_react_equals_pytorch_ood(setup, percentile):
    ref = pood.ReAct(lambda x: x, maps_head(setup), percentile=percentile / 100)
    ref.fit_feature_maps(setup["z_train"], setup["y_train"])
    close(ours(setup, "react", percentile=percentile), ref.predict_feature_maps(setup["z"]))


@pytest.mark.parametrize("variant", ["ash_p", "ash_b", "ash_s"])
@pytest.mark.parametrize("percentile", [65, 90])
def test_ash_equals_pytorch_ood(setup, variant, percentile):
    ref = pood.ASH(lambda x: x, maps_head(setup), variant=variant.replace("_", "-"), percentile=percentile / 100)
    close(ours(setup, variant, percentile=percentile), ref.predict_feature_maps(setup["z"][:, :, None, None]),
          rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("percentile", [65, 85])
def test_scale_equals_pytorch_ood(setup, percentile):
    ref = pood.SCALE(lambda x: x, maps_head(setup), percentile=percentile / 100)
    close(ours(setup, "scale", percentile=percentile), ref.predict_feature_maps(setup["z"][:, :, None, None]),
          rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["ash_p", "ash_b", "ash_s", "scale"])
def test_shaping_the_map_before_pooling_equals_pytorch_ood(setup, variant):
    """placement=map shapes the last feature map before pooling, as pytorch-ood does with a backbone that returns it
    (the default, pooled, is the ASH and SCALE authors' code and OpenOOD: tested against pytorch-ood on (B, D, 1, 1))."""
    net = setup["model"].net
    model = wrap(net, mean=[0.5] * 3, std=[0.25] * 3, layers=["body.1"])   # the ReLU map before the average pool
    pood_cls = pood.SCALE if variant == "scale" else pood.ASH
    kwargs = {} if variant == "scale" else {"variant": variant.replace("_", "-")}
    ref = pood_cls(lambda x: net.body[:2](x), lambda m: net.fc(net.body[2:](m)), percentile=0.8, **kwargs)
    with torch.no_grad():
        expected = ref.predict_feature_maps(net.body[:2](model.prepare(setup["x"])))
    det = method(variant, percentile=80, placement="map").fit(model, setup["train"], val=setup["val"])
    got = det.score(setup["x"])
    close(got, expected, rtol=1e-4, atol=1e-4)
    pooled = method(variant, percentile=80).fit(model, setup["train"], val=setup["val"]).score(setup["x"])
    assert not torch.allclose(got, pooled, atol=1e-3)     # the two placements are different detectors
    with pytest.raises(OODBenchError, match="reads more than the penultimate features"):
        det.score_features(setup["z"], setup["logits"])
    with pytest.raises(OODBenchError, match="placement is 'pooled' or 'map'"):
        method(variant, placement="maps").fit(model, setup["train"], val=setup["val"]).score(setup["x"])


@pytest.mark.parametrize("p", [50, 90])
def test_dice_equals_pytorch_ood(setup, p):
    fc = head(setup)
    ref = pood.DICE(None, w=fc.weight, b=fc.bias, p=p / 100).fit_features(setup["z_train"], setup["y_train"])
    close(ours(setup, "dice", p=p), ref.predict_features(setup["z"]))


def test_shaping_keeps_the_top_activations(setup):
    from oodbench.detectors.shaping import AshP

    det = AshP(percentile=75)
    f = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.0, 6.0, 5.0]])
    assert torch.equal(det.shaped(f), torch.tensor([[0.0, 0, 0, 0, 0, 0, 6.0, 5.0]]))


def test_methods_share_one_network_pass_per_set(setup):
    from oodbench.detectors.posthoc import SET_OUTPUTS
    from oodbench.workflow.scoring import score_set

    SET_OUTPUTS.items.clear()
    calls = []
    hook = setup["model"].net.register_forward_hook(lambda _m, inputs, _out: calls.append(len(inputs[0])))
    try:
        test = ImageSet(setup["x"], None, "test")
        dets = {}
        for name in ("vim", "react", "knn", "rmds"):
            dets[name] = fitted(setup, name)   # fitted before counting
        calls.clear()
        scores = {name: score_set(det, test, batch_size=32)[name] for name, det in dets.items()}
        assert sum(calls) == len(test)                                  # one pass over the set for all four
        for name, det in dets.items():                                  # the same scores as batch by batch
            np.testing.assert_allclose(scores[name], det.score(setup["x"]).numpy(), rtol=1e-5, atol=1e-5)
    finally:
        hook.remove()


def test_the_suite_scores_a_torchvision_model_from_the_cli(tmp_path, capsys):
    import json

    from oodbench.cli import main

    methods = "vim,react,ash_s,dice,gen,scale"
    assert main(["eval", "--model", "torchvision:resnet18:none", "--method", methods, "--in", "fashion_mnist",
                 "--out", "noise:gaussian", "--fit-limit", "1000", "--limit", "300", "--format", "json",
                 "--runs-dir", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == methods.split(",")
    assert all(0.0 <= r["auroc"] <= 1.0 for r in rows)
    assert main(["methods"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert set(methods.split(",")) | {"entropy", "tempscale", "klm", "residual", "rmds", "she", "nnguide", "fdbd",
                                      "nci", "ash_p", "ash_b"} <= listed
