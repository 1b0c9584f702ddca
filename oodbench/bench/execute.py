"""Running a bench: check the data, train the runs and score the cells through an executor, write the report.

The grid is two kinds of task, each a plain function of plain arguments that returns plain data: `train_task` (one
run, `workflow.train(..., resume=True)`) and `cells.score_unit` (one method entry × ID set × seed). A unit is submitted
as soon as its run's training is done. Executors run tasks in submission order:
- `SequentialExecutor`: in this process, one after another (the default);
- `LocalExecutor`: N spawned worker processes on this machine, the CPU threads divided between them;
- `slurm.SlurmExecutor`: SLURM jobs through submitit (oodbench/bench/slurm.py).
A task whose worker died or whose job failed is submitted again (RETRIES times); its training resumes from the
run's newest checkpoint, and the run lock (oodbench/locks.py) keeps two processes from training one run.
"""
from __future__ import annotations

import os
import time
import traceback
from collections import deque
import threading
from multiprocessing import connection, get_context, parent_process
from pathlib import Path

from oodbench import data, progress, workflow
from oodbench.bench.aggregate import summarise, timing
from oodbench.bench.cells import Recorder, describe_error, score_unit
from oodbench.bench.plan import Bench, ExecutorOptions, TaskFailed, load_bench, run_job
from oodbench.bench.report import check_report_folder, make_plots, write_report
from oodbench.engine import resolve_device
from oodbench.errors import OODBenchError

RETRIES = 2
NOT_TRAINED = "its run is not trained yet (--report-only trains nothing; run the bench without it)"


