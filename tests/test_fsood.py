"""Full-spectrum OOD (csID sets): `eval --csid`, Evaluator.evaluate(csid=), bench `csid:`; the fs_* metrics are the
detection (and joint) metrics of ID ∪ csID against each OOD set, csid_accuracy the pooled csID accuracy."""
import json

import numpy as np
import pytest

from oodbench import joint_metrics, metrics
from oodbench.cli import main
from oodbench.errors import OODBenchError
from oodbench.workflow import load_npz

TINYNET = '''
import torch
import torch.nn as nn


def build(classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, classes))
'''
CSID = ["corrupt:gaussian_noise:2:fashion_mnist", "corrupt:contrast:3:fashion_mnist"]
ARGS = ["--in", "fashion_mnist", "--out", "noise:gaussian,digits", "--limit", "100", "--fit-limit", "100",
        "--set", "model.mean=0.5", "--set", "model.std=0.5"]


@pytest.fixture
def tinynet(tmp_path, monkeypatch):
    (tmp_path / "tinynet_fs.py").write_text(TINYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OODBENCH_PROGRESS", "0")
    return tmp_path


def scores_of(runs, method, prefix):
    return next(load_npz(p) for p in runs.rglob(f"scores/{method}/*.npz") if p.stem.startswith(prefix))


def test_fs_rows_score_id_and_csid_against_each_ood_set(tinynet, capsys):
    runs = tinynet / "runs"
    assert main(["eval", "--model", "python:tinynet_fs:build", "--method", "msp,energy", "--joint", "--csid",
                 ",".join(CSID), "--format", "json", "--runs-dir", str(runs), *ARGS]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4
    for r in rows:
        m = r["method"]
        id_s = scores_of(runs, m, "fashion_mnist")
        cs = [scores_of(runs, m, "corrupt_gaussian"), scores_of(runs, m, "corrupt_contrast")]
        ood = scores_of(runs, m, "noise" if r["out"] == "noise:gaussian" else "digits")
        pooled = np.concatenate([id_s[m]] + [c[m] for c in cs])
        assert len(pooled) == 300
        for key, value in metrics.evaluate(pooled, ood[m]).items():
            np.testing.assert_equal(r[f"fs_{key}"], value)
        for key, value in metrics.evaluate(id_s[m], ood[m]).items():   # the standard rows are unchanged
            np.testing.assert_equal(r[key], value)
        pred = np.concatenate([id_s["_pred"]] + [c["_pred"] for c in cs])
        label = np.concatenate([id_s["_label"]] + [c["_label"] for c in cs])
        conf = np.concatenate([id_s["_conf"]] + [c["_conf"] for c in cs])
        want = joint_metrics.evaluate_joint(pooled, ood[m], pred == label, conf)
        for key in joint_metrics.JOINT_TITLES:
            np.testing.assert_equal(r[f"fs_{key}"], want[key])
        np.testing.assert_allclose(r["csid_accuracy"], np.mean(pred[100:] == label[100:]))


def test_eval_table_shows_fs_columns_and_csid_accuracy(tinynet, capsys):
    assert main(["eval", "--model", "python:tinynet_fs:build", "--method", "msp", "--csid", CSID[0],
                 "--runs-dir", str(tinynet / "runs"), *ARGS]) == 0
    out = capsys.readouterr().out
    assert "FS-AUROC" in out and "FS-FPR@95" in out and "csID test accuracy" in out


def test_csid_without_labels_is_one_line_before_work(tinynet, capsys):
    assert main(["eval", "--model", "python:tinynet_fs:build", "--method", "msp", "--csid", "noise:uniform",
                 "--runs-dir", str(tinynet / "runs"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "csID set noise:uniform has no class labels" in err[0]
    assert not list((tinynet / "runs").rglob("*.npz"))                 # nothing was scored


@pytest.mark.parametrize("csid,message", [("corrupt:fogg:2:fashion_mnist", "unknown corruption 'fogg'"),
                                          ("corrupt:fog:9:fashion_mnist", "severity must be an integer 1-5"),
                                          ("digits", "named both as an OOD set and as a csID set")])
def test_bad_csid_specs_are_one_line(tinynet, capsys, csid, message):
    assert main(["eval", "--model", "python:tinynet_fs:build", "--method", "msp", "--csid", csid,
                 "--runs-dir", str(tinynet / "runs"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_evaluator_takes_csid_images(tinynet):
    import oodbench
    from oodbench import data

    shifted = data.load(CSID[0]).head(50)
    ev = oodbench.Evaluator("python:tinynet_fs:build", ["msp"], in_dataset="fashion_mnist", fit_limit=100,
                            overrides=["model.mean=0.5", "model.std=0.5"], device="cpu")
    rows = ev.evaluate(["noise:gaussian"], limit=100, csid={"shifted": (shifted.images, shifted.labels)})
    assert "fs_auroc" in rows[0] and 0 <= rows[0]["csid_accuracy"] <= 1
    with pytest.raises(OODBenchError, match="csID set unlabelled has no class labels"):
        ev.evaluate(["noise:gaussian"], limit=100, csid={"unlabelled": shifted.images})


BENCH = """
in: [fashion_mnist]
out:
  far: [noise:gaussian, digits]
limit: 100
plots: false
csid: [corrupt:gaussian_noise:2:fashion_mnist, corrupt:contrast:3:fashion_mnist, cifar10c]
methods:
  - {method: msp, model: "python:tinynet_fs:build", fit_limit: 100, overrides: [model.mean=0.5, model.std=0.5]}
"""


def test_bench_csid_rows_reach_results_and_the_report(tinynet):
    from oodbench import bench

    (tinynet / "fs.yaml").write_text(BENCH)      # cifar10c is not on disk: skipped with a note, the rest is used
    report = bench.run_bench(tinynet / "fs.yaml", runs_dir=tinynet / "runs", device="cpu", out=tinynet / "rep",
                             data_root=tinynet / "data")
    res = json.loads((report / "results.json").read_text())
    assert res["settings"]["csid"]["fashion_mnist"][:2] == CSID
    assert any(s["dataset"] == "cifar10c" for s in res["skipped"])
    runs = tinynet / "runs"
    id_s = scores_of(runs, "msp", "fashion_mnist")
    cs = [scores_of(runs, "msp", "corrupt_gaussian"), scores_of(runs, "msp", "corrupt_contrast")]
    per_seed = {r["out"]: r for r in res["per_seed"]}
    for out, prefix in (("noise:gaussian", "noise"), ("digits", "digits")):
        ood = scores_of(runs, "msp", prefix)["msp"]
        want = metrics.evaluate(np.concatenate([id_s["msp"]] + [c["msp"] for c in cs]), ood)
        np.testing.assert_equal(per_seed[out]["fs_auroc"], want["auroc"])
        np.testing.assert_equal(per_seed[out]["fs_fpr95"], want["fpr95"])
        assert 0 <= per_seed[out]["csid_accuracy"] <= 1
    summary = {r["out"]: r for r in res["summary"]}
    np.testing.assert_allclose(summary["far"]["fs_auroc"],
                               np.mean([per_seed[o]["fs_auroc"] for o in ("noise:gaussian", "digits")]))
    assert "fs_auroc" in (report / "results.csv").read_text().splitlines()[0]
    text = (report / "report.md").read_text()
    assert "### Full-spectrum OOD" in text and "FS-AUROC" in text and "Not available" in text


@pytest.mark.parametrize("csid,message", [
    ("[corrupt:fog:7:fashion_mnist]", "severity must be an integer 1-5"),
    ("[digits]", "csid set digits is also an OOD set"),
    ("{cifar10: [corrupt:fog:2:cifar10]}", "csid.cifar10 is not one of the `in` sets"),
])
def test_bench_bad_csid_is_one_line(tmp_path, csid, message):
    from oodbench import bench

    (tmp_path / "bad.yaml").write_text(f"in: [fashion_mnist]\nout: [digits]\ncsid: {csid}\nmethods: [msp]\n")
    with pytest.raises(OODBenchError, match=message) as e:
        bench.load_bench(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)


def test_bench_unlabelled_csid_is_one_line_before_work(tinynet):
    from oodbench import bench

    (tinynet / "bad.yaml").write_text(BENCH.replace(", cifar10c", ", noise:uniform"))
    with pytest.raises(OODBenchError, match="csID set noise:uniform has no class labels") as e:
        bench.run_bench(tinynet / "bad.yaml", runs_dir=tinynet / "runs", device="cpu", out=tinynet / "rep")
    assert "\n" not in str(e.value) and not (tinynet / "runs").exists()
