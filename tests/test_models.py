"""The model layer: specs → ClassifierModel with preprocessing and a features/head split (offline, random weights)."""
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

import oodbench
from oodbench import models
from oodbench.workflow import runs
from oodbench.errors import OODBenchError

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "tiny_run"


def uint8(shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_random_torchvision_model_is_seeded_and_matches_the_python_spec(tmp_path):
    model = oodbench.load_model("torchvision:resnet18:none")
    again = oodbench.load_model("torchvision:resnet18:none")
    assert model.digest == again.digest and model.channels == 3 and model.size is None
    weights = tmp_path / "resnet18.pt"
    torch.save(model.net.state_dict(), weights)
    mine = oodbench.load_model(f"python:torchvision.models:resnet18:{weights}")
    x = uint8((3, 1, 28, 28))                    # 1 channel: replicated to the model's 3
    f1, z1 = model.features_and_logits(x)
    f2, z2 = mine.features_and_logits(x)
    assert torch.equal(z1, z2) and torch.equal(f1, f2) and f1.shape == (3, 512) and z1.shape == (3, 1000)
    assert mine.digest != model.digest           # the name is part of the digest; same weights, other source
    inp = model.prepare(x)
    expected = (x.expand(-1, 3, -1, -1).float() / 255 - torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(inp, expected)
    torch.testing.assert_close(z1, model.net(expected))


def test_features_are_the_head_input_and_head_of_features_is_the_logits():
    model = oodbench.load_model("torchvision:resnet18:none")
    x = uint8((2, 3, 32, 32), seed=1)
    features, logits = model.features_and_logits(x)
    net = model.net
    with torch.no_grad():
        inp = model.prepare(x)
        h = net.avgpool(net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(inp)))))))))
    torch.testing.assert_close(features, h.flatten(1))
    torch.testing.assert_close(model.head(features), logits)
    assert model.head is net.fc


@pytest.mark.parametrize("name,head,dim", [("vit_b_16", "heads.head", 768), ("convnext_tiny", "classifier.2", 768),
                                           ("efficientnet_b0", "classifier.1", 1280), ("densenet121", "classifier",
                                                                                       1024),
                                           ("swin_t", "head", 768), ("mobilenet_v3_small", "classifier.3", 1024)])
def test_standard_families_have_their_head_found(name, head, dim):
    model = oodbench.load_model(f"torchvision:{name}:none", size=224 if name == "vit_b_16" else None)
    assert model.head is dict(model.net.named_modules())[head]
    features, logits = model.features_and_logits(uint8((1, 3, 64, 64)))
    assert features.shape == (1, dim) and logits.shape == (1, 1000)


def test_resize_and_centre_crop_follow_torchvision_preset():
    from torchvision.transforms._presets import ImageClassification

    net = torchvision.models.resnet18(weights=None)
    model = models.ClassifierModel(net, models.IMAGENET_MEAN, models.IMAGENET_STD, size=224, resize=256,
                                   head=net.fc)
    x = uint8((2, 3, 40, 50), seed=2)
    preset = ImageClassification(crop_size=224, resize_size=256)
    expected = torch.stack([preset(img) for img in x])
    got = model.prepare(x)
    assert got.shape == expected.shape == (2, 3, 224, 224)
    assert (got - expected).abs().max() < 0.05   # torchvision resizes uint8 and rounds; we resize floats


