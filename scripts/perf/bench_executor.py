"""Wall time of a bench from scratch: `--executor local --jobs N` against sequential, and their ratio.

Each run gets its own fresh folder (runs/ and report/), so both train everything. The goal on a 2-core machine is a
ratio of at most 0.65 for the quick bench; run it on an idle machine (it is two from-scratch benches one after the
other). The metrics of the two reports are compared too: they must be equal.

    .venv/bin/python scripts/perf/bench_executor.py [--config quick] [--jobs 2] [--device cpu] [--folder DIR]
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


def run(config: str, folder: Path, device: str, executor: list) -> float:
    """Seconds of one `oodbench bench` from scratch in `folder`."""
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x]),
           "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "oodbench", "bench", config, "--runs-dir", str(folder / "runs"),
               "--out", str(folder / "report"), "--device", device, *executor]
    print("running:", " ".join(command), file=sys.stderr, flush=True)
    start = time.monotonic()
    code = subprocess.run(command, cwd=folder, env=env, stdout=subprocess.DEVNULL).returncode
    if code:
        raise SystemExit(f"the bench exited with {code}")
    return time.monotonic() - start


def metrics(folder: Path) -> list:
    results = json.loads((folder / "report" / "results.json").read_text())
    return sorted(json.dumps({k: v for k, v in r.items() if k != "tuned"}, sort_keys=True)
                  for r in results["per_seed"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="quick", help="shipped protocol name or bench YAML path (default: quick)")
    p.add_argument("--jobs", type=int, default=2, help="local worker processes (default: 2)")
    p.add_argument("--device", default="cpu", help="device of the benches (default: cpu)")
    p.add_argument("--folder", default=None, help="empty folder for the two runs (default: a new temporary one)")
    a = p.parse_args(argv)
    folder = Path(a.folder or tempfile.mkdtemp(prefix="oodbench-bench-executor-")).resolve()
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty; a from-scratch time needs an empty folder")
    config = str(Path(a.config).resolve()) if Path(a.config).is_file() else a.config
    sequential = run(config, folder / "sequential", a.device, [])
    local = run(config, folder / "local", a.device, ["--executor", "local", "--jobs", str(a.jobs)])
    same = metrics(folder / "sequential") == metrics(folder / "local")
    print(f"bench {a.config} from scratch on {a.device} ({os.cpu_count()} CPUs): sequential {sequential:.1f} s, "
          f"local --jobs {a.jobs} {local:.1f} s, ratio {local / sequential:.2f}x (goal <= 0.65x); "
          f"per-seed metrics {'equal' if same else 'DIFFER'}; folders in {folder}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
