"""`oodbench bench`: a grid of methods × in-distribution sets × OOD sets × seeds → one report folder.

Stages (each with a progress bar): check which datasets are on disk, train the runs that are missing (or finish
interrupted ones), score each method on each set (through the runs' score caches), evaluate, and write `report.md`,
`results.csv`, `results_per_seed.csv`, `results.json` and PNG plots. A finished cell (method × ID × OOD × seed) is
kept in `<report>/cells/`, so an interrupted or repeated bench redoes only what is missing. A failing cell is
reported and the rest goes on; a dataset that is not on disk is skipped with a note. The YAML format is in
docs/bench.md.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from oodbench import config as configs
from oodbench import data, plots, progress, protocols, runs, tuning
from oodbench.detectors import base as registry
from oodbench.engine import resolve_device
from oodbench.errors import OODBenchError

BENCH_KEYS = ("name", "report", "preset", "seeds", "in", "out", "limit", "bootstrap", "train_overrides", "run_name",
              "plots", "methods", "tune")
ENTRY_KEYS = ("method", "label", "preset", "overrides", "limit", "model", "fit_limit", "tune")
METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood", "detection_error")
TABLE_METRICS = (("auroc", "AUROC"), ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"), ("fpr95", "FPR@95"),
                 ("detection_error", "DetErr"))


# ---------------------------------------------------------------------------------------------------- the config
@dataclass
class Entry:
    """One method of the grid: its registered name, the label its rows get, and its own settings."""
    method: str
    label: str
    preset: Optional[str]
    train_overrides: list       # change the trained run (seed/data/model/train keys)
    score_overrides: list       # change scoring options only
    limit: Optional[int]
    kind: str = ""
    error: str = ""             # set when the method cannot be used at all (e.g. not registered)
    model: Optional[str] = None     # a model spec: score that classifier (no training) instead of a trained run
    fit_limit: Optional[int] = None
    tune: bool = False              # choose the method's options on validation data first (oodbench.tuning)


@dataclass
class Bench:
    path: Path
    name: str
    report: Path
    preset: Optional[str]
    seeds: list
    ins: list
    outs: list                  # every OOD spec, in order, once
    groups: dict                # group name -> its specs (empty when `out` is a plain list)
    limit: Optional[int]
    bootstrap: int
    train_overrides: dict       # kind (or "all") -> overrides
    run_name: Optional[str]
    plots: bool
    entries: list = field(default_factory=list)
    tune: bool = False

    def settings(self) -> dict:
        return {"name": self.name, "config": str(self.path), "preset": self.preset, "seeds": self.seeds,
                "in": self.ins, "out": self.outs, "groups": self.groups, "limit": self.limit,
                "bootstrap": self.bootstrap, "train_overrides": self.train_overrides, "run_name": self.run_name,
                "methods": [e.label for e in self.entries],
                "limits": {e.label: e.limit for e in self.entries if e.limit != self.limit}}


def load_bench(config) -> Bench:
    """Read and check a bench YAML, given by path or shipped protocol name (unknown keys are errors)."""
    path = protocols.bench_path(config)
    raw = configs.read_yaml(path)
    where = f"bench config {path}"
    _check_keys(raw, BENCH_KEYS, where)
    for key in ("in", "out", "methods"):
        if not raw.get(key):
            raise OODBenchError(f"{where}: `{key}` is missing or empty; see docs/bench.md for the format")
    ins = _spec_list(raw["in"], f"{where}: in")
    outs, groups = _out_specs(raw["out"], where)
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise OODBenchError(f"{where}: seeds must be an integer or a list of integers, got {raw.get('seeds')!r}")
    name = str(raw.get("name") or path.stem)
    bench = Bench(path=path, name=name, report=Path(raw.get("report") or f"reports/{name}"),
                  preset=raw.get("preset"), seeds=seeds, ins=ins, outs=outs, groups=groups,
                  limit=_limit(raw.get("limit"), where), bootstrap=_count(raw.get("bootstrap", 0), where),
                  train_overrides=_train_overrides(raw.get("train_overrides"), where),
                  run_name=raw.get("run_name"), plots=bool(raw.get("plots", True)))
    bench.tune = _flag(raw.get("tune", False), f"{where}: tune")
    bench.entries = [_entry(item, bench, where) for item in raw["methods"]]
    labels = [e.label for e in bench.entries]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise OODBenchError(f"{where}: method(s) {', '.join(twice)} listed twice; give one of them a `label:`")
    return bench


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise OODBenchError(f"{where} must be true or false, got {value!r}")
    return value


def _check_keys(raw: dict, allowed, where: str) -> None:
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(allowed)}."
            raise OODBenchError(f"{where}: unknown key {key!r}.{hint}")


def _spec_list(value, where: str) -> list:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s.strip() for s in items):
        raise OODBenchError(f"{where} must be a dataset spec or a list of specs, got {value!r}")
    return list(dict.fromkeys(s.strip() for s in items))


def _out_specs(value, where: str):
    if isinstance(value, dict):
        groups = {str(g): _spec_list(specs, f"{where}: out.{g}") for g, specs in value.items()}
        outs = list(dict.fromkeys(s for specs in groups.values() for s in specs))
        clash = [g for g in groups if g in outs]
        if clash:
            raise OODBenchError(f"{where}: group name {clash[0]!r} is also an OOD set; rename the group")
        return outs, groups
    return _spec_list(value, f"{where}: out"), {}


def _limit(value, where: str) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise OODBenchError(f"{where}: limit must be a positive integer or null, got {value!r}")
    return value


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OODBenchError(f"{where}: bootstrap must be a number of resamples >= 0 (0 = off), got {value!r}")
    return value


def _overrides(value, where: str) -> list:
    items = [] if value is None else ([value] if isinstance(value, str) else value)
    if not isinstance(items, list) or not all(isinstance(s, str) and "=" in s for s in items):
        raise OODBenchError(f"{where} must be a list of key=value strings (e.g. train.steps=100), got {value!r}")
    return list(items)


def _train_overrides(value, where: str) -> dict:
    """A list applies to every kind; a mapping gives overrides per kind (`all` for every kind)."""
    if isinstance(value, dict):
        return {str(k): _overrides(v, f"{where}: train_overrides.{k}") for k, v in value.items()}
    return {"all": _overrides(value, f"{where}: train_overrides")}


def _entry(item, bench: Bench, where: str) -> Entry:
    if isinstance(item, str):
        item = {"method": item}
    if not isinstance(item, dict) or not isinstance(item.get("method"), str):
        raise OODBenchError(f"{where}: each methods entry is a method name or a mapping with `method:`, "
                            f"got {item!r}")
    _check_keys(item, ENTRY_KEYS, f"{where}: method {item['method']}")
    overrides = _overrides(item.get("overrides"), f"{where}: method {item['method']} overrides")
    training = [o for o in overrides if configs.is_training_option(o.split("=", 1)[0].strip())]
    entry = Entry(method=item["method"], label=str(item.get("label") or item["method"]),
                  preset=item.get("preset", bench.preset), train_overrides=training,
                  score_overrides=[o for o in overrides if o not in training],
                  limit=_limit(item.get("limit", bench.limit), f"{where}: method {item['method']}"),
                  model=item.get("model"), fit_limit=_limit(item.get("fit_limit"), f"{where}: fit_limit"),
                  tune=_flag(item.get("tune", bench.tune), f"{where}: method {item['method']} tune"))
    try:
        entry.kind = registry.get(entry.method).kind
    except OODBenchError as e:
        entry.error = str(e)
    if entry.model is not None:
        if not isinstance(entry.model, str) or not entry.model.strip():
            raise OODBenchError(f"{where}: method {entry.method}: model must be a model spec, e.g. "
                                f"torchvision:resnet18:none")
        if training:
            raise OODBenchError(f"{where}: method {entry.method} scores model {entry.model}; it has no training "
                                f"overrides ({', '.join(training)})")
        if not entry.error and entry.kind != "classifier":
            entry.error = f"method {entry.method!r} trains its own {entry.kind!r} model; `model:` takes classifier methods"
    return entry


# ---------------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class RunJob:
    """One trained run the grid needs (methods of one kind with the same training settings share it)."""
    kind: str
    in_spec: str
    seed: int
    preset: Optional[str]
    overrides: tuple
    run_name: Optional[str]

    def describe(self) -> str:
        return f"{self.kind} on {self.in_spec}, seed {self.seed}" + (f" ({self.run_name})" if self.run_name else "")


def run_job(bench: Bench, entry: Entry, in_spec: str, seed: int) -> RunJob:
    overrides = bench.train_overrides.get("all", []) + bench.train_overrides.get(entry.kind, [])
    own = list(entry.train_overrides) + ([f"preset={entry.preset}"] if entry.preset != bench.preset else [])
    name = bench.run_name
    if own:  # this method's own training settings get their own run folder
        suffix = hashlib.sha1("\n".join(own).encode()).hexdigest()[:6]
        name = f"{name}-{suffix}" if name else suffix
    return RunJob(entry.kind, in_spec, seed, entry.preset, tuple(overrides + entry.train_overrides), name)


def renamer(entry: Entry):
    """Row names carry the entry's label when it has one (odin → odin_t1; msma_gmm → msma-big_gmm)."""
    if entry.label == entry.method:
        return lambda row: row
    return lambda row: entry.label + row[len(entry.method):] if row.startswith(entry.method) else \
        f"{entry.label}:{row}"


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
        if not isinstance(record, dict):
            return None
        return record if record.get("material") == json.loads(json.dumps(material, default=str)) else None

    def save(self, material: dict, record: dict) -> None:
        record = {**record, "material": material}
        self.computed += 1
        runs.write_atomic(self.folder / "cells" / f"{self.key(material)}.json",
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


def describe_error(error: BaseException) -> str:
    if os.environ.get("OODBENCH_DEBUG"):
        raise error
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, OODBenchError) else f"{type(error).__name__}: {text}"