def test_openood_layout_state_dict_loads_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    source = models.openood_resnet18_32x32(10).eval()
    renamed = {k.replace(".downsample.", ".shortcut."): v for k, v in source.state_dict().items()}
    assert any(".shortcut." in k for k in renamed)
    path = tmp_path / "best.ckpt"
    torch.save({f"module.{k}": v for k, v in renamed.items()}, path)
    model = oodbench.load_model(f"openood:resnet18_32x32:{path}")
    assert model.mean == list(models.OPENOOD_STATS[10][0]) and model.num_classes == 10
    x = uint8((4, 3, 32, 32), seed=3)
    with torch.no_grad():
        expected = source(model.prepare(x))
    torch.testing.assert_close(model.logits(x), expected)
    bad = tmp_path / "bad.ckpt"
    torch.save({k.replace("layer1", "stage1"): v for k, v in renamed.items()}, bad)
    with pytest.raises(OODBenchError, match="missing layer1.0.conv1.weight"):
        oodbench.load_model(f"openood:resnet18_32x32:{bad}")


def test_run_spec_gives_the_runs_own_classifier(tmp_path):
    folder = tmp_path / "classifier-fashion_mnist-s0"
    shutil.copytree(FIXTURE_RUN, folder)
    own = runs.Run(folder).model("cpu")   # the classifier the run's methods score, built by the workflow
    for spec in (f"run:{folder}", str(folder)):
        model = oodbench.load_model(spec)
        x = uint8((5, 1, 28, 28), seed=4)
        torch.testing.assert_close(model.logits(x), own.logits(x))
        torch.testing.assert_close(model.features(x), own.net.features(own.prepare(x)))
        assert model.mean == own.mean and model.std == own.std
        assert model.head is model.net.head


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.proj = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.proj(self.conv(x).mean((2, 3))))
        return self.out(h)


