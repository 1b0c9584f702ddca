"""Time a bench (default: the quick one) from scratch and print where the time goes.

A fresh folder holds the runs and the report, and the bench runs from inside it (so this also checks that the
shipped protocol is found from any directory). At the end: total wall and CPU time, then the seconds of each stage,
of each run's training and of each method's scoring, from the report's results.json. Run it on an idle machine;
the progress lines of the bench go to stderr as it runs.

    .venv/bin/python scripts/perf/quick_bench_times.py [--config quick] [--device cpu] [--folder DIR]

The folder (a new temporary one by default; an existing one must be empty) is kept: feed its results.json to
scripts/docs_quick_tables.py to refresh the docs' quick tables.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def minutes(seconds: float) -> str:
    return f"{seconds:7.1f} s  ({seconds / 60:5.1f} min)"


def format_times(results: dict, wall: float, cpu: float) -> str:
    t = results["timing"]
    lines = [f"bench {results['settings']['name']} from scratch on {t['device']} ({t['cpus']} CPUs), finished "
             f"{t['finished']}: {t['runs_trained']} run(s) trained, {t['cells_computed']} cell(s) computed",
             f"{'total wall (process)':<55} {minutes(wall)}",
             f"{'total CPU, user + sys (process)':<55} {minutes(cpu)}",
             f"{'bench (its own clock)':<55} {minutes(t['seconds'])}"]
    parts = t["parts"]
    for stage in ("check data", "train", "score", "plots"):
        lines.append(f"{'stage: ' + stage:<55} {minutes(parts.get('stage: ' + stage, 0.0))}")
        prefix = {"train": "train: ", "score": "score: "}.get(stage)
        if prefix:
            items = sorted(((k, v) for k, v in parts.items() if k.startswith(prefix)), key=lambda kv: -kv[1])
            lines += [f"    {k[len(prefix):]:<51} {minutes(v)}" for k, v in items]
    if t["runs_reused"] or t["cells_cached"]:
        lines.append(f"warning: {t['runs_reused']} run(s) reused and {t['cells_cached']} cell(s) from cache: "
                     f"not a from-scratch time")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="quick", help="shipped protocol name or bench YAML path (default: quick)")
    p.add_argument("--device", default="cpu", help="device of the bench (default: cpu)")
    p.add_argument("--folder", default=None, help="empty folder for runs/ and report/ (default: a new temporary one)")
    a = p.parse_args(argv)
    folder = Path(a.folder or tempfile.mkdtemp(prefix="oodbench-bench-times-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty; a from-scratch time needs an empty folder")
    config = str(Path(a.config).resolve()) if Path(a.config).is_file() else a.config
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x]),
           "PYTHONUNBUFFERED": "1"}
    env.pop("OODBENCH_PROGRESS", None)        # plain progress lines, since stderr is usually a log here
    command = [sys.executable, "-m", "oodbench", "bench", config, "--runs-dir", str(folder / "runs"),
               "--out", str(folder / "report"), "--device", a.device]
    print("running:", " ".join(command), f"(in {folder})", file=sys.stderr, flush=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    code = subprocess.run(command, cwd=folder, env=env, stdout=subprocess.DEVNULL).returncode
    wall, after = time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        print(f"the bench exited with {code}; no times to show", file=sys.stderr)
        return code
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    results = json.loads((folder / "report" / "results.json").read_text())
    print(format_times(results, wall, cpu))
    print(f"report: {folder / 'report'}; docs tables: python scripts/docs_quick_tables.py "
          f"{folder / 'report' / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