# ---------------------------------------------------------------------------------------------------- stages
def run_bench(config_path, runs_dir=None, data_root=None, device="auto", out=None) -> Path:
    """Run the grid of `config_path` and write the report; returns the report folder."""
    bench = load_bench(config_path)
    device = resolve_device(device)
    folder = Path(out) if out else bench.report
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    recorder = Recorder(folder)
    with recorder.timed("stage: check data"):
        missing = check_data(bench, data_root)
    with recorder.timed("stage: train"):
        trained = train_stage(bench, missing, runs_dir, data_root, device, recorder)
    with recorder.timed("stage: score"):
        score_stage(bench, missing, trained, device, recorder, folder, runs_dir, data_root)
    summary = summarise(bench, recorder.cells)
    with recorder.timed("stage: plots"):
        plot_note = make_plots(bench, recorder.cells, summary, folder) if bench.plots else \
            "plots are off (plots: false)"
    write_report(bench, folder, recorder, summary, missing, plot_note, timing(time.time() - started, trained,
                                                                              recorder), device)
    return folder


def timing(seconds: float, trained: dict, recorder: "Recorder") -> dict:
    """How long this bench took and how much of it was new work (runs trained or reused, cells computed or cached),
    with the seconds of each stage, each run's training and each method's scoring."""
    reused = sum(isinstance(r, runs.Run) and r.reused for r in trained.values())
    return {"finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "seconds": round(seconds, 1), "runs_trained": sum(isinstance(r, runs.Run) for r in trained.values())
            - reused, "runs_reused": reused, "cells_computed": recorder.computed, "cells_cached": recorder.from_cache,
            "parts": {k: round(v, 1) for k, v in recorder.seconds.items()}}


