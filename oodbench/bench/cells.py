"""Cells (method × ID set × OOD set × seed): scoring one unit of them, and the cell cache in `<report>/cells/`.

`score_unit` is what an executor runs for each (method entry, ID set, seed): it takes plain arguments and returns
plain data (`Recorder.result()`), so a worker process or a SLURM job can run it and the submitting process merges
the result (`Recorder.merge`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import traceback
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from oodbench import workflow
from oodbench.bench.plan import Bench, Entry, renamer
from oodbench.engine import setup_device
from oodbench.errors import OODBenchError

MARKER = ".oodbench-report"     # the file that makes a folder an oodbench report folder (bench.check_report_folder)
NOT_COMPUTED = "not computed yet (--report-only shows finished cells only; run the bench without it)"


class Recorder:
    """Cell results: {(label, in, seed, out): record}, with a file cache per finished cell in `<report>/cells/`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.cells: dict = {}
        self.errors: list = []
        self.computed = self.from_cache = 0     # cells scored in this bench / read from `cells/`
        self.seconds: dict = {}                 # wall seconds per stage, run training and method scoring

    @contextlib.contextmanager
    def timed(self, what: str):
        start = time.time()
        try:
            yield
        finally:
            self.seconds[what] = self.seconds.get(what, 0.0) + time.time() - start

    @staticmethod
    def key(material: dict) -> str:
        return hashlib.sha1(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def cached(self, material: dict) -> Optional[dict]:
        path = self.folder / "cells" / f"{self.key(material)}.json"
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return None   # a damaged cell is recomputed
        if not isinstance(record, dict) or record.pop("digest", None) != record_digest(record):
            return None   # changed after it was written (or from before digests): recomputed
        return record if record.get("material") == json.loads(json.dumps(material, default=str)) else None

    def save(self, material: dict, record: dict) -> None:
        record = json.loads(json.dumps({**record, "material": material}, default=str))
        record["digest"] = record_digest(record)
        self.computed += 1
        mark_report_folder(self.folder)
        workflow.write_atomic(self.folder / "cells" / f"{self.key(material)}.json",
                          json.dumps(record, indent=1, default=str) + "\n")

    def put(self, entry: Entry, in_spec: str, seed: int, out: str, record: dict) -> None:
        self.cells[(entry.label, in_spec, seed, out)] = record

    def fail(self, entry: Entry, in_spec: str, seed: int, outs, error: BaseException | str) -> None:
        message = error if isinstance(error, str) else describe_error(error)
        if not isinstance(error, str):
            self.errors.append(f"{entry.label} | {in_spec} | seed {seed} | {', '.join(outs)}\n"
                               + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
        for out in outs:
            self.put(entry, in_spec, seed, out, {"status": "failed", "error": message})

    def result(self) -> dict:
        """What this recorder holds, as plain data for `merge` in another process."""
        return {"cells": self.cells, "errors": self.errors, "computed": self.computed, "cached": self.from_cache,
                "seconds": self.seconds}

    def merge(self, result: dict) -> None:
        self.cells.update(result["cells"])
        self.errors += result["errors"]
        self.computed += result["computed"]
        self.from_cache += result["cached"]
        for what, seconds in result["seconds"].items():
            self.seconds[what] = self.seconds.get(what, 0.0) + seconds


def record_digest(record: dict) -> str:
    """sha256 of a cell record (without its `digest`), as stored: a record changed on disk is recomputed."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def describe_error(error: BaseException) -> str:
    if os.environ.get("OODBENCH_DEBUG"):
        raise error
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, OODBenchError) else f"{type(error).__name__}: {text}"


def model_run(entry: Entry, in_spec: str, seed: int, runs_dir, data_root):
    """The ModelRun of an entry with `model:`, or an error message (the cells fail with it)."""
    from oodbench.models import load_model

    try:
        options, _ = workflow.split_model_overrides(entry.model_overrides)
        model = load_model(entry.model, seed=seed, in_dataset=in_spec, data_root=data_root, **options)
        return workflow.ModelRun(model, in_spec, entry.model, entry.fit_limit, runs_dir, data_root, seed)
    except Exception as e:  # noqa: BLE001 - a model that cannot be loaded is a failed cell, reported in the table
        return f"model {entry.model} failed: {describe_error(e)}"


def score_unit(bench: Bench, entry: Entry, in_spec: str, seed: int, outs: list, run_path: Optional[str], device,
               folder: Path, runs_dir=None, data_root=None, compute: bool = True, csid: Optional[list] = None) -> dict:
    """One method on one run (the trained run at `run_path`, or the entry's `model:`): the ID set once, then each
    OOD set; finished cells come from the cell cache. With compute=False only cached cells are read. `csid`: the
    ID set's covariate-shifted sets that are on disk (FS-OOD metrics in every row)."""
    recorder = Recorder(folder)
    with recorder.timed(f"score: {entry.label} on {in_spec}, seed {seed}"):
        run = model_run(entry, in_spec, seed, runs_dir, data_root) if entry.model else workflow.Run(run_path)
        if isinstance(run, str):
            recorder.fail(entry, in_spec, seed, outs, run)
        else:
            _score(bench, entry, in_spec, seed, outs, run, run.tag, device, recorder, folder, compute, csid or [])
    return recorder.result()


def _score(bench, entry, in_spec, seed, outs, run, digest, device, recorder, folder, compute, csid) -> None:
    todo, materials = [], {}
    try:  # the method's effective scoring options: a changed default or run config makes the cells stale
        options = run.scoring_config(entry.score_overrides).get(entry.method)
    except OODBenchError:
        options = None   # the cell fails below with this error
    for out in outs:
        materials[out] = {"method": entry.method, "label": entry.label, "preset": entry.preset,
                          "model": entry.model, "fit_limit": entry.fit_limit, "tune": entry.tune,
                          "train_overrides": entry.train_overrides, "score_overrides": entry.score_overrides,
                          "limit": entry.limit, "in": in_spec, "out": out, "seed": seed, "bootstrap": bench.bootstrap,
                          "run": str(run.path), "detector": digest, "options": options,
                          **({"joint": True} if bench.joint else {}),
                          **({"model_overrides": entry.model_overrides} if entry.model_overrides else {}),
                          **({"csid": csid} if csid else {})}
        record = recorder.cached(materials[out])
        needs_plot_scores = seed == bench.seeds[0] and not all(
            plot_scores_path(folder, entry, in_spec, s).is_file() for s in (in_spec, out))
        if record is not None and (not needs_plot_scores or not compute):
            recorder.from_cache += 1
            recorder.put(entry, in_spec, seed, out, record)
        else:
            todo.append(out)
    if not compute:
        recorder.fail(entry, in_spec, seed, todo, NOT_COMPUTED)
        return
    if not todo:
        return
    try:
        run.check_overlap(run.scoring_config(entry.score_overrides), setup_device(device))
        scoring = run.prepare(entry.method, entry.score_overrides, device)
        found = {}

        def keep_id(result):
            found["id"] = result
            if seed == bench.seeds[0]:
                save_plot_scores(plot_scores_path(folder, entry, in_spec, in_spec), result.scores)

        outcomes = workflow.evaluate_method(run, scoring, todo, entry.limit, bench.bootstrap, entry.tune,
                                            renamer(entry), on_id=keep_id, joint=bench.joint, csid=csid)
        for outcome in outcomes:
            if outcome.error is not None:
                recorder.fail(entry, in_spec, seed, [outcome.out], outcome.error)
                continue
            id_result = found["id"]
            record = {"status": "ok", "rows": outcome.rows, "run": str(run.path), "n_in": len_scores(id_result.scores),
                      "n_out": len_scores(outcome.scores), "notes": id_result.notes}
            recorder.save(materials[outcome.out], record)
            recorder.put(entry, in_spec, seed, outcome.out, record)
            if seed == bench.seeds[0]:
                save_plot_scores(plot_scores_path(folder, entry, in_spec, outcome.out), outcome.scores)
    except Exception as e:  # noqa: BLE001 - the ID side failed: every cell left fails with it
        left = [out for out in todo if (entry.label, in_spec, seed, out) not in recorder.cells]
        recorder.fail(entry, in_spec, seed, left, e)


def len_scores(arrays: dict) -> int:
    return len(next(v for k, v in arrays.items() if not k.startswith("_")))


def plot_scores_path(folder: Path, entry: Entry, in_spec: str, spec: str) -> Path:
    return folder / "scores" / workflow.safe_name(in_spec) / workflow.safe_name(entry.label) / f"{workflow.safe_name(spec)}.npz"


def mark_report_folder(folder: Path) -> None:
    """Write the marker that makes `folder` an oodbench report folder (before the first file of the report)."""
    if not (Path(folder) / MARKER).is_file():
        workflow.write_atomic(Path(folder) / MARKER, "an oodbench bench report: `oodbench bench --out` rewrites "
                                                     "the files in this folder\n")


def save_plot_scores(path: Path, arrays: dict) -> None:
    """The first seed's scores, kept in the report folder for the plots (float32, evaluated rows only)."""
    mark_report_folder(path.parents[3])
    workflow.save_npz(path, {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items() if not k.startswith("_")})


def load_plot_scores(path: Path) -> dict:
    """The saved plot scores ({} when missing or damaged: that plot is left out)."""
    if not path.is_file():
        return {}
    try:
        return workflow.load_npz(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, MemoryError):
        return {}
