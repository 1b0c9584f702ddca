"""The post-hoc method contract, for every registered method: options in the constructor (checked, declared once),
`fit` returns self, fitted state in `state_dict` (plain tensors, weights_only), clear errors for every misuse."""
import io

import numpy as np
import pytest
import torch

from oodbench import detectors
from oodbench.config import load_config
from oodbench.data import ImageSet
from oodbench.detectors import PostHoc, method
from oodbench.detectors.recipes import RotPred
from oodbench.errors import NotFittedError, OODBenchError
from oodbench.models import wrap
from oodbench.nets.classifiers import build_classifier
from test_posthoc import images

# combo is built from member methods (combo:knn+energy); its contract is tested in test_ensembles.py
POSTHOC = sorted(n for n, c in detectors.REGISTRY.items() if issubclass(c, PostHoc) and n != "combo")
OPTIONS = {"knn": {"k": 5}, "nnguide": {"k": 5}, "gradlayer": {"val_size": 30},
           "mcdropout": {"where": "features"}}   # resnet20 has no dropout layer


ZERO_SHOT = {"glmcm", "neglabel"}   # score only a zero-shot CLIP model (detectors/zeroshot.py)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.manual_seed(0)
    net = build_classifier("resnet20", 3, 4).eval()
    model = wrap(net, mean=[0.5] * 3, std=[0.25] * 3)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (120,), generator=g)
    words = tmp_path_factory.mktemp("words") / "words.txt"
    words.write_text("\n".join(f"word{i}" for i in range(30)))
    OPTIONS["neglabel"] = {"words": str(words), "count": 20, "groups": 4}
    rot_net = RotPred().adapt(build_classifier("resnet20", 3, 4)).eval()   # the rotpred recipe's rotation head
    return dict(model=model, clip=zero_shot_model(), rotpred=wrap(rot_net, mean=[0.5] * 3, std=[0.25] * 3, head="head"), train=ImageSet(images(120, 1), labels, "train"),
                val=ImageSet(images(40, 2), torch.randint(0, 4, (40,), generator=g), "val"),
                ood=ImageSet(255 - images(40, 4), None, "ood"), x=images(16, 3))


def zero_shot_model():
    """A small CLIP-like model of the user's own functions (oodbench.wrap_clip), with patch tokens."""
    from oodbench.models import wrap_clip

    patches = torch.nn.Conv2d(3, 8, 8, stride=8)
    table = torch.nn.Embedding(50, 8)

    def tokenize(prompts):
        return torch.tensor([sum(map(ord, p)) % 50 for p in prompts])

    def patch_encoder(x):
        return patches(x).flatten(2).transpose(1, 2)

    return wrap_clip(lambda x: patch_encoder(x).mean(1), table, tokenize, ["a", "b", "c", "d"], size=None,
                     patch_encoder=patch_encoder)


def model_for(name, data):
    if name == "rotpred_score":   # scores only a run of the rotpred recipe (its rotation head)
        return data["rotpred"]
    return data["clip"] if name in ZERO_SHOT else data["model"]


def fit(name, data, **extra):
    det = method(name, **{**OPTIONS.get(name, {}), **extra})
    return det.fit(model_for(name, data), data["train"], val=data["val"], val_ood=data["ood"])


def test_every_post_hoc_method_is_a_registered_plain_object():
    assert len(POSTHOC) >= 29
    for name in POSTHOC:
        det = method(name)
        assert det.name == name and det.get_params() == type(det).defaults()


@pytest.mark.parametrize("name", POSTHOC)
def test_fit_returns_self_and_a_fitted_state_reloads_without_refitting(name, data):
    det = fit(name, data)
    scores = det.score(data["x"])
    assert scores.shape == (16,) and torch.isfinite(scores).all()
    buffer = io.BytesIO()
    torch.save(det.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)                  # plain tensors, numbers, strings
    fresh = detectors.get(name)().load_state_dict(state)
    assert fresh.get_params() == det.get_params()
    fresh.use_model(model_for(name, data))                         # the model travels separately
    torch.testing.assert_close(fresh.score(data["x"]), scores)


@pytest.mark.parametrize("name", [n for n in POSTHOC if detectors.get(n).fit_on is not None])
def test_scoring_an_unfitted_method_is_a_clear_error(name, data):
    det = method(name, **OPTIONS.get(name, {}))
    det.use_model(data["model"])
    with pytest.raises(NotFittedError, match=f"{name} is not fitted: call .fit"):
        det.score(data["x"])


def test_scoring_without_a_model_is_a_clear_error(data):
    with pytest.raises(OODBenchError, match="energy has no model: call .fit"):
        method("energy").score(data["x"])