def describe_timing(t: dict) -> str:
    took = f"took {t['seconds'] / 60:.1f} min"
    if not (t["runs_trained"] or t["cells_computed"]):
        return took + " (everything from cache: the runs and cells of an earlier bench were reused; a from-scratch " \
                      "run takes longer)"
    return took + (f" ({t['runs_trained']} run(s) trained, {t['runs_reused']} reused; {t['cells_computed']} cell(s) "
                   f"computed, {t['cells_cached']} from cache)")


def check_data(bench: Bench, data_root) -> dict:
    """{spec: why it cannot be used} for every in/out spec whose test split cannot be loaded."""
    missing = {}
    specs = bench.ins + [s for s in bench.outs if s not in bench.ins]
    for spec in progress.bar(specs, desc="bench: check data", unit="set"):
        try:
            data.load(spec, split="test", root=data_root)
        except OODBenchError as e:
            missing[spec] = str(e)
    return missing


def train_stage(bench: Bench, missing: dict, runs_dir, data_root, device, recorder: Recorder) -> dict:
    """Train (or reuse, or finish) every run the grid needs: {RunJob: Run | error message}."""
    jobs: dict = {}
    for entry in bench.entries:
        for in_spec in bench.ins:
            if entry.error or in_spec in missing or entry.model:
                continue
            for seed in bench.seeds:
                jobs.setdefault(run_job(bench, entry, in_spec, seed), entry.method)
    trained = {}
    bar = progress.bar(jobs.items(), desc="bench: train", unit="run", total=len(jobs))
    for job, method in bar:
        bar.set_postfix_str(job.describe())
        try:
            with recorder.timed(f"train: {job.describe()}"):
                trained[job] = runs.train(method, job.in_spec, job.preset, list(job.overrides), job.seed, runs_dir,
                                          job.run_name, data_root, device, resume=True)
        except Exception as e:  # noqa: BLE001 - a failed training is a failed cell, reported in the table
            trained[job] = f"training {job.describe()} failed: {describe_error(e)}"
            recorder.errors.append(f"train {job.describe()}\n" + "".join(traceback.format_exception(
                type(e), e, e.__traceback__)))
    return trained


