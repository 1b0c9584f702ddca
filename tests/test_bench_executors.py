"""Bench executors: local worker processes and the SLURM path (through submitit's own local and debug executors)
give the sequential run's numbers; a killed worker's training is retried and resumes from its newest checkpoint;
the run lock; the sbatch script asks for the requested resources; `--report-only`."""
import functools
import json
import os
import signal
import threading
import time

import pytest

from oodbench import bench, locks
from oodbench.bench import execute, plan, slurm
from oodbench.cli import main
from oodbench.errors import OODBenchError
from oodbench.metrics import METRIC_NAMES

GRID = """
name: tiny
preset: quick
seeds: [0, 1]
in: [fashion_mnist]
out: [vflip:fashion_mnist, noise:uniform]
limit: 100
bootstrap: 10
plots: false
train_overrides: [data.limit=256, train.steps={steps}, train.batch_size=32, train.ckpt_every={ckpt}]
methods: [msp, energy]
"""


def grid(tmp_path, steps=3, ckpt=1000, seeds=None):
    config = tmp_path / "tiny.yaml"
    text = GRID.format(steps=steps, ckpt=ckpt)
    config.write_text(text if seeds is None else text.replace("seeds: [0, 1]", f"seeds: {seeds}"))
    return config


def values(folder):
    """Every metric of every per-seed and summary row, keyed by what the row is."""
    res = json.loads((folder / "results.json").read_text())
    assert not res["failed"]
    rows = {}
    for part in ("per_seed", "summary"):
        for r in res[part]:
            key = (part, r["method"], r["out"], r.get("seed"))
            rows[key] = {m: r[m] for m in METRIC_NAMES} | {"auroc_ci": r.get("auroc_ci")}
    return rows


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sequential")
    return bench.run_bench(grid(folder), runs_dir=folder / "runs", device="cpu", out=folder / "report")


def test_local_workers_give_the_sequential_numbers(sequential, tmp_path):
    folder = bench.run_bench(grid(tmp_path), runs_dir=tmp_path / "runs", device="cpu", out=tmp_path / "report",
                             executor={"name": "local", "jobs": 2})
    got, want = values(folder), values(sequential)
    assert len(want) == 2 * 2 * 2 + 2 * 2 and got == want
    assert list(got) == list(want)                              # rows in grid order, whichever task ended first
    timing = json.loads((folder / "results.json").read_text())["timing"]
    assert (timing["runs_trained"], timing["cells_computed"]) == (2, 8)
    assert not list((tmp_path / "runs").glob(".*.lock*"))      # every lock released


def test_slurm_path_on_submitits_debug_executor_gives_the_sequential_numbers(sequential, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setattr(slurm, "SlurmExecutor", functools.partial(slurm.SlurmExecutor, cluster="debug", poll_s=0.01))
    folder = bench.run_bench(grid(tmp_path), runs_dir=tmp_path / "runs", device="cpu", out=tmp_path / "report",
                             executor={"name": "slurm", "partition": "gpu"})
    assert values(folder) == values(sequential)
    assert list((tmp_path / "report" / "slurm").iterdir())      # submitit's job folders


def kill_the_trainer(runs_dir, found: list) -> None:
    """Once the run has a periodic checkpoint, SIGKILL the worker that holds its lock (the lock names it)."""
    lock = runs_dir / ".classifier-fashion_mnist-s0.lock"
    deadline = time.time() + 120
    while time.time() < deadline:
        steps = list(runs_dir.glob("classifier-fashion_mnist-s0/checkpoints/*/step_*.pt"))
        if steps and lock.is_file():
            pid = int(lock.read_text().split()[1])
            found.append(pid)
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def resumed_from(run):
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["resumed_from"] for r in lines if "resumed_from" in r]


@pytest.mark.parametrize("retries", [execute.RETRIES, 0])
def test_a_killed_worker_is_retried_or_rerun_and_its_training_resumes(tmp_path, monkeypatch, sequential, retries):
    monkeypatch.setattr(execute, "RETRIES", retries)
    config, runs = grid(tmp_path, steps=200, ckpt=20, seeds=[0]), tmp_path / "runs"
    killed: list = []
    killer = threading.Thread(target=kill_the_trainer, args=(runs, killed))
    killer.start()
    kw = dict(runs_dir=runs, device="cpu", out=tmp_path / "report", executor={"name": "local", "jobs": 2})
    folder = bench.run_bench(config, **kw)
    killer.join()
    assert killed, "the training ended before it could be killed"
    res = json.loads((folder / "results.json").read_text())
    if retries == 0:   # not retried: its cells fail, and re-running the bench completes them
        assert {f["error"] for f in res["failed"]} == {f"training classifier on fashion_mnist, seed 0 failed: worker "
                                                       f"process {killed[0]} died (exit code -9)"}
        folder = bench.run_bench(config, **kw)
        res = json.loads((folder / "results.json").read_text())
    else:
        assert f"worker process {killed[0]} died" in (folder / "errors.log").read_text()
    assert not res["failed"] and len(res["per_seed"]) == 4
    assert resumed_from(runs / "classifier-fashion_mnist-s0")[-1] >= 20      # from a checkpoint, not from scratch


