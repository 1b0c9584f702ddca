"""`--executor slurm`: the grid's tasks as SLURM jobs through submitit (`pip install 'oodbench[slurm]'`).

Tasks submitted together (the grid's trainings; the scoring units a finished training makes ready) go out as one job
array per kind. A training with `gpus > 1` is one job with a task per GPU, which join one process group as torchrun's
ranks would (the existing DDP path, oodbench/engine/distributed.py). On preemption or timeout submitit calls
`SlurmTask.checkpoint` and requeues the same call; the training resumes from the run's newest checkpoint.

Job states: submitit asks `sacct`, which fails on clusters whose accounting storage is off (a common setup); there
oodbench reads them from `squeue` instead (`QueueWatcher`), so a job that ended without a result (killed, node
failure) is still seen to end, and submitit's "Bypassing sacct error" warnings are shown once, as one line.
"""
from __future__ import annotations

import getpass
import logging
import os
import re
import subprocess
import time
from pathlib import Path

from oodbench.bench.plan import ExecutorOptions, TaskFailed, sbatch_flag
from oodbench.errors import OODBenchError

POLL_S = 10.0
# Job states that may still end with a result (squeue's long names); any other state, or a job squeue no longer
# lists, has ended.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "RESV_DEL_HOLD"}


def parameters(options: ExecutorOptions, kind: str, name: str) -> dict:
    """submitit parameters of a job of `kind` ("train" or "score"; scoring uses at most one GPU)."""
    gpus = options.gpus if kind == "train" else min(options.gpus, 1)
    found = {"name": f"oodbench-{name}-{kind}", "timeout_min": options.time, "nodes": 1}
    if gpus:
        found["gpus_per_node"] = gpus
    if gpus > 1:
        found["tasks_per_node"] = gpus       # one DDP rank per GPU
    if options.cpus:
        found["cpus_per_task"] = options.cpus
    if options.partition:
        found["slurm_partition"] = options.partition
    if options.jobs:
        found["slurm_array_parallelism"] = options.jobs
    extra = dict(sbatch_flag(f) for f in options.sbatch)
    if extra:
        found["slurm_additional_parameters"] = extra
    return found


class SlurmTask:
    """One task as a submitit job: picklable, requeued with the same call on preemption or timeout."""

    def __init__(self, fn, args: tuple):
        self.fn, self.args = fn, args

    def __call__(self):
        from oodbench.engine import distributed

        join_ranks()
        try:
            return self.fn(*self.args)
        finally:
            distributed.shutdown()   # the ranks of a multi-GPU job leave their process group together

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on preemption/timeout: resubmit the same task (it resumes from its checkpoints)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SlurmTask(self.fn, self.args), *args, **kwargs)


def join_ranks() -> None:
    """In a job of several tasks, set torchrun's variables (RANK, WORLD_SIZE, ...) from the job's environment."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    port = 20000 + int(re.sub(r"\D", "", str(env.job_id)) or 0) % 20000
    os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
                      MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(port))


def accounting_enabled() -> bool:
    """Whether this cluster keeps job accounting (so `sacct` can tell job states); unknown counts as yes."""
    try:
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    found = re.search(r"^AccountingStorageType\s*=\s*(\S+)", shown, re.M)
    return not (found and found.group(1).endswith("/none"))


def queue_watcher(submitit):
    """A submitit state watcher that reads `squeue` (every job of this user, array tasks one per line)."""

    class QueueWatcher(submitit.slurm.slurm.SlurmInfoWatcher):
        def _make_command(self):
            if not self._registered - self._finished:
                return None
            return ["squeue", "--noheader", "--array", "--states=all", f"--user={getpass.getuser()}",
                    "--format=%i|%T"]

        def read_info(self, string):
            text = string.decode() if isinstance(string, bytes) else string
            listed = dict(line.strip().split("|", 1) for line in text.splitlines() if "|" in line)
            return {job: {"State": listed.get(job, "ENDED")} for job in self._registered}

        def is_done(self, job_id, mode="standard"):
            return self.get_state(job_id, mode=mode).upper() not in ACTIVE_STATES | {"UNKNOWN"}

    return QueueWatcher(delay_s=60)


class OnceFilter(logging.Filter):
    """Lets the first "Bypassing sacct error" warning through as one line, and none after it."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg, record.args = ("sacct could not tell job states (status may lag; shown once): "
                                   + " ".join(record.getMessage().split())[:300]), ()
        return True


class SlurmExecutor:
    """Tasks as SLURM jobs; `cluster` is submitit's (slurm, or its local/debug executors for tests)."""

    def __init__(self, options: ExecutorOptions, folder: Path, name: str, cluster: str = "slurm",
                 poll_s: float = POLL_S):
        try:
            import submitit
        except ImportError:
            raise OODBenchError("--executor slurm needs submitit: pip install 'oodbench[slurm]' (or pip install "
                                "submitit)") from None
        self.submitit, self.options, self.name, self.cluster, self.poll_s = submitit, options, name, cluster, poll_s
        self.folder = Path(options.folder) if options.folder else Path(folder) / "slurm"
        self.jobs: dict = {}     # key -> submitit job
        self.watcher = None
        if cluster == "slurm":
            log = logging.getLogger("submitit")
            if not any(isinstance(f, OnceFilter) for f in log.filters):
                log.addFilter(OnceFilter())
            if not accounting_enabled():
                self.watcher = queue_watcher(submitit)

    def executor(self, kind: str):
        """The submitit executor of jobs of `kind`, with their resources set."""
        executor = self.submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.cluster)
        executor.update_parameters(**parameters(self.options, kind, self.name))
        return executor

    def submit(self, tasks: list) -> None:
        for kind in ("train", "score"):
            mine = [(key, SlurmTask(fn, args)) for key, k, fn, args in tasks if k == kind]
            if not mine:
                continue
            executor = self.executor(kind)
            with executor.batch():      # one job array
                jobs = [executor.submit(task) for _, task in mine]
            if self.watcher is not None:
                for job in jobs:
                    job.watcher = self.watcher    # states from squeue: sacct has no accounting to read
            self.jobs.update({key: job for (key, _), job in zip(mine, jobs)})

    def running(self) -> int:
        return len(self.jobs)

    def wait(self) -> list:
        while self.jobs:
            done = [(key, job) for key, job in self.jobs.items() if job.done()]
            if done:
                finished = []
                for key, job in done:
                    del self.jobs[key]
                    try:
                        finished.append((key, job.results()[0]))
                    except Exception as e:  # noqa: BLE001 - a job that gave no result (node failure, killed, ...)
                        text = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                        finished.append((key, TaskFailed(f"job {job.job_id} failed: {text}")))
                return finished
            time.sleep(self.poll_s)
        return []

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel(check=False)
        self.jobs = {}
