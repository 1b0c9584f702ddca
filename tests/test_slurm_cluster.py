"""The slurm executor against a real single-node SLURM cluster (scripts/start-local-slurm.sh, accounting off as on
many clusters): a tiny grid whose training is requeued while it runs (`scontrol requeue`, what a preemption in
REQUEUE mode does) gives the sequential run's numbers bit for bit, its training resumes from a checkpoint, and
submitit's sacct warnings never reach the user. Slow; CI runs it with OODBENCH_REQUIRE_SLURM=1 (.ci/run), so a
cluster that does not start fails instead of skipping."""
import functools
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from oodbench import bench
from oodbench.bench import slurm

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 3000   # long enough to outlast the 30 s between SLURM's SIGTERM (which submitit ignores) and its SIGKILL

GRID = f"""
name: tiny
preset: quick
seeds: [0]
in: [fashion_mnist]
out: [vflip:fashion_mnist, noise:uniform]
limit: 100
bootstrap: 10
plots: false
train_overrides: [data.limit=256, train.steps={STEPS}, train.batch_size=32, train.ckpt_every=100]
methods: [msp, energy]
"""


@pytest.fixture(scope="module")
def partition():
    pytest.importorskip("submitit")
    started = subprocess.run(["bash", str(ROOT / "scripts" / "start-local-slurm.sh")], capture_output=True,
                             text=True, timeout=900)
    if started.returncode != 0:
        why = "local SLURM did not start: " + ((started.stderr or started.stdout).strip().splitlines() or ["?"])[-1]
        if os.environ.get("OODBENCH_REQUIRE_SLURM"):
            pytest.fail(why)
        pytest.skip(why)
    return "debug"


def requeue_when_checkpointed(runs: Path, requeued: list) -> None:
    """Once the training has a periodic checkpoint, requeue its running job."""
    deadline = time.time() + 600
    while time.time() < deadline:
        if list(runs.glob("classifier-fashion_mnist-s0/checkpoints/*/step_*.pt")):
            listed = subprocess.run(["squeue", "--noheader", "--array", "--states=RUNNING", "--name=oodbench-tiny-train",
                                     "--format=%i"], capture_output=True, text=True).stdout.split()
            if listed:
                subprocess.run(["scontrol", "requeue", listed[0]], check=True)
                requeued.append(listed[0])
                return
        time.sleep(0.2)


def rows(folder: Path) -> list:
    res = json.loads((folder / "results.json").read_text())
    assert not res["failed"], res["failed"]
    return res["per_seed"] + res["summary"]


def test_a_requeued_slurm_grid_gives_the_sequential_numbers(partition, tmp_path, monkeypatch, capfd):
    config = tmp_path / "tiny.yaml"
    config.write_text(GRID)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")     # the jobs' torch threads; the sequential run below uses the same
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sequential = bench.run_bench(config, runs_dir=tmp_path / "seq-runs", device="cpu", out=tmp_path / "seq")
    finally:
        torch.set_num_threads(threads)
    capfd.readouterr()

    runs, requeued = tmp_path / "runs", []
    monkeypatch.setattr(slurm, "SlurmExecutor", functools.partial(slurm.SlurmExecutor, poll_s=0.5))
    requeuer = threading.Thread(target=requeue_when_checkpointed, args=(runs, requeued))
    requeuer.start()
    folder = bench.run_bench(config, runs_dir=runs, device="cpu", out=tmp_path / "report",
                             executor={"name": "slurm", "partition": partition})
    requeuer.join()
    printed = capfd.readouterr()

    assert requeued, "the training ended before it could be requeued"
    run = runs / "classifier-fashion_mnist-s0"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert max(r.get("resumed_from", 0) for r in log) >= 100          # the rerun resumed from a checkpoint
    assert json.loads((run / "meta.json").read_text())["threads"] == 1
    assert rows(folder) == rows(sequential)                              # bit for bit
    assert "Bypassing sacct error" not in printed.err + printed.out
    assert "accounting storage is disabled" not in printed.err + printed.out


def test_job_states_come_from_squeue_when_accounting_is_off(partition, tmp_path):
    assert not slurm.accounting_enabled()                  # the local cluster has no accounting storage
    executor = slurm.SlurmExecutor(slurm.ExecutorOptions(name="slurm", partition=partition), tmp_path, "states",
                                   poll_s=0.2)
    executor.submit([("sleeper", "score", time.sleep, (600,))])
    job = executor.jobs["sleeper"]
    assert isinstance(job.watcher, type(executor.watcher)) and not job.done()
    subprocess.run(["scancel", job.job_id], check=True)  # ended without a result: seen to end, not waited on forever
    [(key, result)] = executor.wait()
    assert key == "sleeper" and isinstance(result, slurm.TaskFailed) and job.job_id in result.message