def test_wrap_finds_the_last_linear_and_honours_a_named_head():
    net = UserNet()
    model = oodbench.wrap(net, mean=[0.5], std=[0.25])
    assert model.head is net.out and model.channels == 1 and type(net) is UserNet
    x = uint8((3, 1, 8, 8), seed=5)
    features, logits = model.features_and_logits(x)
    inp = (x.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(logits, net(inp))
    torch.testing.assert_close(features, torch.relu(net.proj(net.conv(inp).mean((2, 3)))))
    wrong = oodbench.wrap(net, mean=[0.5], std=[0.25], head="proj")   # not the last layer: caught on first use
    with pytest.raises(OODBenchError, match="model.head"):
        wrong.features(x)
    with pytest.raises(OODBenchError, match="no such layer"):
        oodbench.wrap(net, head="fc")


def test_torchscript_gives_logits_and_a_clear_error_for_features(tmp_path):
    net = UserNet().eval()
    path = tmp_path / "net.pt"
    torch.jit.trace(net, torch.zeros(1, 1, 8, 8)).save(str(path))
    model = oodbench.load_model(f"torchscript:{path}", mean=[0.5], std=[0.25])
    x = uint8((2, 1, 8, 8), seed=6)
    torch.testing.assert_close(model.logits(x), net((x.float() / 255 - 0.5) / 0.25))
    with pytest.raises(OODBenchError, match="logits only"):
        model.features(x)


def test_timm_model_uses_its_pretrained_cfg_and_head():
    timm = pytest.importorskip("timm", reason="timm is the optional extra oodbench[timm]")
    model = oodbench.load_model("timm:resnet18")
    assert model.size == (224, 224) and model.head is model.net.get_classifier()
    x = uint8((2, 3, 64, 64), seed=7)
    features, logits = model.features_and_logits(x)
    with torch.no_grad():
        pre = model.net.forward_head(model.net.forward_features(model.prepare(x)), pre_logits=True)
    torch.testing.assert_close(features, pre)
    assert timm is not None and logits.shape == (2, 1000)


def test_missing_timm_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(OODBenchError, match=r"oodbench\[timm\]"):
        oodbench.load_model("timm:resnet18")


@pytest.mark.parametrize("spec,match", [
    ("", "non-empty"), ("keras:resnet", "unknown model spec"), ("torchvision:", "incomplete"),
    ("torchvision:resnet999", "no model"), ("torchvision:resnet18:IMAGENET9", "no weights"),
    ("openood:vgg:x.pt", "OpenOOD's resnet18_32x32 .CIFAR. and resnet18_224x224"), ("openood:resnet18_32x32:/no/such.ckpt", "no weights file"),
    ("python:no_such_module_xyz:f", "cannot import"), ("python:torchvision.models:nothing", "no callable"),
    ("python:math:pi", "no callable"), ("python:os:getcwd", "not an nn.Module"), ("python:torchvision.models",
                                                                                  "write python:"),
    ("torchscript:/no/such.pt", "no file"), ("run:/no/such/run", "not a trained run"), ("timm:resnet18:yes",
                                                                                       "timm:NAME"),
])
def test_malformed_specs_are_one_line_errors(spec, match):
    with pytest.raises(OODBenchError, match=match) as info:
        oodbench.load_model(spec)
    assert "\n" not in str(info.value)


def test_bad_weights_files_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(OODBenchError, match="cannot read .* as a state dict of tensors"):
        oodbench.load_model(f"python:torchvision.models:resnet18:{garbage}")
    wrong = tmp_path / "wrong.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), wrong)
    with pytest.raises(OODBenchError, match="shape mismatch fc.weight") as info:
        oodbench.load_model(f"python:torchvision.models:resnet18:{wrong}")
    assert "\n" not in str(info.value)
    with pytest.raises(OODBenchError, match="std"):
        oodbench.load_model("torchvision:resnet18:none", std=[0.0, 1.0, 1.0])


def _json_rows(capsys, argv):
    import json

    from oodbench.cli import main

    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_and_python_api_give_identical_scores_for_torchvision_and_python_specs(tmp_path, capsys):
    """torchvision:resnet18:none and the same network through python: agree, through the CLI and the Python API."""
    import numpy as np

    weights = tmp_path / "r18.pt"
    torch.save(oodbench.load_model("torchvision:resnet18:none").net.state_dict(), weights)
    methods, outs = "msp,energy,knn,mahalanobis,gradnorm", ["noise:gaussian", "digits"]
    common = ["--in", "fashion_mnist", "--out", ",".join(outs), "--method", methods, "--fit-limit", "300",
              "--limit", "100", "--set", "knn.k=5", "--format", "json"]
    by_spec = {}
    for spec in ("torchvision:resnet18:none", f"python:torchvision.models:resnet18:{weights}"):
        rows = _json_rows(capsys, ["eval", "--model", spec, "--runs-dir", str(tmp_path / "cli"), *common])
        by_spec[spec] = {(r["method"], r["out"]): r["auroc"] for r in rows}
        assert "id_accuracy" not in rows[0]     # 1000 ImageNet classes are not Fashion-MNIST's 10
    a, b = by_spec.values()
    assert a == b and len(a) == 10
    ev = oodbench.Evaluator(oodbench.load_model("torchvision:resnet18:none"), in_dataset="fashion_mnist",
                            methods=methods.split(","), fit_limit=300, overrides=["knn.k=5"],
                            runs_dir=tmp_path / "api", device="cpu")
    rows = ev.evaluate(outs, limit=100)
    assert {(r["method"], r["out"]): r["auroc"] for r in rows} == a
    cli_scores = np.load(next((tmp_path / "cli").glob("model-torchvision_resnet18_none-*-fashion_mnist")) / "scores" /
                         "knn" / "digits.npz")["knn"]
    np.testing.assert_array_equal(ev.score("knn", "digits", limit=100)["knn"], cli_scores)
    assert a["knn", "noise:gaussian"] > 0.9     # even random features put noise far from real images


def test_cli_model_errors_are_one_line(tmp_path, capsys):
    from oodbench.cli import main

    for argv, match in [
        (["eval", "--model", "torchvision:resnet18:none", "--out", "digits", "--method", "msp"], "needs --in"),
        (["eval", "--model", "nope:x", "--in", "digits", "--out", "digits", "--method", "msp"], "unknown model spec"),
        (["eval", "--model", "torchvision:resnet18:none", "--in", "digits", "--out", "digits", "--method", "msma"],
         "trains its own"),
        (["eval", "--model", "torchvision:resnet18:none", "--in", "digits", "--out", "digits", "--method", "msp",
          "--fit-limit", "0"], "fit-limit"),
        (["eval", "--model", "torchvision:resnet18:none", "--in", "digits", "--out", "digits", "--method", "msp",
          "--set", "model.arch=x"], "model options are"),
        (["score", "--data", "digits"], "--model SPEC --in"),
    ]:
        capsys.readouterr()
        assert main([*argv, "--runs-dir", str(tmp_path)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, (argv, err)


def test_bench_entry_with_a_model_spec_scores_that_model_without_training(tmp_path):
    import json

    from oodbench import bench

    config = tmp_path / "grid.yaml"
    config.write_text(f"""name: models
report: {tmp_path / 'report'}
in: fashion_mnist
out: [noise:gaussian]
limit: 100
plots: false
methods:
  - {{method: knn, label: r18_knn, model: "torchvision:resnet18:none", fit_limit: 200, overrides: [knn.k=5]}}
  - {{method: msma, label: bad, model: "torchvision:resnet18:none"}}
""")
    folder = bench.run_bench(config, runs_dir=tmp_path / "runs", device="cpu")
    results = json.loads((folder / "results.json").read_text())
    rows = [r for r in results["summary"] if r["entry"] == "r18_knn"]
    assert len(rows) == 1 and rows[0]["auroc"] > 0.9
    assert any(f["method"] == "bad" and "trains its own" in f["error"] for f in results["failed"])
    assert not list((tmp_path / "runs").glob("classifier-*"))          # nothing was trained


def test_readme_python_example_runs_offline(tmp_path, monkeypatch):
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "Evaluator" in block)
    monkeypatch.setenv("OODBENCH_RUNS", str(tmp_path))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)   # noqa: S102 - the README's own example
    rows = namespace["rows"]
    assert {(r["method"], r["out"]) for r in rows} == {(m, o) for m in ("msp", "energy", "knn")
                                                       for o in ("digits", "noise:gaussian")}
    assert namespace["scores"].shape == (8,) and bool(namespace["scores"].isfinite().all())


def test_cli_score_with_a_model_writes_its_score_file(tmp_path, capsys):
    import numpy as np

    from oodbench.cli import main

    argv = ["score", "--model", "torchvision:resnet18:none", "--in", "digits", "--data", "noise:gaussian,digits",
            "--method", "energy", "--limit", "20", "--runs-dir", str(tmp_path)]
    assert main(argv) == 0
    path = next(tmp_path.glob("model-torchvision_resnet18_none-*-digits")) / "scores" / "energy" / \
        f"{runs.safe_name('noise:gaussian')}.npz"
    with np.load(path) as f:
        assert f["energy"].shape == (20,) and np.isfinite(f["energy"]).all()
    assert "20 images; rows energy" in capsys.readouterr().out


def test_a_model_run_loads_its_in_distribution_test_set_once(tmp_path, monkeypatch):
    from oodbench import data
    from oodbench import workflow as runs

    loads = []
    real = data.load
    monkeypatch.setattr(data, "load", lambda spec, **kw: loads.append((spec, kw.get("split"))) or real(spec, **kw))
    run = runs.ModelRun(oodbench.load_model("torchvision:resnet18:none"), "digits", fit_limit=50, runs_dir=tmp_path)
    rows = runs.evaluate(run, ["msp"], ["noise:gaussian"], limit=20, device="cpu")
    assert loads.count(("digits", "test")) == 1 and rows[0]["in"] == "digits"


def test_openood_imagenet200_resnet18_loads_with_openoods_test_transform(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(num_classes=200)
    path = tmp_path / "best.ckpt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    model = oodbench.load_model(f"openood:resnet18_224x224:{path}")
    assert model.num_classes == 200 and model.size == (224, 224) and model.resize == 256
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    source.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), source(model.prepare(x)))