def run_bench(config_path, runs_dir=None, data_root=None, device="auto", out=None, executor=None,
              report_only: bool = False) -> Path:
    """Run the grid of `config_path` and write the report; returns the report folder. `executor`: options that
    replace the YAML's `executor:` ones ({"name": "local", "jobs": 2, ...}); `report_only`: train and score nothing,
    report the finished cells."""
    bench = load_bench(config_path)
    options = bench.executor.updated(executor or {})
    device = resolve_device(device)
    folder = check_report_folder(Path(out) if out else bench.report)   # never a folder of the user's own files
    # the executor before any file: one that cannot start (submitit missing) leaves no report folder behind
    pool = SequentialExecutor() if report_only else make_executor(options, bench, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        recorder = Recorder(folder)
        with recorder.timed("stage: check data"):
            missing = check_data(bench, data_root)
        counts = Grid(bench, missing, recorder, folder, runs_dir, data_root, device, not report_only).run(pool)
    finally:
        pool.close()
    summary = summarise(bench, recorder.cells)
    with recorder.timed("stage: plots"):
        plot_note = make_plots(bench, recorder.cells, summary, folder) if bench.plots else \
            "plots are off (plots: false)"
    write_report(bench, folder, recorder, summary, missing, plot_note,
                 timing(time.time() - started, *counts, recorder), device)
    return folder


def check_data(bench: Bench, data_root) -> dict:
    """{spec: why it cannot be used} for every in/out spec whose test split cannot be loaded."""
    missing = {}
    csid = [s for specs in bench.csid.values() for s in specs]
    specs = list(dict.fromkeys(bench.ins + [s for s in bench.outs if s not in bench.ins] + csid))
    unlabelled = []
    for spec in progress.bar(specs, desc="bench: check data", unit="set"):
        try:
            loaded = data.load(spec, split="test", root=data_root)
        except OODBenchError as e:
            missing[spec] = str(e)
        else:
            if spec in csid and loaded.labels is None:
                unlabelled.append(spec)
    asking = [e.method for e in bench.entries if not e.error and workflow.classifies(e.method)]
    if unlabelled and asking:   # before any training or scoring
        raise OODBenchError(f"bench config {bench.path}: " + workflow.csid_label_error(asking[0], unlabelled[0]))
    return missing


def make_executor(options: ExecutorOptions, bench: Bench, folder: Path):
    if options.name == "local":
        return LocalExecutor(options.jobs or os.cpu_count() or 1)
    if options.name == "slurm":
        from oodbench.bench.slurm import SlurmExecutor

        return SlurmExecutor(options, folder, bench.name)
    return SequentialExecutor()


def train_task(job, method: str, runs_dir, data_root, device) -> dict:
    """Train (or reuse, or finish) one run: {"path" or "error", "reused", "trace", "seconds"}."""
    start = time.time()
    try:
        run = workflow.train(method, job.in_spec, job.preset, list(job.overrides), job.seed, runs_dir, job.run_name,
                         data_root, device, resume=True)
        result = {"path": str(run.path), "reused": run.reused, "error": None, "trace": None}
    except Exception as e:  # noqa: BLE001 - a failed training is a failed cell, reported in the table
        result = {"path": None, "reused": False, "error": f"training {job.describe()} failed: {describe_error(e)}",
                  "trace": f"train {job.describe()}\n" + "".join(traceback.format_exception(type(e), e,
                                                                                          e.__traceback__))}
    return {**result, "seconds": time.time() - start}


class Grid:
    """The grid's tasks and what is known of them; `run` drives an executor until every cell has a record."""

    def __init__(self, bench, missing, recorder, folder, runs_dir, data_root, device, compute: bool):
        self.bench, self.recorder, self.folder = bench, recorder, folder
        self.runs_dir, self.data_root, self.device, self.compute = runs_dir, data_root, device, compute
        self.outs = [s for s in bench.outs if s not in missing]
        self.csid = {i: [s for s in specs if s not in missing] for i, specs in bench.csid.items()}
        self.jobs = bench.run_jobs(missing)
        self.units = bench.units(missing)
        self.tasks: dict = {}        # key -> (kind, function, args) of every submitted task
        self.tries: dict = {}
        self.trained = self.reused = 0
        self.bar = progress.bar(total=len(self.units) * len(self.outs), desc="bench: cells", unit="cell")

    def run(self, executor) -> tuple:
        """Submit, wait, record; returns (runs trained, runs reused)."""
        started = time.time()
        waiting: dict = {}
        ready = []
        for unit in self.units:
            entry, in_spec, seed = unit
            if entry.error:
                self.fail_unit(unit, entry.error)
            elif entry.model:
                ready.append((unit, None))
            else:
                waiting.setdefault(run_job(self.bench, entry, in_spec, seed), []).append(unit)
        if self.compute:
            self.submit(executor, [(("train", job), "train", train_task,
                                    (job, method, self.runs_dir, self.data_root, self.device))
                                   for job, method in self.jobs.items()])
        else:
            for job in self.jobs:
                path = workflow.default_run_dir(job.kind, job.in_spec, job.seed, self.runs_dir, job.run_name)
                for unit in waiting.pop(job, []):
                    if workflow.finished(path):
                        ready.append((unit, str(path)))
                    else:
                        self.fail_unit(unit, NOT_TRAINED)
        train_left = len(self.jobs) if self.compute else 0
        trained_at = started   # the stages: until the last training is done, then the scoring after it
        while True:
            if ready:
                self.submit(executor, [(("score", unit[0].label, *unit[1:]), "score", score_unit,
                                        (self.bench, *unit, self.outs, path, self.device, self.folder,
                                         self.runs_dir, self.data_root, self.compute,
                                         self.csid.get(unit[1], []))) for unit, path in ready])
                ready = []
            self.show(executor, train_left)
            finished = executor.wait()
            if not finished:
                break
            for key, result in finished:
                if isinstance(result, TaskFailed) and self.tries[key] <= RETRIES:
                    what = key[1].describe() if key[0] == "train" else f"{key[1]} on {key[2]}, seed {key[3]}"
                    self.recorder.errors.append(f"{key[0]} {what}: {result.message}; submitted again")
                    self.submit(executor, [(key, *self.tasks[key])])
                elif key[0] == "train":
                    train_left -= 1
                    ready += self.trained_run(key[1], result, waiting.pop(key[1], []))
                    trained_at = time.time()
                else:
                    self.scored(self.tasks[key][2][1:4], result)
        self.recorder.seconds["stage: train"] = trained_at - started
        self.recorder.seconds["stage: score"] = time.time() - trained_at
        self.bar.close()
        order = {(e.label, i, s, o): n for n, ((e, i, s), o) in
                 enumerate((unit, out) for unit in self.units for out in self.outs)}
        self.recorder.cells = dict(sorted(self.recorder.cells.items(), key=lambda kv: order[kv[0]]))  # grid order
        return self.trained, self.reused

    def submit(self, executor, tasks: list) -> None:
        for key, kind, fn, args in tasks:
            self.tasks[key] = (kind, fn, args)
            self.tries[key] = self.tries.get(key, 0) + 1
        executor.submit(tasks)

    def trained_run(self, job, result, units: list) -> list:
        """Record a training's result; returns its units, ready to score (none when it failed)."""
        if isinstance(result, TaskFailed):
            result = {"path": None, "error": f"training {job.describe()} failed: {result.message}", "trace": None,
                      "seconds": 0.0}
        self.recorder.seconds[f"train: {job.describe()}"] = result["seconds"]
        if result["path"] is None:
            if result["trace"]:
                self.recorder.errors.append(result["trace"])
            for unit in units:
                self.fail_unit(unit, result["error"])
            return []
        self.reused += result["reused"]
        self.trained += not result["reused"]
        return [(unit, result["path"]) for unit in units]

    def scored(self, unit, result) -> None:
        if isinstance(result, TaskFailed):
            self.fail_unit(unit, result.message)
            return
        self.recorder.merge(result)
        self.bar.update(len(self.outs))

    def fail_unit(self, unit, message: str) -> None:
        self.recorder.fail(*unit, self.outs, message)
        self.bar.update(len(self.outs))

    def show(self, executor, train_left: int) -> None:
        failed = sum(r["status"] == "failed" for r in self.recorder.cells.values())
        self.bar.set_postfix_str(f"{failed} failed, {executor.running()} task(s) running"
                                 + (f", {train_left} training(s) to finish" if train_left else ""))


class SequentialExecutor:
    """Every task in this process, in submission order, when `wait` is called."""

    def __init__(self):
        self.queue = deque()

    def submit(self, tasks: list) -> None:
        self.queue.extend(tasks)

    def running(self) -> int:
        return 0

    def wait(self) -> list:
        if not self.queue:
            return []
        key, _, fn, args = self.queue.popleft()
        return [(key, fn(*args))]

    def close(self) -> None:
        self.queue.clear()


class LocalExecutor:
    """`jobs` worker processes (spawned, so CUDA and threads start clean), each with cpu_count // jobs threads and
    one task at a time. A worker that dies is replaced, and its task is returned as TaskFailed (the grid retries)."""

    def __init__(self, jobs: int):
        self.ctx = get_context("spawn")
        self.jobs = jobs
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.queue = deque()
        self.busy: dict = {}        # connection -> (process, key)
        self.idle: list = []        # (process, connection)

    def submit(self, tasks: list) -> None:
        self.queue.extend(tasks)

    def running(self) -> int:
        return len(self.busy)

    def wait(self) -> list:
        self.idle = [(p, c) for p, c in self.idle if p.is_alive()]   # one that died while idle is replaced
        while self.queue and len(self.busy) < self.jobs:
            process, conn = self.idle.pop() if self.idle else self._start()
            key, _, fn, args = self.queue.popleft()
            conn.send((fn, args))
            self.busy[conn] = (process, key)
        if not self.busy:
            return []
        signalled = connection.wait(list(self.busy) + [p.sentinel for p, _ in self.busy.values()])
        done = []
        for conn, (process, key) in list(self.busy.items()):
            if conn in signalled or process.sentinel in signalled:
                del self.busy[conn]
                try:
                    ok, value = conn.recv()
                except (EOFError, OSError):
                    process.join()
                    conn.close()
                    done.append((key, TaskFailed(f"worker process {process.pid} died (exit code "
                                                 f"{process.exitcode})")))
                    continue
                self.idle.append((process, conn))
                done.append((key, value if ok else TaskFailed(value)))
        return done

    def _start(self):
        parent, child = self.ctx.Pipe()
        process = self.ctx.Process(target=worker, args=(child, self.threads), daemon=True)
        process.start()
        child.close()
        return process, parent

    def close(self) -> None:
        for process, conn in self.idle:
            conn.send(None)
            process.join(timeout=10)
        for process, _ in self.busy.values():
            process.kill()
            process.join()
        self.idle, self.busy = [], {}
        self.queue.clear()


def worker(conn, threads: int) -> None:
    """A LocalExecutor worker: run (function, args) pairs until None; reply (True, result) or (False, error)."""
    os.environ["OODBENCH_PROGRESS"] = "0"   # the submitting process shows the one bar
    threading.Thread(target=exit_with_parent, daemon=True).start()
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    with threadpool_limits(threads):
        while (task := conn.recv()) is not None:
            fn, args = task
            try:
                reply = (True, fn(*args))
            except BaseException as e:  # noqa: BLE001 - reported as the task's failure; the worker goes on
                reply = (False, f"{type(e).__name__}: {e}")
            conn.send(reply)


def exit_with_parent() -> None:
    """End this worker as soon as the bench process that started it is gone (killed, crashed): no orphan trains on."""
    parent_process().join()
    os._exit(70)