def model_run(entry: Entry, in_spec: str, seed: int, runs_dir, data_root):
    """The ModelRun of an entry with `model:`, or an error message (the cells fail with it)."""
    from oodbench.models import load_model

    try:
        return runs.ModelRun(load_model(entry.model, seed=seed), in_spec, entry.model, entry.fit_limit, runs_dir,
                             data_root, seed)
    except Exception as e:  # noqa: BLE001 - a model that cannot be loaded is a failed cell, reported in the table
        return f"model {entry.model} failed: {describe_error(e)}"


def score_stage(bench: Bench, missing: dict, trained: dict, device, recorder: Recorder, folder: Path,
                runs_dir=None, data_root=None) -> None:
    """Score and evaluate every cell, reusing cached cells and the runs' score caches."""
    outs = [s for s in bench.outs if s not in missing]
    units = [(e, i, s) for e in bench.entries for i in bench.ins if i not in missing for s in bench.seeds]
    bar = progress.bar(total=len(units) * (1 + len(outs)), desc="bench: score", unit="set")
    digests: dict = {}
    for entry, in_spec, seed in units:
        bar.set_postfix_str(f"{entry.label} on {in_spec}, seed {seed}")
        if entry.error:
            recorder.fail(entry, in_spec, seed, outs, entry.error)
            bar.update(1 + len(outs))
            continue
        run = model_run(entry, in_spec, seed, runs_dir, data_root) if entry.model else \
            trained[run_job(bench, entry, in_spec, seed)]
        if isinstance(run, str):
            recorder.fail(entry, in_spec, seed, outs, run)
            bar.update(1 + len(outs))
            continue
        if run.path not in digests:
            digests[run.path] = run.model.digest if entry.model else runs.file_digest(run.path / "detector.pt")
        with recorder.timed(f"score: {entry.label} on {in_spec}, seed {seed}"):
            score_unit(bench, entry, in_spec, seed, outs, run, digests[run.path], device, recorder, folder, bar)
    bar.close()


