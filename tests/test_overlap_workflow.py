"""The workflow never fits on the images it tests: `--in npz:` without a split, a fit set that is the test set,
or one that contains it, is refused before anything is scored or written; an explicit split works."""
import json

import numpy as np
import pytest
import torch

import oodbench
from oodbench.cli import main
from oodbench.errors import OODBenchError

ARGS = ["--model", "torchvision:resnet18:none", "--method", "knn,msp", "--out", "noise:gaussian", "--limit", "40",
        "--set", "knn.k=5", "--format", "json"]


def pictures(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 12, 12), dtype=np.uint8), rng.integers(0, 3, n)


def test_an_npz_without_a_split_is_refused_on_the_cli(tmp_path, capsys):
    images, labels = pictures(300, 0)
    np.savez(tmp_path / "mine.npz", images=images, labels=labels)
    code = main(["eval", "--in", f"npz:{tmp_path / 'mine.npz'}", "--runs-dir", str(tmp_path / "runs"), *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "are also in the fit set" in err[0] and "train/test keys" in err[0]
    assert not list((tmp_path / "runs").rglob("*.npz")) and not list((tmp_path / "runs").rglob("metrics.json"))


def test_an_explicit_split_or_a_fit_set_of_its_own_works(tmp_path, capsys):
    (train, y_train), (test, y_test) = pictures(300, 1), pictures(100, 2)
    np.savez(tmp_path / "split.npz", train=train, train_labels=y_train, test=test, test_labels=y_test)
    assert main(["eval", "--in", f"npz:{tmp_path / 'split.npz'}", "--runs-dir", str(tmp_path / "a"), *ARGS]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows} == {"knn", "msp"} and all("fit_overlap" not in r for r in rows)
    np.savez(tmp_path / "train.npz", images=train, labels=y_train)
    np.savez(tmp_path / "test.npz", images=test, labels=y_test)
    assert main(["eval", "--in", f"npz:{tmp_path / 'test.npz'}", "--fit-data", f"npz:{tmp_path / 'train.npz'}",
                 "--runs-dir", str(tmp_path / "b"), *ARGS]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["auroc"] for r in again] == pytest.approx([r["auroc"] for r in rows])   # the same fit, the same scores


def test_a_few_exact_duplicates_are_a_warning_and_a_count_in_the_rows(capsys):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 3))
    train, _ = pictures(400, 3)
    test, _ = pictures(300, 4)
    test[:2] = train[:2]                                     # 2 of 300: under 1%
    ev = oodbench.Evaluator(net, methods=["knn"], fit=train, overrides=["knn.k=5"])
    rows = ev.evaluate(id_test=test, ood={"noise": pictures(50, 5)[0]})
    assert rows[0]["fit_overlap"] == 2 and "2 of 300 in-distribution test images" in capsys.readouterr().err
    test[:10] = train[:10]                                   # 10 of 300: refused
    with pytest.raises(OODBenchError, match="10 of 300 in-distribution test images"):
        oodbench.Evaluator(net, methods=["knn"], fit=train).evaluate(id_test=test, ood={"noise": test[:5]})


def test_given_test_images_are_scored_as_given_whatever_the_data_settings():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 3))
    train, test = pictures(200, 6)[0], pictures(60, 7)[0]
    rows = oodbench.Evaluator(net, methods=["msp"], fit=train, overrides=["data.stream=false"]).evaluate(
        id_test=test, ood={"noise": pictures(30, 8)[0]})
    assert rows[0]["out"] == "noise" and 0.0 <= rows[0]["auroc"] <= 1.0