def test_run_lock_waits_for_its_holder_and_breaks_a_dead_holders_lock(tmp_path):
    path = tmp_path / ".run.lock"
    order = []
    with locks.FileLock(path, poll_s=0.01):
        waiter = threading.Thread(target=lambda: locks.FileLock(path, poll_s=0.01).__enter__() and order.append(2))
        waiter.start()
        time.sleep(0.2)
        order.append(1)
        assert waiter.is_alive()                  # it waits while the lock is held
    waiter.join(5)
    assert order == [1, 2] and path.is_file()     # the waiter holds it now (its process is alive)
    path.write_text(f"{os.uname().nodename} 999999999 dead\n")    # a dead process of this host
    with locks.FileLock(path, poll_s=0.01) as lock:
        assert path.read_text() == lock.owner
    assert not path.exists()
    path.write_text("otherhost 1 x\n")            # another host's, refreshed recently: not stale
    assert not locks.FileLock(path, stale_s=60)._stale("otherhost 1 x\n")
    assert locks.FileLock(path, stale_s=0)._stale("otherhost 1 x\n")
    with locks.FileLock(tmp_path / "new" / "runs" / ".run.lock"):
        assert (tmp_path / "new" / "runs").is_dir()
    assert not (tmp_path / "new").exists()        # a lock leaves no folder behind


def test_submitit_local_job_is_pickled_and_requeued_on_preemption_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")     # the job is a new process: one thread, as in the other tests
    options = plan.executor_options({"name": "slurm", "time": 60}, "test")   # preempted, not timed out
    executor = slurm.SlurmExecutor(options, tmp_path / "report", "tiny", cluster="local", poll_s=0.1)
    b = plan.load_bench(grid(tmp_path, steps=200, ckpt=20, seeds=[0]))
    job = plan.run_job(b, b.entries[0], "fashion_mnist", 0)
    runs = tmp_path / "runs"
    executor.submit([(("train", job), "train", execute.train_task, (job, "msp", runs, None, "cpu"))])
    submitted = executor.jobs[("train", job)]
    deadline = time.time() + 120
    while not list(runs.glob("*/checkpoints/*/step_*.pt")) and time.time() < deadline:
        time.sleep(0.1)
    controller = submitted._process.pid           # submitit's local controller; the task is its child
    [task] = open(f"/proc/{controller}/task/{controller}/children").read().split()
    os.kill(int(task), signal.SIGUSR2)            # the preemption signal SLURM sends to a job's tasks
    [(key, result)] = executor.wait()
    assert key == ("train", job) and result["error"] is None and result["path"].endswith("classifier-fashion_mnist-s0")
    assert resumed_from(runs / "classifier-fashion_mnist-s0")[-1] >= 20
    logs = (submitted.stdout() or "") + (submitted.stderr() or "")
    assert "this job is preempted" in logs and "Requeued job" in logs


def test_sbatch_script_asks_for_the_requested_resources(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")   # submitit looks for srun
    config = tmp_path / "grid.yaml"
    config.write_text("in: [fashion_mnist]\nout: [digits]\nmethods: [msp]\nexecutor: {name: slurm, partition: gpu, "
                      "gpus: 2, cpus: 6, time: '1:30:00', jobs: 4, sbatch: [--qos=high, --exclusive]}\n")
    options = plan.load_bench(config).executor
    assert (options.partition, options.gpus, options.cpus, options.time, options.jobs) == ("gpu", 2, 6, 90, 4)
    executor = slurm.SlurmExecutor(options, tmp_path, "grid")
    train = executor.executor("train")._executor._make_submission_file_text("python -m x", "0")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --time=90", "#SBATCH --qos=high", "#SBATCH --exclusive",
                 "#SBATCH --job-name=oodbench-grid-train", "#SBATCH --signal=USR2@90"):
        assert line in train.splitlines(), line
    score = executor.executor("score")._executor._make_submission_file_text("python -m x", "0")
    assert "#SBATCH --gpus-per-node=1" in score and "--ntasks-per-node" not in score   # scoring: one GPU, one task
    cli = options.updated({"partition": "long", "time": 30, "sbatch": ("--account=lab",)})
    assert (cli.partition, cli.time, cli.sbatch, cli.gpus) == ("long", 30, ("--account=lab",), 2)


@pytest.mark.parametrize("section, message", [
    ("{name: cluster}", "not one of sequential, local, slurm"), ("{jobs: 0}", "jobs must be a positive integer"),
    ("{time: soon}", "time must be minutes"), ("{sbatch: [qos=high]}", "an sbatch flag is written --name"),
    ("{gpu: 1}", "unknown key 'gpu'. Did you mean 'gpus'")])
