"""From cells to results: per-seed and summary rows (groups as plain means), failures, caveat notes, timing."""
from __future__ import annotations

import os
import time

import numpy as np

from oodbench.bench.plan import Bench
from oodbench.joint_metrics import FS_JOINT_TITLES, FS_TITLES, JOINT_TITLES
from oodbench.metrics import METRIC_NAMES

ACCURACIES = ("id_accuracy", "csid_accuracy")   # averaged too where every row of a cell has them


def metric_names(bench: Bench) -> tuple:
    """The metrics averaged over sets and seeds: the detection ones, plus the joint ones when the bench asks, plus
    the full-spectrum ones (fs_*) when it names csID sets."""
    names = METRIC_NAMES + (tuple(JOINT_TITLES) if bench.joint else ())
    if bench.csid:
        names += tuple(FS_TITLES) + (tuple(FS_JOINT_TITLES) if bench.joint else ())
    return names


def _present(rows: list, names: tuple) -> tuple:
    """`names` that every row has (FS-OOD metrics: only the ID sets with csID sets on disk have them), then the
    accuracies every row has."""
    return tuple(m for m in names + ACCURACIES if all(m in r for r in rows))


def summarise(bench: Bench, cells: dict) -> dict:
    """{"per_seed": rows, "summary": rows}: per-set rows and group rows (plain means of per-set metrics)."""
    per_seed, names = [], metric_names(bench)
    for (label, in_spec, seed, out), record in cells.items():
        if record["status"] == "ok":
            per_seed += [{**row, "seed": seed, "entry": label, "group": False} for row in record["rows"]]
    for group, specs in bench.groups.items():
        by_key: dict = {}
        for row in per_seed:
            if not row["group"] and row["out"] in specs:
                by_key.setdefault((row["entry"], row["method"], row["in"], row["seed"]), []).append(row)
        for (label, method, in_spec, seed), rows in by_key.items():
            mean = {m: float(np.mean([r[m] for r in rows])) for m in _present(rows, names)}
            per_seed.append({"method": method, "in": in_spec, "out": group, **mean, "seed": seed, "entry": label,
                             "group": True, "sets": [r["out"] for r in rows],
                             **({"tuned": rows[0]["tuned"]} if "tuned" in rows[0] else {})})
    summary = []
    keyed: dict = {}
    for row in per_seed:
        keyed.setdefault((row["entry"], row["method"], row["in"], row["out"]), []).append(row)
    for (label, method, in_spec, out), rows in keyed.items():
        agg = {"method": method, "in": in_spec, "out": out, "entry": label, "group": rows[0]["group"],
               "seeds": [r["seed"] for r in rows]}
        for m in _present(rows, names):
            values = np.array([r[m] for r in rows])
            agg[m], agg[f"{m}_std"] = float(values.mean()), float(values.std())
            if all(f"{m}_ci" in r for r in rows):
                agg[f"{m}_ci"] = [float(np.mean([r[f"{m}_ci"][i] for r in rows])) for i in (0, 1)]
        if "tuned" in rows[0]:   # the options --tune chose (one dict, or one per seed when the seeds differ)
            choices = [r["tuned"] for r in rows]
            agg["tuned"] = choices[0] if all(c == choices[0] for c in choices) else choices
        if rows[0]["group"]:
            agg["sets"] = sorted({s for r in rows for s in r["sets"]}, key=bench.groups[out].index)
        summary.append(agg)
    return {"per_seed": per_seed, "summary": summary}




def failures(bench: Bench, cells: dict) -> list:
    """Failed cells, one per distinct (method, in, out, error), with the seeds it failed on."""
    found: dict = {}
    for (label, in_spec, seed, out), record in cells.items():
        if record["status"] == "failed":
            found.setdefault((label, in_spec, out, record["error"]), []).append(seed)
    return [{"method": k[0], "in": k[1], "out": k[2], "error": k[3], "seeds": v} for k, v in found.items()]


def collapse(failed: list) -> list:
    """Failures with the same method, ID set, error and seeds merged into one note listing their OOD sets."""
    merged: dict = {}
    for f in failed:
        key = (f["method"], f["in"], f["error"], tuple(f["seeds"]))
        merged.setdefault(key, {**f, "outs": []})["outs"].append(f["out"])
    return list(merged.values())




BELOW_CHANCE = "below chance on"   # a note's start; the report's Notes say what it means


def report_notes(bench: Bench, cells: dict, summary: list) -> list:
    """[{method, in, note}]: the cells' row notes, and every OOD set a row scores below chance (AUROC < 50%)."""
    found: dict = {}
    for (label, in_spec, seed, out), record in cells.items():
        for row, texts in (record.get("notes") or {}).items():
            kept = found.setdefault((row, in_spec), [])
            kept += [t for t in texts if t not in kept]
    below: dict = {}
    for r in summary:
        if not r["group"] and r["auroc"] < 0.5:
            below.setdefault((r["method"], r["in"]), []).append(f"{r['out']} {100 * r['auroc']:.1f}")
    for key, sets in below.items():
        found.setdefault(key, []).append(f"{BELOW_CHANCE} {', '.join(sets)}")
    return [{"method": row, "in": in_spec, "note": "; ".join(texts)} for (row, in_spec), texts in found.items()]




def timing(seconds: float, trained: int, reused: int, recorder) -> dict:
    """How long this bench took and how much of it was new work (runs trained or reused, cells computed or cached),
    with the seconds of each stage, each run's training and each method's scoring."""
    return {"finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "seconds": round(seconds, 1), "runs_trained": trained, "runs_reused": reused,
            "cells_computed": recorder.computed, "cells_cached": recorder.from_cache,
            "parts": {k: round(v, 1) for k, v in recorder.seconds.items()}}


def describe_timing(t: dict) -> str:
    took = f"took {t['seconds'] / 60:.1f} min"
    if not (t["runs_trained"] or t["cells_computed"]):
        return took + " (everything from cache: the runs and cells of an earlier bench were reused; a from-scratch " \
                      "run takes longer)"
    return took + (f" ({t['runs_trained']} run(s) trained, {t['runs_reused']} reused; {t['cells_computed']} cell(s) "
                   f"computed, {t['cells_cached']} from cache)")