@pytest.mark.parametrize("name", [n for n in POSTHOC if detectors.get(n).needs_labels])
def test_a_method_that_needs_labels_says_so_when_the_fit_set_has_none(name, data):
    unlabelled = ImageSet(data["train"].images, None, "mine")
    with pytest.raises(OODBenchError, match=f"{name} needs class labels"):
        method(name).fit(data["model"], unlabelled, val=ImageSet(data["val"].images, None, "v"))


def test_methods_without_labels_fit_on_unlabelled_images(data):
    unlabelled = ImageSet(data["train"].images, None, "mine")
    assert method("knn", k=5).fit(data["model"], unlabelled).score(data["x"]).shape == (16,)


def test_options_are_checked_with_the_nearest_valid_name():
    with pytest.raises(OODBenchError, match="knn has no option 'kk'. Did you mean 'k'"):
        method("knn", kk=3)
    with pytest.raises(OODBenchError, match="'knn.k' must be a number"):
        method("knn", k="many")
    with pytest.raises(OODBenchError, match="keyword arguments"):
        detectors.get("knn")(load_config("classifier"), "cpu")
    with pytest.raises(OODBenchError, match="unknown method 'knm'. Did you mean 'knn'"):
        method("knm")
    with pytest.raises(OODBenchError, match="msma trains its own"):
        method("msma")


def test_set_params_drops_the_fit_and_sweep_comes_from_the_declarations(data):
    det = fit("react", data)
    assert det.set_params(percentile=95) is det and not det.fitted_
    assert detectors.get("react").sweep() == {"percentile": [85, 90, 95, 99]}
    assert detectors.get("knn").sweep()["k"] == [50, 100, 200, 500, 1000]


@pytest.mark.parametrize("name", [n for n in POSTHOC if detectors.get(n).array_level])
def test_array_level_fit_and_score_equal_the_image_level_ones(name, data):
    model = data["model"]
    det = fit(name, data)
    split = data["val"] if det.fit_on == "val" else data["train"]
    with torch.no_grad():
        feats, logits = model.features_and_logits(split.images)
        test_feats, test_logits = model.features_and_logits(data["x"])
    weight, bias = model.head.weight.detach(), model.head.bias.detach()
    arrays = method(name, **OPTIONS.get(name, {})).fit_features(feats.numpy(), logits.numpy(), split.labels,
                                                               head=(weight, bias))
    torch.testing.assert_close(arrays.score_features(test_feats, test_logits), det.score(data["x"]),
                               rtol=1e-4, atol=1e-4)


def test_array_level_misuse_is_a_clear_error(data):
    with pytest.raises(OODBenchError, match="features must be a float array"):
        method("knn").fit_features(np.zeros((4,)), np.zeros((4, 3)))
    with pytest.raises(OODBenchError, match="labels must be 4 integers"):
        method("mahalanobis").fit_features(np.zeros((4, 2)), np.zeros((4, 3)), labels=[0, 1])
    with pytest.raises(OODBenchError, match="gram reads more than the penultimate features"):
        method("gram").fit_features(np.zeros((4, 2)), np.zeros((4, 3)))


def test_bad_images_are_clear_errors(data):
    det = method("msp").fit(data["model"])
    with pytest.raises(OODBenchError, match=r"float images must be in \[0, 1\] before normalisation"):
        det.score(torch.randn(2, 3, 8, 8))
    with pytest.raises(OODBenchError, match=r"takes a batch of images \(B, C, H, W\)"):
        det.score(torch.zeros(3, 8, 8))
    torch.testing.assert_close(det.score(data["x"].float() / 255), det.score(data["x"]))   # floats in [0, 1] work
    with pytest.raises(OODBenchError, match="labels"):
        method("mahalanobis").fit(data["model"], data["train"].images, labels=[0, 1, 2])


def test_a_users_own_method_is_a_subclass_with_two_methods(data):
    class CosineToMean(PostHoc):
        """Negative cosine similarity to the mean training feature."""

        def fit_outputs(self, ref):
            return ref["features"].mean(0)

        def score_outputs(self, out):
            return -torch.nn.functional.cosine_similarity(out["features"], self.stats_[None], dim=1)

    det = CosineToMean().fit(data["model"], data["train"])
    assert det.name == "cosinetomean" and det.score(data["x"]).shape == (16,)


def test_methods_options_lists_each_declaration_and_fit_data_needs_a_model(capsys, tmp_path):
    from oodbench.cli import main

    assert main(["methods", "--options"]) == 0
    out = capsys.readouterr().out
    assert "knn.k = 50: neighbour whose distance is the score" in out and "(--tune: [50, 100, 200, 500, 1000])" in out
    code = main(["eval", "--method", "msp", "--in", "digits", "--fit-data", "digits", "--out", "noise:gaussian",
                 "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--fit-data apply to --model" in err[0]