def score_unit(bench, entry, in_spec, seed, outs, run, digest, device, recorder, folder, bar) -> None:
    """One method on one run: the ID set once, then each OOD set; finished cells come from the cell cache."""
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
                          "run": str(run.path), "detector": digest, "options": options}
        record = recorder.cached(materials[out])
        needs_plot_scores = seed == bench.seeds[0] and not all(
            plot_scores_path(folder, entry, in_spec, s).is_file() for s in (in_spec, out))
        if record is None or needs_plot_scores:
            todo.append(out)
        else:
            recorder.from_cache += 1
            recorder.put(entry, in_spec, seed, out, record)
    bar.update(1 + len(outs) - len(todo))
    if not todo:
        return
    try:
        det = run.detector(entry.method, entry.score_overrides, device)
        tuned = tuning.tune(det) if entry.tune else {}
        id_scores = run.score(entry.method, in_spec, entry.limit, entry.score_overrides, detector=det)
    except Exception as e:  # noqa: BLE001
        recorder.fail(entry, in_spec, seed, todo, e)
        bar.update(len(todo))
        return
    if seed == bench.seeds[0]:
        save_plot_scores(plot_scores_path(folder, entry, in_spec, in_spec), id_scores)
    notes = row_notes(entry, det, id_scores)
    for out in todo:
        bar.set_postfix_str(f"{entry.label}: {in_spec} → {out}, seed {seed}")
        try:
            ood_scores = run.score(entry.method, out, entry.limit, entry.score_overrides, detector=det)
            rows = runs.metric_rows(id_scores, ood_scores, in_spec, out, bench.bootstrap, renamer(entry))
            if tuned:
                rows = [{**r, "tuned": tuned} for r in rows]
        except Exception as e:  # noqa: BLE001
            recorder.fail(entry, in_spec, seed, [out], e)
        else:
            record = {"status": "ok", "rows": rows, "run": str(run.path), "n_in": len_scores(id_scores),
                      "n_out": len_scores(ood_scores), "notes": notes}
            recorder.save(materials[out], record)
            recorder.put(entry, in_spec, seed, out, record)
            if seed == bench.seeds[0]:
                save_plot_scores(plot_scores_path(folder, entry, in_spec, out), ood_scores)
        bar.update(1)


def row_notes(entry: Entry, det, id_scores: dict) -> dict:
    """Caveats the report shows beside a method's rows, {row: [note]}: which layer plain `gradlayer` is, and a DDPM
    score made without LPIPS."""
    notes = {}
    if entry.method == "gradlayer" and "gradlayer" in id_scores:
        layer = next((k.split("/", 1)[1] for k in id_scores if k.startswith("gradlayer/")
                      and np.array_equal(id_scores[k], id_scores["gradlayer"])), "?")
        how = "gradlayer.layer" if det.options.get("layer") != "auto" else \
            f"chosen on validation vs {det.options.get('val_ood')}"
        notes["gradlayer"] = [f"layer {layer} ({how})"]
    if entry.method == "ddpm" and "_lpips" not in id_scores and (det.options.get("metrics") or "auto") == "auto":
        for row in (k for k in id_scores if k.startswith("ddpm-")):
            notes[row] = ["without LPIPS (its weights were not found): reconstruction MSE only; see docs/ddpm.md"]
    return {renamer(entry)(row): texts for row, texts in notes.items()}


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


def len_scores(arrays: dict) -> int:
    return len(next(v for k, v in arrays.items() if not k.startswith("_")))


def plot_scores_path(folder: Path, entry: Entry, in_spec: str, spec: str) -> Path:
    return folder / "scores" / runs.safe_name(in_spec) / runs.safe_name(entry.label) / f"{runs.safe_name(spec)}.npz"


def save_plot_scores(path: Path, arrays: dict) -> None:
    """The first seed's scores, kept in the report folder for the plots (float32, evaluated rows only)."""
    runs.save_npz(path, {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items() if not k.startswith("_")})


# ---------------------------------------------------------------------------------------------------- aggregation
def summarise(bench: Bench, cells: dict) -> dict:
    """{"per_seed": rows, "summary": rows}: per-set rows and group rows (plain means of per-set metrics)."""
    per_seed = []
    for (label, in_spec, seed, out), record in cells.items():
        if record["status"] == "ok":
            per_seed += [{**row, "seed": seed, "entry": label, "group": False} for row in record["rows"]]
    for group, specs in bench.groups.items():
        by_key: dict = {}
        for row in per_seed:
            if not row["group"] and row["out"] in specs:
                by_key.setdefault((row["entry"], row["method"], row["in"], row["seed"]), []).append(row)
        for (label, method, in_spec, seed), rows in by_key.items():
            mean = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
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
        for m in METRICS:
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


