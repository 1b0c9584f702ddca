"""Methods of intermediate feature maps (gram, mds_ensemble, rankfeat) and openmax, each equal to pytorch-ood 0.4.0
on the same small model and data (or to it up to the factor docs/posthoc.md names), and the model layer's named
feature maps (`ClassifierModel.feature_maps`)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.covariance import EmpiricalCovariance
from test_posthoc import close, fitted, images, ours, ranks_equal

from oodbench.data import ImageSet
from oodbench.detectors import get
from oodbench.errors import OODBenchError
from oodbench.models import ClassifierModel, load_model, openood_resnet18_32x32, wrap
from oodbench.nets.classifiers import build_classifier

pood = pytest.importorskip("pytorch_ood.detector", reason="pytorch-ood is in the test extra")
K = 5


@pytest.fixture(scope="module")
def setup():
    """oodbench's resnet20 on 8x8 images: BN statistics from the training images, a head centred on their features
    (every class predicted), labels mostly the predictions (some flipped)."""
    torch.manual_seed(0)
    net = build_classifier("resnet20", 3, K)
    model = wrap(net, mean=[0.5] * 3, std=[0.25] * 3)
    x_train, x_val, x_test = images(600, 1), images(200, 2), images(100, 3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        net.train()
        net(model.prepare(x_train))
        net.eval()
        z = model.features(x_train)
        net.head.weight.copy_(torch.randn(K, z.shape[1]) / z.std(0).clamp_min(1e-3))
        net.head.bias.copy_(-(net.head.weight @ z.mean(0)))
        logits_train = model.logits(x_train)
    y_train = logits_train.argmax(1)
    y_train = torch.where(torch.arange(len(y_train)) % 7 == 0, (y_train + 1) % K, y_train)
    assert set(y_train.tolist()) == set(range(K))
    body = net.body   # the same network as consecutive pieces, for pytorch-ood's layer lists
    pieces = [body[0:3], body[3:6], body[6:9], body[9:12]]
    train, val = ImageSet(x_train, y_train, "train"), ImageSet(x_val, None, "val")
    return dict(model=model, net=net, pieces=pieces, tail=nn.Sequential(body[12:], net.head), train=train,
                val=val, x=x_test, x_train=x_train, y_train=y_train, logits_train=logits_train)


def prepared(setup, x):
    return setup["model"].prepare(x)


# -- the model layer -------------------------------------------------------------------------------------------------
def test_feature_maps_of_torchvision_resnet18_are_its_stem_and_stages():
    model = load_model("torchvision:resnet18:none")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    maps, logits = model.feature_maps(x)
    net, inp = model.net, model.prepare(x)
    with torch.no_grad():
        stem = net.relu(net.bn1(net.conv1(inp)))
        expected = {"relu": stem}
        h = net.maxpool(stem)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = expected[name] = getattr(net, name)(h)
    assert list(maps) == ["relu", "layer1", "layer2", "layer3", "layer4"]
    for name, value in expected.items():
        close(maps[name], value)
    close(logits, model.logits(x))


def test_feature_maps_of_the_openood_layout_are_its_feature_list():
    torch.manual_seed(0)
    net = openood_resnet18_32x32(10).eval()
    model = ClassifierModel(net, [0.5] * 3, [0.25] * 3, head=net.fc, name="openood")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    maps, _ = model.feature_maps(x)
    with torch.no_grad():   # OpenOOD's ResNet18_32x32.forward(return_feature_list=True), features 1 to 4 + layer4
        f = torch.relu(net.bn1(net.conv1(model.prepare(x))))
        feature_list = [f]
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            feature_list.append(layer(feature_list[-1]))
    assert [tuple(m.shape[1:]) for m in maps.values()] == [(64, 32, 32), (64, 32, 32), (128, 16, 16),
                                                            (256, 8, 8), (512, 4, 4)]
    for got, want in zip(maps.values(), feature_list):
        close(got, want)


def test_feature_maps_of_small_cnn_and_named_layers(setup):
    torch.manual_seed(0)
    net = build_classifier("small_cnn", 1, 3, width=4).eval()
    model = wrap(net, mean=[0.5], std=[0.25])
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    maps, _ = model.feature_maps(x)
    assert [tuple(m.shape[1:]) for m in maps.values()] == [(4, 8, 8), (8, 4, 4), (16, 2, 2)]
    with torch.no_grad():
        close(maps["body.10"], net.body[:11](model.prepare(x)))
    named = wrap(net, mean=[0.5], std=[0.25], layers=["body.5", "body.9"])
    assert list(named.feature_maps(x)[0]) == ["body.5", "body.9"]
    assert list(setup["model"].feature_maps(setup["x"][:2])[0]) == ["body.2", "body.5", "body.8", "body.11"]


@pytest.mark.parametrize("arch,names,channels,resnet_like", [
    ("resnet18", ["body.relu", "body.layer1", "body.layer2", "body.layer3", "body.layer4"], [64, 64, 128, 256, 512],
     True),
    ("resnet20", ["body.2", "body.5", "body.8", "body.11"], [16, 16, 32, 64], True),
    ("wrn40_2", ["body.0", "body.6", "body.12", "body.20"], [16, 32, 64, 128], True),
    ("small_cnn", ["body.2", "body.6", "body.10"], [32, 64, 128], False)])
def test_auto_layers_of_oodbench_nets_are_their_stage_outputs(arch, names, channels, resnet_like):
    from oodbench.models import auto_layers

    net = build_classifier(arch, 3, 4)
    assert auto_layers(net) == (names, resnet_like)
    maps, _ = wrap(net, mean=[0.5] * 3, std=[0.25] * 3).feature_maps(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    assert [m.shape[1] for m in maps.values()] == channels


def test_auto_layers_of_a_timm_resnet():
    timm = pytest.importorskip("timm")
    from oodbench.models import auto_layers

    assert auto_layers(timm.create_model("resnet18")) == (["act1", "layer1", "layer2", "layer3", "layer4"], True)


def test_model_layers_from_the_command_line_and_their_errors():
    from oodbench.workflow import split_model_overrides

    options, rest = split_model_overrides(["model.layers=[layer3, layer4]", "gram.powers=[1]"])
    assert options == {"layers": ["layer3", "layer4"]} and rest == ["gram.powers=[1]"]
    model = load_model("torchvision:resnet18:none", **options)
    assert model.layer_names() == ["layer3", "layer4"]
    auto = load_model("torchvision:resnet18:none")
    assert model.digest != auto.digest == load_model("torchvision:resnet18:none", layers="auto").digest   # score keys
    with pytest.raises(OODBenchError, match="no module 'layer9'"):
        load_model("torchvision:resnet18:none", layers=["layer9"])
    with pytest.raises(OODBenchError, match="list of module names"):
        load_model("torchvision:resnet18:none", layers="layer4")
    with pytest.raises(OODBenchError, match="no automatic choice"):
        wrap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))).layer_names()


# -- gram ------------------------------------------------------------------------------------------------------------
def batches(setup, x, y, size=128):
    inp = prepared(setup, x)
    return [(inp[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@pytest.mark.parametrize("powers", [[1, 2, 3, 4, 5], [2]])
def test_gram_is_pytorch_ood_over_the_max_softmax(setup, powers):
    ref = pood.Gram(setup["tail"], setup["pieces"], K, num_poles_list=powers)
    torch.manual_seed(0)                 # pytorch-ood holds out 10% of each class with torch.randperm; ours: seed 0
    ref.fit(batches(setup, setup["x_train"], setup["y_train"]))
    inp = prepared(setup, setup["x"])
    expected = ref.predict(inp)
    msp = setup["net"](inp).softmax(1).amax(1).detach()
    got = ours(setup, "gram", powers=powers)
    close(got * msp, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0


# -- mds_ensemble ----------------------------------------------------------------------------------------------------
def test_mds_ensemble_without_noise_is_pytorch_ood_times_n(setup):
    ref = pood.MultiMahalanobis(setup["pieces"])
    ref.fit(batches(setup, setup["x_train"], setup["y_train"]))
    expected = ref.predict(prepared(setup, setup["x"]))
    got = ours(setup, "mds_ensemble", noise=0.0)
    # pytorch-ood's covariance is a sum of outer products (+1e-6 I), ours (and OpenOOD's) a mean: a factor N.
    close(got, expected * len(setup["x_train"]), rtol=1e-3, atol=1e-3)
    ranks_equal(got, expected)


def test_mds_ensemble_noise_step_equals_the_formula(setup):
    """Lee et al.'s pre-processing per layer, written here: x' = x − ε·sign(∇ min_c d_c)/std, then ½ min_c d_c(x'),
    summed over the layers."""
    noise, std = 0.01, 0.25
    inp = prepared(setup, setup["x"])
    y = setup["y_train"].numpy()
    total = 0.0
    for i in range(len(setup["pieces"])):
        layer = nn.Sequential(*setup["pieces"][: i + 1])
        with torch.no_grad():
            z = layer(prepared(setup, setup["x_train"])).mean((2, 3)).double().numpy()
        means = np.stack([z[y == c].mean(0) for c in range(K)])
        precision = torch.as_tensor(EmpiricalCovariance().fit(z - means[y]).precision_)
        means = torch.as_tensor(means)

        def half_d(x):
            diff = layer(x).mean((2, 3)).double()[:, None] - means[None]
            return 0.5 * torch.einsum("bcd,de,bce->bc", diff, precision, diff).amin(1)

        x = inp.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(half_d(x).sum(), x)
        with torch.no_grad():
            total = total + half_d(inp - noise * torch.where(grad >= 0, 1.0, -1.0) / std)
    got = ours(setup, "mds_ensemble", noise=noise)
    close(got, total, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, ours(setup, "mds_ensemble", noise=0.0))


def test_mds_ensemble_layer_weights(setup):
    weights = [0.0, 0.0, 0.0, 1.0]
    got = ours(setup, "mds_ensemble", noise=0.0, alpha=weights)
    ref = pood.MultiMahalanobis(setup["pieces"], alpha=weights)
    ref.fit(batches(setup, setup["x_train"], setup["y_train"]))
    ranks_equal(got, ref.predict(prepared(setup, setup["x"])))
    with pytest.raises(OODBenchError, match="one number per layer"):
        ours(setup, "mds_ensemble", alpha=[1.0, 2.0])


# -- rankfeat --------------------------------------------------------------------------------------------------------
def test_rankfeat_equals_pytorch_ood_on_both_blocks(setup):
    p, tail, inp = setup["pieces"], setup["tail"], prepared(setup, setup["x"])
    logits = lambda z: z  # noqa: E731
    last = pood.RankFeat(nn.Sequential(*p), tail, detector=logits).predict(inp)
    before = pood.RankFeat(nn.Sequential(*p[:3]), nn.Sequential(p[3], tail), detector=logits).predict(inp)
    expected = pood.EnergyBased.score((last + before) / 2)        # OpenOOD: the mean logits, temperature 1
    close(ours(setup, "rankfeat"), expected, rtol=1e-4, atol=1e-4)
    t = 2.0
    close(ours(setup, "rankfeat", temperature=t), -t * torch.logsumexp((last + before) / 2 / t, 1), rtol=1e-4,
          atol=1e-4)


def test_rankfeat_needs_a_resnet_like_model():
    net = build_classifier("small_cnn", 3, K, width=4).eval()
    det = get("rankfeat")()
    det.use_model(wrap(net, mean=[0.5] * 3, std=[0.25] * 3))
    with pytest.raises(OODBenchError, match="rankfeat needs a ResNet-like model"):
        det.score(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))
    det.use_model(wrap(net, mean=[0.5] * 3, std=[0.25] * 3, layers=["body.6", "body.10"]))   # named: allowed
    assert det.score(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)).shape == (2,)


# -- openmax ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tailsize,alpha", [(20, 3), (8, 5)])
def test_openmax_equals_pytorch_ood_on_correctly_classified_training_logits(setup, tailsize, alpha):
    logits, y = setup["logits_train"], setup["y_train"]
    correct = logits.argmax(1) == y          # OpenOOD (and the paper) fit on correctly classified images only
    # in float64: shifted by libMR's 10000, float32 distances keep ~1e-3 of their spread (ours are float64)
    ref = pood.OpenMax(None, tailsize=tailsize, alpha=alpha, euclid_weight=1.0)
    ref.fit_logits(logits[correct].double(), y[correct])
    test_logits = setup["model"].logits(setup["x"])
    assert len(test_logits.argmax(1).unique()) == K    # pytorch-ood measures distances to predicted classes only
    close(ours(setup, "openmax", tailsize=tailsize, alpha=alpha, translation=10000),
          ref.predict_logits(test_logits.double()))


def libmr_openmax(train_logits, train_labels, test_logits, tailsize, alpha):
    """Transcription of OpenOOD v1.5's openmax_postprocessor with libmr 0.1.9's MR(): per class the mean of the
    correctly classified training logits, `fit_high` on the `tailsize` largest Euclidean distances (sorted descending,
    small_score = the tail's smallest, data + translate_amount(1) - small_score, 2-parameter Weibull MLE), w_score =
    CDF(d + 1 - small_score); the top-alpha logits revised by (alpha - rank)/alpha weights; the unknown class's
    softmax probability."""
    from scipy.stats import weibull_min

    x, t = train_logits.double().numpy(), test_logits.double().numpy()
    k = x.shape[1]
    models = []
    for c in range(k):
        own = x[(x.argmax(1) == c) & (train_labels.numpy() == c)]
        mav = own.mean(0)
        dist = np.sort(np.linalg.norm(own - mav, axis=1))[::-1][:tailsize]
        small = dist[-1]
        shape, _, scale = weibull_min.fit(dist + 1 - small, floc=0)
        models.append((mav, small, shape, scale))
    probs = []
    for row in t:
        ranked = np.argsort(row)[::-1]
        weights = np.zeros(k)
        weights[ranked[:alpha]] = [(alpha - i) / alpha for i in range(alpha)]
        revised, unknown = row.copy(), 0.0
        for c, (mav, small, shape, scale) in enumerate(models):
            w = weibull_min.cdf(np.linalg.norm(row - mav) + 1 - small, shape, scale=scale)
            revised[c] = row[c] * (1 - w * weights[c])
            unknown += row[c] - revised[c]
        z = np.concatenate([[unknown], revised])
        e = np.exp(z - z.max())
        probs.append(e[0] / e.sum())
    return np.array(probs)


def test_openmax_defaults_to_libmrs_translation_of_one(setup):
    logits, y = setup["logits_train"], setup["y_train"]
    test_logits = setup["model"].logits(setup["x"])
    expected = libmr_openmax(logits, y, test_logits, tailsize=8, alpha=3)
    got = ours(setup, "openmax", tailsize=8, alpha=3)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), expected, rtol=1e-3, atol=1e-4)


def test_openmax_options_are_checked(setup):
    with pytest.raises(OODBenchError, match="openmax.tailsize must be a positive integer"):
        ours(setup, "openmax", tailsize=0)
    with pytest.raises(OODBenchError, match="openmax.translation must be a positive number"):
        ours(setup, "openmax", translation=0)


# -- through the workflow --------------------------------------------------------------------------------------------
def test_per_set_outputs_are_kept_apart_by_the_options_that_shape_them(setup):
    from oodbench.detectors.posthoc import SET_OUTPUTS

    SET_OUTPUTS.items.clear()
    test = ImageSet(setup["x"], None, "test")
    for name, options in [("gram", {"powers": [1, 2]}), ("gram", {"powers": [3]}),
                          ("mds_ensemble", {"noise": 0.0}), ("mds_ensemble", {"noise": 0.01})]:
        det = fitted(setup, name, **options)
        close(det.score_set(test, batch_size=32)[name], det.score(setup["x"]))
    assert len([key for key in SET_OUTPUTS.items if key[1] == test.fingerprint]) == 4   # one per shaping option


def test_methods_share_their_cached_maps_and_run_from_the_cli(tmp_path, capsys):
    import json

    from oodbench.cli import main

    methods = "gram,mds_ensemble,rankfeat,openmax"
    args = ["eval", "--model", "torchvision:resnet18:none", "--method", methods, "--in", "fashion_mnist",
            "--out", "noise:gaussian", "--fit-limit", "64", "--limit", "16", "--format", "json",
            "--runs-dir", str(tmp_path), "--set", "model.size=16", "--set", "model.layers=[layer3, layer4]"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == methods.split(",")
    assert all(0.0 <= r["auroc"] <= 1.0 for r in rows)
    assert main(["methods"]) == 0
    assert set(methods.split(",")) <= {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    cache = next(tmp_path.glob("model-*/cache"))
    assert {"train_gram.npz", "train_mds_ensemble.npz", "train_outputs.npz"} <= {p.name for p in cache.iterdir()}