def test_bad_executor_options_are_one_line_errors(tmp_path, capsys, section, message):
    config = tmp_path / "grid.yaml"
    config.write_text(f"in: [fashion_mnist]\nout: [digits]\nmethods: [msp]\nexecutor: {section}\n")
    with pytest.raises(OODBenchError, match=message):
        plan.load_bench(config)
    assert main(["bench", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message.split(".")[0] in err and len(err.splitlines()) == 1


def test_report_only_shows_finished_cells_and_cli_prints_auroc_from_results(sequential, tmp_path, capsys):
    import shutil

    report = tmp_path / "report"
    shutil.copytree(sequential, report)
    runs = sequential.parent / "runs"
    config = grid(tmp_path)
    config.write_text(config.read_text().replace("methods: [msp, energy]", "methods: [msp, energy, maxlogit]"))
    assert main(["bench", str(config), "--report-only", "--runs-dir", str(runs), "--out", str(report),
                 "--device", "cpu"]) == 0
    res = json.loads((report / "results.json").read_text())
    assert {(r["method"], r["seed"]) for r in res["per_seed"]} == {(m, s) for m in ("msp", "energy") for s in (0, 1)}
    assert {f["method"] for f in res["failed"]} == {"maxlogit"} and "not computed yet" in res["failed"][0]["error"]
    assert res["timing"]["cells_computed"] == 0 and res["timing"]["runs_trained"] == 0
    shown = capsys.readouterr().out
    msp = next(r for r in res["summary"] if r["method"] == "msp" and r["out"] == "noise:uniform")
    assert "## fashion_mnist (in-distribution)" in shown and "### AUROC (%)" in shown and "FPR@95" not in shown
    assert f"{100 * msp['auroc']:.2f} ± {100 * msp['auroc_std']:.2f}" in shown
    assert "| maxlogit | failed [1] | failed [1] |" in shown
    assert bench.auroc_tables(res) in (report / "report.md").read_text()   # the report's own tables


def test_bad_executor_options_from_the_command_line_are_one_line_errors(tmp_path, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text("in: [fashion_mnist]\nout: [digits]\nmethods: [msp]\n")
    for flags, message in ((["--executor", "local", "--jobs", "0"], "jobs must be a positive integer"),
                           (["--executor", "slurm", "--time-limit", "soon"], "time must be minutes"),
                           (["--executor", "slurm", "--sbatch", "qos=high"], "an sbatch flag is written --name")):
        assert main(["bench", str(config), "--out", str(tmp_path / "r"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (flags, err)


def test_a_multi_gpu_job_gives_each_task_torchruns_variables(monkeypatch):
    submitit = pytest.importorskip("submitit")

    class Rank1Of2:
        num_tasks, global_rank, local_rank, hostnames, job_id = 2, 1, 1, ["node7", "node8"], "4242_3"

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "unset")                        # restored after the test
    monkeypatch.setattr(submitit, "JobEnvironment", Rank1Of2)
    seen = slurm.SlurmTask(lambda: {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")},
                           ())()
    assert seen == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "node7"}
    assert os.environ["MASTER_PORT"] == str(20000 + 42423 % 20000)    # the same on every rank of the job


def test_one_progress_bar_over_the_cells_with_failed_and_running_counts(sequential, tmp_path, monkeypatch, capsys):
    import shutil

    from oodbench import progress

    shutil.copytree(sequential, tmp_path / "report")
    config = grid(tmp_path)
    config.write_text(config.read_text().replace("methods: [msp, energy]", "methods: [msp, energy, nope]"))
    monkeypatch.delenv("OODBENCH_PROGRESS")
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)          # a plain line at every update
    capsys.readouterr()
    bench.run_bench(config, runs_dir=sequential.parent / "runs", device="cpu", out=tmp_path / "report",
                    report_only=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "bench: cells" in ln]
    assert lines[-1].startswith("oodbench: bench: cells: 12/12 cell (100%) [4 failed, 0 task(s) running]")
    assert lines[-1].endswith(", done") and len(lines) >= 6    # the 4 cells of `nope` fail at once, then per unit


def test_local_workers_end_when_the_bench_process_is_killed(tmp_path):
    import subprocess
    import sys

    config, runs = grid(tmp_path, steps=100000, ckpt=100000, seeds=[0]), tmp_path / "runs"
    code = ("from oodbench import bench; bench.run_bench(%r, runs_dir=%r, device='cpu', out=%r, "
            "executor={'name': 'local', 'jobs': 1})" % (str(config), str(runs), str(tmp_path / "report")))
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock, deadline = runs / ".classifier-fashion_mnist-s0.lock", time.time() + 120
    while not lock.is_file() and time.time() < deadline:
        time.sleep(0.05)
    worker = int(lock.read_text().split()[1])       # the lock names the worker that trains
    parent.kill()
    parent.wait()

    def alive(pid):
        try:
            return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.time() + 20
    while alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(worker), "the worker trained on after its bench process was killed"


def test_slurm_executor_without_submitit_leaves_no_report_folder(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "submitit", None)     # import submitit fails
    out = tmp_path / "report"
    assert main(["bench", str(grid(tmp_path)), "--out", str(out), "--executor", "slurm"]) == 2
    assert "needs submitit" in capsys.readouterr().err and not out.exists()
