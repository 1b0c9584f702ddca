"""The joint metrics through `oodbench eval --joint`: per-image predictions recorded in the score files (digest
checked), the rows equal joint_metrics.evaluate_joint on the network's own predictions, and the one-line errors."""
import json

import numpy as np
import pytest
import torch

from oodbench import joint_metrics
from oodbench.cli import main
from oodbench.errors import OODBenchError
from oodbench.workflow import load_npz
from oodbench.workflow.evaluation import check_joint

TINYNET = '''
import torch
import torch.nn as nn


def build(classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, classes))


def five():
    return build(5)
'''
ARGS = ["--in", "fashion_mnist", "--out", "noise:gaussian", "--limit", "120", "--fit-limit", "120",
        "--set", "model.mean=0.5", "--set", "model.std=0.5"]


@pytest.fixture
def tinynet(tmp_path, monkeypatch):
    (tmp_path / "tinynet_joint.py").write_text(TINYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_joint_rows_equal_the_metrics_of_the_recorded_predictions(tinynet, capsys):
    runs = tinynet / "runs"
    assert main(["eval", "--model", "python:tinynet_joint:build", "--method", "msp,energy", "--joint",
                 "--format", "json", "--runs-dir", str(runs), *ARGS]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows} == {"msp", "energy"}
    files = {p.parent.name + "/" + p.stem: load_npz(p) for p in runs.rglob("scores/*/*.npz")}  # digest verified
    for r in rows:
        id_file = next(v for k, v in files.items() if k.startswith(r["method"] + "/fashion"))
        ood_file = next(v for k, v in files.items() if k.startswith(r["method"] + "/noise"))
        assert id_file["_pred"].dtype == np.int64 and id_file["_label"].dtype == np.int64
        assert len(id_file["_pred"]) == len(id_file["_conf"]) == len(id_file[r["method"]]) == 120
        assert "_label" not in ood_file                               # noise has no labels of the model's classes
        assert np.all((id_file["_conf"] > 0) & (id_file["_conf"] <= 1))
        want = joint_metrics.evaluate_joint(id_file[r["method"]], ood_file[r["method"]],
                                            id_file["_pred"] == id_file["_label"], id_file["_conf"])
        for key in joint_metrics.JOINT_TITLES:
            assert key in r
            np.testing.assert_equal(r[key], want[key])
        np.testing.assert_allclose(r["id_accuracy"], np.mean(id_file["_pred"] == id_file["_label"]))
    metrics_json = json.loads(next(runs.rglob("metrics.json")).read_text())
    assert all("oscr" in row and "ece" in row for row in metrics_json)
    assert "oscr" in next(runs.rglob("metrics.csv")).read_text().splitlines()[0]


def test_recorded_predictions_are_the_networks_argmax(tinynet):
    import oodbench
    from oodbench import data
    from oodbench.detectors import get
    from oodbench.workflow.scoring import predictions

    model = oodbench.load_model("python:tinynet_joint:build", mean=0.5, std=0.5)
    full = data.load("fashion_mnist", split="test")
    test = full.subset(np.arange(50))
    det = get("msp")().use_model(model)
    arrays = predictions(det, test, batch_size=16)
    logits = torch.cat([model.logits(x) for x, _ in test.batches(16)])
    np.testing.assert_array_equal(arrays["_pred"], logits.argmax(1).numpy())
    np.testing.assert_allclose(arrays["_conf"], logits.softmax(1).max(1).values.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(arrays["_label"], test.labels.numpy())


def test_joint_metrics_without_labels_of_the_models_classes_is_one_line(tinynet, capsys):
    assert main(["eval", "--model", "python:tinynet_joint:five", "--method", "msp", "--joint",
                 "--runs-dir", str(tinynet / "runs"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class labels" in err[0]


def test_joint_metrics_of_a_method_without_predictions_is_one_line():
    class Trained:                                                     # a trained family: no classifier inside
        model = None

    with pytest.raises(OODBenchError, match="gives no class predictions") as e:
        check_joint("msma", Trained())
    assert "\n" not in str(e.value)


BENCH = """
in: [fashion_mnist]
out: [noise:gaussian, digits]
limit: 100
joint: true
plots: false
methods:
  - {method: msp, model: "python:tinynet_joint:build", fit_limit: 100, overrides: [model.mean=0.5, model.std=0.5]}
"""


def test_bench_joint_rows_reach_results_and_the_report(tinynet, monkeypatch):
    from oodbench import bench

    monkeypatch.setenv("OODBENCH_PROGRESS", "0")
    (tinynet / "joint.yaml").write_text(BENCH)
    report = bench.run_bench(tinynet / "joint.yaml", runs_dir=tinynet / "runs", device="cpu", out=tinynet / "rep")
    res = json.loads((report / "results.json").read_text())
    per_seed = {r["out"]: r for r in res["per_seed"]}
    assert set(per_seed) == {"noise:gaussian", "digits"}
    summary = {r["out"]: r for r in res["summary"]}
    for out, row in per_seed.items():
        for key in joint_metrics.JOINT_TITLES:
            np.testing.assert_equal(summary[out][key], row[key])
    assert "oscr" in (report / "results.csv").read_text().splitlines()[0]
    assert "### Joint metrics" in (report / "report.md").read_text()


def test_bench_joint_with_a_trained_family_is_one_line(tmp_path):
    from oodbench import bench

    (tmp_path / "bad.yaml").write_text("in: [fashion_mnist]\nout: [digits]\njoint: true\nmethods: [msp, msma]\n")
    with pytest.raises(OODBenchError, match="msma gives no class predictions") as e:
        bench.load_bench(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)


def test_bench_model_entry_takes_model_options_only(tmp_path):
    from oodbench import bench

    (tmp_path / "bad.yaml").write_text("in: [fashion_mnist]\nout: [digits]\nmethods:\n"
                                       "  - {method: msp, model: 'torchvision:resnet18:none', "
                                       "overrides: [model.arch=wrn40_2]}\n")
    with pytest.raises(OODBenchError, match="model options are model.mean") as e:
        bench.load_bench(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)
    (tmp_path / "ok.yaml").write_text("in: [fashion_mnist]\nout: [digits]\nmethods:\n"
                                      "  - {method: odin, model: 'torchvision:resnet18:none', "
                                      "overrides: [model.mean=0.5, odin.temperature=2]}\n")
    entry = bench.load_bench(tmp_path / "ok.yaml").entries[0]
    assert entry.model_overrides == ["model.mean=0.5"] and entry.score_overrides == ["odin.temperature=2"]
