"""Wall time of a bench from scratch: `--executor local --jobs N` against sequential, and their ratio.

Each run gets its own fresh folder (runs/ and report/), so both train everything. The goal on a 2-core machine is a
ratio of at most 0.65 for the quick bench; run it on an idle machine (it is two from-scratch benches one after the
other). The sequential bench uses torch's default thread count unless --sequential-threads says otherwise; each
local worker gets cpu_count // jobs threads. The per-seed metrics of the two reports are compared: equal when the
thread counts are (a different count sums the training's floats in another order, so the numbers differ a little).

    .venv/bin/python scripts/perf/bench_executor.py [--config quick] [--jobs 2] [--device cpu] [--folder DIR]
                                                    [--sequential-threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def run(config: str, folder: Path, device: str, executor: list, threads=None) -> float:
    """Seconds of one `oodbench bench` from scratch in `folder` (with `threads` OpenMP threads when given)."""
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x]),
           "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [sys.executable, "-m", "oodbench", "bench", config, "--runs-dir", str(folder / "runs"),
               "--out", str(folder / "report"), "--device", device, *executor]
    print("running:", " ".join(command), file=sys.stderr, flush=True)
    start = time.monotonic()
    code = subprocess.run(command, cwd=folder, env=env, stdout=subprocess.DEVNULL).returncode
    if code:
        raise SystemExit(f"the bench exited with {code}")
    return time.monotonic() - start


def auroc(folder: Path) -> dict:
    results = json.loads((folder / "report" / "results.json").read_text())
    return {(r["method"], r["in"], r["out"], r["seed"]): r["auroc"] for r in results["per_seed"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="quick", help="shipped protocol name or bench YAML path (default: quick)")
    p.add_argument("--jobs", type=int, default=2, help="local worker processes (default: 2)")
    p.add_argument("--device", default="cpu", help="device of the benches (default: cpu)")
    p.add_argument("--folder", default=None, help="empty folder for the two runs (default: a new temporary one)")
    p.add_argument("--sequential-threads", type=int, default=None, metavar="N",
                   help="OMP_NUM_THREADS of the sequential bench (default: torch's own choice)")
    a = p.parse_args(argv)
    folder = Path(a.folder or tempfile.mkdtemp(prefix="oodbench-bench-executor-")).resolve()
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty; a from-scratch time needs an empty folder")
    config = str(Path(a.config).resolve()) if Path(a.config).is_file() else a.config
    load = os.getloadavg()[0]
    sequential = run(config, folder / "sequential", a.device, [], a.sequential_threads)
    local = run(config, folder / "local", a.device, ["--executor", "local", "--jobs", str(a.jobs)])
    seq, par = auroc(folder / "sequential"), auroc(folder / "local")
    if set(seq) != set(par):
        raise SystemExit("the two reports have different rows (failed cells?); see their report.md")
    worst = max((abs(seq[k] - par[k]) for k in seq), default=0.0)
    threads = f"{a.sequential_threads} thread(s)" if a.sequential_threads else "torch's default threads"
    print(f"bench {a.config} from scratch on {a.device} ({os.cpu_count()} CPUs): sequential ({threads}) "
          f"{sequential:.1f} s, local --jobs {a.jobs} ({max(1, (os.cpu_count() or 1) // a.jobs)} thread(s) each) "
          f"{local:.1f} s, ratio {local / sequential:.2f}x (goal <= 0.65x); per-seed AUROC "
          + ("equal" if worst == 0 else f"max difference {worst:.4f}")
          + f"; 1-min load average {load:.2f} before, {os.getloadavg()[0]:.2f} after (other processes skew the ratio)"
          + f"; folders in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