# ---------------------------------------------------------------------------------------------------- outputs
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


def write_report(bench, folder, recorder, summary, missing, plot_note, took: dict, device) -> None:
    from oodbench import report

    failed = failures(bench, recorder.cells)
    skipped = [{"dataset": spec, "reason": why} for spec, why in missing.items()]
    public = [{k: v for k, v in r.items() if k != "group"} | {"kind": "group" if r["group"] else "set"}
              for r in summary["summary"]]
    per_seed = [{k: v for k, v in r.items() if k not in ("group",)} for r in summary["per_seed"] if not r["group"]]
    notes = report_notes(bench, recorder.cells, summary["summary"])
    results = {"settings": bench.settings(), "timing": {**took, "device": str(device)}, "summary": public,
               "per_seed": per_seed, "notes": notes, "failed": failed, "skipped": skipped}
    runs.write_atomic(folder / "results.json", json.dumps(results, indent=2) + "\n")
    runs.write_atomic(folder / "results.csv", report.csv_rows(csv_ready(public, failed)))
    runs.write_atomic(folder / "results_per_seed.csv", report.csv_rows(csv_ready(per_seed, [])))
    if recorder.errors:
        runs.write_atomic(folder / "errors.log", "\n\n".join(recorder.errors) + "\n")
    elif (folder / "errors.log").is_file():
        (folder / "errors.log").unlink()
    text = markdown_report(bench, summary["summary"], failed, skipped, plot_note, took, device, folder, notes)
    runs.write_atomic(folder / "report.md", text)


def csv_ready(rows: list, failed: list) -> list:
    """Flat rows for CSV: intervals split into _lo/_hi, failed cells as rows with status failed and the error."""
    flat = []
    for r in rows:
        row = {"status": "ok"}
        for k, v in r.items():
            if k.endswith("_ci"):
                row[f"{k}_lo"], row[f"{k}_hi"] = v
            elif isinstance(v, list):
                row[k] = " ".join(map(str, v))
            else:
                row[k] = v
        flat.append(row)
    for f in failed:
        flat.append({"status": "failed", "method": f["method"], "in": f["in"], "out": f["out"],
                     "seeds": " ".join(map(str, f["seeds"])), "error": f["error"]})
    return flat


def pct(row: dict, metric: str, n_seeds: int) -> str:
    value = f"{100 * row[metric]:.2f}"
    return value + (f" ± {100 * row[metric + '_std']:.2f}" if n_seeds > 1 else "")


