"""DistributedDataParallel under torchrun (gloo, 2 CPU processes): training follows the single-process loss
trajectory, and sharded scoring gathers exactly the single-process scores."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ARGS = ["--method", "msp", "--in", "fashion_mnist", "--preset", "quick", "--set", "data.limit=1024",
        "--set", "train.steps=12", "--set", "train.batch_size=64", "--set", "train.log_every=1",
        "--set", "model.width=8"]


def oodbench(runs, *args, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", "29533"] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OODBENCH_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*launcher, "-m", "oodbench", *args, "--runs-dir", str(runs), "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    runs = tmp_path_factory.mktemp("single")
    oodbench(runs, "train", *ARGS)
    return runs


def test_ddp_training_matches_single_process_loss_trajectory(single, tmp_path):
    oodbench(tmp_path, "train", *ARGS, nproc=2)
    one, two = losses(single / "classifier-fashion_mnist-s0"), losses(tmp_path / "classifier-fashion_mnist-s0")
    assert len(one) == len(two) == 12
    # Same global batches and averaged gradients; BatchNorm statistics are per rank (half batches), so close, not equal.
    np.testing.assert_allclose(two, one, rtol=0.05)


def test_sharded_scoring_gathers_the_single_process_scores(single, tmp_path):
    shutil.copytree(single, tmp_path / "copy")
    run = tmp_path / "copy" / "classifier-fashion_mnist-s0"
    for f in (run / "scores").glob("**/*.npz"):
        f.unlink()
    oodbench(single, "score", "--run", str(single / "classifier-fashion_mnist-s0"), "--data", "digits",
             "--method", "energy", "--limit", "301")
    oodbench(tmp_path, "score", "--run-dir", str(run), "--data", "digits", "--method", "energy", "--limit", "301",
             nproc=2)
    a = np.load(single / "classifier-fashion_mnist-s0/scores/energy/digits.npz")["energy"]
    b = np.load(run / "scores/energy/digits.npz")["energy"]
    assert a.shape == b.shape == (301,)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