def test_the_accuracy_of_a_model_is_computed_once_for_all_its_methods(tmp_path, monkeypatch):
    from oodbench import workflow as runs
    from oodbench.detectors.posthoc import PostHoc

    calls = []
    real = PostHoc.accuracy
    monkeypatch.setattr(PostHoc, "accuracy", lambda self, s: calls.append(1) or real(self, s))
    import torchvision

    torch.manual_seed(0)
    model = oodbench.wrap(torchvision.models.resnet18(num_classes=10), name="r18-10")   # digits' 10 classes
    run = runs.ModelRun(model, "digits", fit_limit=60, runs_dir=tmp_path)
    rows = runs.evaluate(run, ["msp", "energy", "knn"], ["noise:gaussian"], limit=20, device="cpu",
                         overrides=["knn.k=3"])
    assert len(calls) == 1 and len({r["id_accuracy"] for r in rows}) == 1 and len(rows) == 3


def test_random_weights_of_a_fixed_size_architecture_get_its_input_size():
    """A ViT accepts only its image_size: `none` weights take it (and the default weights' resize ratio) without a
    download, so any ID set can be scored."""
    model = oodbench.load_model("torchvision:vit_b_16:none")
    x = model.prepare(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    assert x.shape == (2, 3, 224, 224)
    with torch.no_grad():
        feats, logits = model.features_and_logits(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    assert feats.shape == (2, 768) and logits.shape == (2, 1000)


class NeedsThirtyTwo(nn.Module):
    """A user network that only takes 32x32 inputs (as a ViT takes only its image_size)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(2 * 32 * 32, 10)

    def forward(self, x):
        assert x.shape[-1] == 32, f"Wrong image width! Expected 32 but got {x.shape[-1]}!"
        return self.fc(self.stem(x).flatten(1))


def test_a_model_that_cannot_take_the_sets_images_is_a_one_line_error_before_any_work(tmp_path):
    with pytest.raises(OODBenchError, match=r"cannot score digits's images \(prepared from \(1, 8, 8\)\): Wrong image "
                                            r"width! Expected 32 but got 8!; give the model its input size"):
        runs.ModelRun(oodbench.wrap(NeedsThirtyTwo()), "digits", runs_dir=tmp_path)
    assert not any(tmp_path.iterdir())
    run = runs.ModelRun(oodbench.wrap(NeedsThirtyTwo(), size=32), "digits", runs_dir=tmp_path)   # sized: fine
    assert run.meta["shape"] == [1, 8, 8]


def test_run_spec_errors_are_one_line_for_each_kind_of_bad_folder(tmp_path):
    """run: reads the run folder itself (config.yaml, meta.json, detector.pt): a folder that is not a run, a run of
    another kind, an unfinished run and a corrupt detector.pt each give one clear line."""
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    other = tmp_path / "llr-fashion_mnist-s0"
    shutil.copytree(FIXTURE_RUN, other)
    (other / "meta.json").write_text('{"kind": "llr"}')
    unfinished = tmp_path / "classifier-unfinished-s0"
    shutil.copytree(FIXTURE_RUN, unfinished)
    (unfinished / "detector.pt").unlink()
    corrupt = tmp_path / "classifier-corrupt-s0"
    shutil.copytree(FIXTURE_RUN, corrupt)
    raw = (corrupt / "detector.pt").read_bytes()
    (corrupt / "detector.pt").write_bytes(raw[: len(raw) // 2])
    for folder, match in [(not_a_run, "not a trained run folder"), (other, "is a 'llr' run"),
                          (unfinished, "training unfinished"), (corrupt, "corrupt or truncated")]:
        with pytest.raises(OODBenchError, match=match) as info:
            models.load_model(f"run:{folder}")
        assert "\n" not in str(info.value)