def markdown_report(bench, summary, failed, skipped, plot_note, took, device, folder, caveats=()) -> str:
    n_seeds = len(bench.seeds)
    lines = [f"# Benchmark report: {bench.name}", "",
             f"Config `{bench.path}`; {len(bench.entries)} method entries × {len(bench.ins)} in-distribution "
             f"set(s) × {len(bench.outs)} OOD set(s) × seeds {bench.seeds}; preset `{bench.preset}`; "
             f"test-set limit {bench.limit or 'none'}; device {device}; {describe_timing(took)}.", "",
             "Metrics in percent (higher = better, except FPR@95 and DetErr). OOD is the positive class; "
             "FPR@95 is the classic definition (OOD accepted at 95% ID TPR); see docs/metrics.md."
             + (f" Values are mean ± std over {n_seeds} seeds (numpy std, ddof=0)." if n_seeds > 1 else "")
             + (f" 95% CI: percentile bootstrap over the test sets ({bench.bootstrap} resamples)"
                + (", averaged over seeds." if n_seeds > 1 else ".") if bench.bootstrap else ""),
             ""]
    notes = []
    for s in skipped:
        notes.append(f"- **skipped** `{s['dataset']}` (not available): {s['reason']}")
    notes_failed = collapse(failed)
    foot: dict = {}
    for i, f in enumerate(notes_failed):
        for out in f["outs"]:
            foot.setdefault((f["method"], f["in"], out), []).append(str(i + 1))
    if failed:
        notes.append(f"- **{len(failed)} failed cell(s)** (method × OOD set), listed under Failures below; the rest "
                     f"completed; tracebacks of errors, if any, are in errors.log.")
    gone = {s["dataset"] for s in skipped}
    for group, specs in bench.groups.items():
        lost = [s for s in specs if s in gone]
        notes.append(f"- Group `{group}` = plain mean of the per-set metrics of {', '.join(specs)}"
                     + (f" (not available, left out: {', '.join(lost)})" if lost else "") + ".")
    tuned = {(r["entry"], json.dumps(r["tuned"])): r["tuned"] for r in summary if r.get("tuned")}
    for (label, _), choice in tuned.items():
        text = "; ".join(", ".join(f"{k}={v}" for k, v in c.items()) for c in
                         (choice if isinstance(choice, list) else [choice]))
        notes.append(f"- `{label}`: options chosen on validation data (--tune: ID validation split vs the "
                     f"training split of tune.val_ood): {text}.")
    if any(BELOW_CHANCE in n["note"] for n in caveats):
        notes.append(f"- A note `{BELOW_CHANCE} SET AUROC` marks a row that ranks that OOD set as more "
                     f"in-distribution than the ID test set (AUROC < 50%).")
    notes.append(f"- Plots: {plot_note}")
    lines += ["## Notes", ""] + notes + [""]
    for in_spec in bench.ins:
        lines += in_section(bench, in_spec, summary, failed, foot, skipped, folder,
                            {n["method"]: n["note"] for n in caveats if n["in"] == in_spec})
    if failed:
        lines += ["## Failures", ""]
        for i, f in enumerate(notes_failed):
            seeds = f" (seed{'s' if len(f['seeds']) > 1 else ''} {', '.join(map(str, f['seeds']))})"
            lines.append(f"{i + 1}. `{f['method']}` on {f['in']} → {', '.join(f['outs'])}{seeds}: {f['error']}")
        lines.append("")
    return "\n".join(lines)


def entry_rows(bench: Bench, summary: list, in_spec: str) -> list:
    """(entry label, row name) pairs in config order; an entry with no results gets one line under its label."""
    pairs = []
    for entry in bench.entries:
        names = list(dict.fromkeys(r["method"] for r in summary if r["entry"] == entry.label and r["in"] == in_spec))
        pairs += [(entry.label, n) for n in names] or [(entry.label, entry.label)]
    return pairs


