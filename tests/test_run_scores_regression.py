"""Scores of every classifier method on a small committed run equal those recorded before the model-layer refactor.

tests/fixtures/tiny_run is a quick small_cnn (width 8, 60 steps, 2000 Fashion-MNIST images) and
tests/fixtures/tiny_run_scores.npz its scores (limit 200, knn.k=10, gradlayer.val_size=200) as written by the code at
commit d2f602f. Any change to how a run's classifier is loaded, prepared or scored must keep these scores.
"""
import shutil
from pathlib import Path

import numpy as np
import pytest

from oodbench import workflow

FIXTURES = Path(__file__).parent / "fixtures"
METHODS = ("msp", "maxlogit", "energy", "odin", "mahalanobis", "knn", "gradnorm", "gradlayer")
OVERRIDES = ["knn.k=10", "gradlayer.val_size=200"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "classifier-fashion_mnist-s0"
    shutil.copytree(FIXTURES / "tiny_run", folder)
    return workflow.Run(folder)


@pytest.mark.parametrize("method", METHODS)
def test_scores_equal_the_recorded_ones(run, method):
    with np.load(FIXTURES / "tiny_run_scores.npz") as f:
        expected = {k: f[k] for k in f.files if k.startswith(method + "|")}
    assert expected
    scoring = run.prepare(method, OVERRIDES, device="cpu")
    for spec, tag in (("fashion_mnist", "fashion_mnist"), ("digits", "digits"), ("noise:gaussian", "noise_gaussian")):
        arrays = run.score(scoring, spec, 200)
        for key, want in expected.items():
            if key.split("|")[1] == tag:
                got = arrays[key.split("|")[2]]
                np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5, err_msg=key)