def in_section(bench, in_spec, summary, failed, foot, skipped, folder, notes: dict) -> list:
    """The tables of one ID set; a `note` column holds the caveats of the rows that have one."""
    n_seeds = len(bench.seeds)
    if in_spec in {s["dataset"] for s in skipped}:
        return [f"## {in_spec} (in-distribution)", "", "Skipped: the dataset is not available (see Notes).", ""]
    present = [s for s in bench.outs if s not in {x["dataset"] for x in skipped}]
    columns = present + list(bench.groups)
    index = {(r["entry"], r["method"], r["out"]): r for r in summary if r["in"] == in_spec}
    lines = [f"## {in_spec} (in-distribution)", ""]
    for metric, title in (("auroc", "AUROC"), ("fpr95", "FPR@95")):
        lines += [f"### {title} (%)", "", "| method | " + " | ".join(columns) + (" | note |" if notes else " |"),
                  "|---|" + "---|" * (len(columns) + bool(notes))]
        for label, name in entry_rows(bench, summary, in_spec):
            cells = []
            for col in columns:
                row = index.get((label, name, col))
                cell = pct(row, metric, n_seeds) if row else "—"
                refs = [n for o in (bench.groups.get(col) or [col]) for n in foot.get((label, in_spec, o), [])]
                if refs:
                    cell = ("failed" if not row else cell) + f" [{','.join(refs)}]"
                elif row and len(row["seeds"]) < n_seeds:
                    cell += f" (seeds {row['seeds']})"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells + ([notes.get(name, "")] if notes else [])) + " |")
        lines.append("")
    lines += ["### All metrics (%)", "",
              "| method | out | " + " | ".join(t for _, t in TABLE_METRICS) + (" | AUROC 95% CI" if bench.bootstrap
                                                                               else "") + " |",
              "|---|---|" + "---|" * (len(TABLE_METRICS) + bool(bench.bootstrap))]
    for label, name in entry_rows(bench, summary, in_spec):
        for col in columns:
            row = index.get((label, name, col))
            if not row:
                continue
            cells = [pct(row, m, n_seeds) for m, _ in TABLE_METRICS]
            if bench.bootstrap:
                ci = row.get("auroc_ci")
                cells.append(f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else "")
            lines.append(f"| {name} | {col} | " + " | ".join(cells) + " |")
    lines.append("")
    images = sorted((folder / "plots").glob(f"*{runs.safe_name(in_spec)}*.png")) if (folder / "plots").is_dir() else []
    if images:
        lines += ["### Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in images] + [""]
    return lines


def make_plots(bench: Bench, cells: dict, summary: dict, folder: Path) -> str:
    """ROC curves per OOD set, ID-vs-OOD histograms per method, an AUROC heatmap; first seed. Returns a note."""
    plot_dir = folder / "plots"
    plot_dir.mkdir(exist_ok=True)
    for old in plot_dir.glob("*.png"):
        old.unlink()
    seed = bench.seeds[0]
    jobs = []
    for in_spec in bench.ins:
        outs = [o for o in bench.outs if any(cells.get((e.label, in_spec, seed, o), {}).get("status") == "ok"
                                             for e in bench.entries)]
        if outs:
            jobs.append(("heatmap", in_spec, None))
        jobs += [("roc", in_spec, o) for o in outs]
        jobs += [("hist", in_spec, e) for e in bench.entries]
    written = 0
    for what, in_spec, arg in progress.bar(jobs, desc="bench: plots", unit="plot"):
        tag = runs.safe_name(in_spec)
        if what == "heatmap":
            written += heatmap(bench, summary["summary"], in_spec, plot_dir / f"heatmap_auroc_{tag}.png")
        elif what == "roc":
            curves = {}
            for entry in bench.entries:
                if cells.get((entry.label, in_spec, seed, arg), {}).get("status") != "ok":
                    continue
                ids = load_plot_scores(plot_scores_path(folder, entry, in_spec, in_spec))
                oods = load_plot_scores(plot_scores_path(folder, entry, in_spec, arg))
                curves.update({renamer(entry)(r): (ids[r], oods[r]) for r in ids if r in oods})
            if curves:
                plots.roc_curves(curves, f"ROC: {in_spec} (ID) vs {arg} (OOD), seed {seed}",
                                 plot_dir / f"roc_{tag}_vs_{runs.safe_name(arg)}.png")
                written += 1
        else:
            entry = arg
            outs = [o for o in bench.outs if cells.get((entry.label, in_spec, seed, o), {}).get("status") == "ok"]
            ids = load_plot_scores(plot_scores_path(folder, entry, in_spec, in_spec))
            per_out = {o: load_plot_scores(plot_scores_path(folder, entry, in_spec, o)) for o in outs}
            for r in ids:
                name = renamer(entry)(r)
                plots.score_histograms(ids[r], {o: s[r] for o, s in per_out.items() if r in s},
                                       f"{name}: scores on {in_spec} (ID) and OOD sets, seed {seed}",
                                       plot_dir / f"hist_{tag}_{runs.safe_name(name)}.png")
                written += 1
    return f"{written} PNG file(s) in plots/ (first seed)."


def load_plot_scores(path: Path) -> dict:
    """The saved plot scores ({} when missing or damaged: that plot is left out)."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return {}


def heatmap(bench: Bench, summary: list, in_spec: str, path: Path) -> int:
    columns = [o for o in bench.outs] + list(bench.groups)
    pairs = entry_rows(bench, summary, in_spec)
    index = {(r["entry"], r["method"], r["out"]): r["auroc"] for r in summary if r["in"] == in_spec}
    values = np.array([[index.get((label, name, c), np.nan) for c in columns] for label, name in pairs])
    keep = ~np.all(np.isnan(values), axis=0)
    if not keep.any():
        return 0
    plots.auroc_heatmap(100 * values[:, keep], [n for _, n in pairs], [c for c, k in zip(columns, keep) if k],
                        f"AUROC (%), {in_spec} (ID), mean over seeds", path)
    return 1
