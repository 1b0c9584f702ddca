"""The bench YAML (`Bench`, its method `Entry`s and `executor:` section) and the work it plans: the trained runs
(`RunJob`) and the scoring units (method × ID set × seed) of the grid. The format is in docs/bench.md."""
from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from oodbench import config as configs
from oodbench import protocols
from oodbench import detectors as registry
from oodbench import joint_metrics
from oodbench.errors import OODBenchError, check_seed

BENCH_KEYS = ("name", "report", "preset", "seeds", "in", "out", "limit", "bootstrap", "train_overrides", "run_name",
              "plots", "methods", "tune", "joint", "csid", "executor", "recipes")
RECIPE_KEYS = ("recipe", "label", "overrides")
ENTRY_KEYS = ("method", "label", "preset", "overrides", "limit", "model", "fit_limit", "tune")
MODEL_KEYS = ("model.mean", "model.std", "model.size", "model.head", "model.layers",   # of an entry with `model:`
              "clip.names", "clip.templates", "clip.logit_scale")                    # (clip.*: docs/clip.md)
EXECUTORS = ("sequential", "local", "slurm")
EXECUTOR_KEYS = ("name", "jobs", "partition", "gpus", "cpus", "time", "sbatch", "folder")


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
    model_overrides: list = field(default_factory=list)   # model.mean/std/size/head/layers of the `model:` spec
    recipe: Optional[str] = None    # the `recipes:` item (its label) whose run this entry scores; None: not a recipe row
    base_label: str = ""            # the label of the `methods:` entry this one copies (recipe rows)
    recipe_overrides: list = field(default_factory=list)  # train.recipe=NAME and the item's own options


@dataclass
class ExecutorOptions:
    """How the grid's jobs run (the YAML's `executor:` section; `oodbench bench --executor ...` options win)."""
    name: str = "sequential"        # sequential | local | slurm
    jobs: Optional[int] = None      # local: worker processes (default: the CPU count); slurm: jobs at once
    partition: Optional[str] = None
    gpus: int = 0                   # per job; a training with gpus > 1 is one DDP job with a task per GPU
    cpus: Optional[int] = None      # per job (per task)
    time: int = 60                  # time limit of a job, minutes
    sbatch: tuple = ()              # extra sbatch flags, e.g. ("--qos=high", "--account=lab")
    folder: Optional[str] = None    # submitit's job folder (default: <report>/slurm)

    def updated(self, given: dict, where: str = "oodbench bench") -> "ExecutorOptions":
        """These options with the values of `given` that are not None (checked as the YAML's are)."""
        raw = {**self.__dict__, **{k: v for k, v in given.items() if v is not None and v != ()}}
        return executor_options(raw, where)


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
    joint: bool = False         # add the joint metrics (OSCR, CCR@FPR, AUTC, AURC, ECE, ...) to every row
    csid: dict = field(default_factory=dict)   # ID set -> its covariate-shifted ID sets (FS-OOD rows, fs_*)
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)
    recipes: list = field(default_factory=list)   # labels of the `recipes:` items, in order ([] = no recipes key)

    def settings(self) -> dict:
        return {"name": self.name, "config": str(self.path), "preset": self.preset, "seeds": self.seeds,
                "in": self.ins, "out": self.outs, "groups": self.groups, "limit": self.limit,
                "bootstrap": self.bootstrap, "train_overrides": self.train_overrides, "run_name": self.run_name,
                "methods": [e.label for e in self.entries],
                "limits": {e.label: e.limit for e in self.entries if e.limit != self.limit},
                **({"joint": True} if self.joint else {}),
                **({"csid": self.csid} if self.csid else {}),
                **({"recipes": self.recipes} if self.recipes else {})}

    def run_jobs(self, missing: dict) -> dict:
        """{RunJob: method that trains it} for every run the grid needs on the sets that are on disk."""
        jobs: dict = {}
        for entry in self.entries:
            if entry.error or entry.model:
                continue
            for in_spec in (i for i in self.ins if i not in missing):
                for seed in self.seeds:
                    jobs.setdefault(run_job(self, entry, in_spec, seed), entry.method)
        return jobs

    def units(self, missing: dict) -> list:
        """The scoring units (entry, ID set, seed) on the sets that are on disk, in report order."""
        return [(e, i, s) for e in self.entries for i in self.ins if i not in missing for s in self.seeds]


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
    for seed in seeds:
        check_seed(seed, f"{where}: seeds")
    if len(set(seeds)) < len(seeds):
        raise OODBenchError(f"{where}: seeds {seeds} lists a seed twice; a mean over seeds needs distinct seeds")
    name = str(raw.get("name") or path.stem)
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise OODBenchError(f"{where}: name {name!r} must be a plain name (no / or ..); the report goes to "
                            f"reports/<name> (use `report:` or --out for another folder)")
    bench = Bench(path=path, name=name, report=Path(raw.get("report") or f"reports/{name}"),
                  preset=raw.get("preset"), seeds=seeds, ins=ins, outs=outs, groups=groups,
                  limit=_limit(raw.get("limit"), where), bootstrap=_count(raw.get("bootstrap", 0), where),
                  train_overrides=_train_overrides(raw.get("train_overrides"), where),
                  run_name=raw.get("run_name"), plots=bool(raw.get("plots", True)))
    bench.tune = _flag(raw.get("tune", False), f"{where}: tune")
    bench.executor = executor_options(raw.get("executor") or {}, f"{where}: executor")
    bench.joint = _flag(raw.get("joint", False), f"{where}: joint")
    bench.csid = _csid(raw.get("csid"), ins, outs, where)
    bench.entries = [_entry(item, bench, where) for item in raw["methods"]]
    if raw.get("recipes") is not None:
        bench.entries = _recipe_entries(raw["recipes"], bench, where)
    if bench.joint:   # before any work: every method must give class predictions
        for e in bench.entries:
            if not e.error and not issubclass(registry.REGISTRY[e.method], registry.PostHoc):
                joint_metrics.require_predictions(f"{where}: method {e.method}", False, True)
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


def _csid(value, ins: list, outs: list, where: str) -> dict:
    """{ID set: [csID specs]}: a list applies to every ID set, a mapping names the ID set of each list."""
    if value is None or value == [] or value == {}:
        return {}
    if isinstance(value, dict):
        unknown = [k for k in value if k not in ins]
        if unknown:
            raise OODBenchError(f"{where}: csid.{unknown[0]} is not one of the `in` sets ({', '.join(ins)})")
        found = {str(k): _spec_list(v, f"{where}: csid.{k}") for k, v in value.items()}
    else:
        specs = _spec_list(value, f"{where}: csid")
        found = {i: specs for i in ins}
    for in_spec, specs in found.items():
        for spec in specs:
            data_check(spec, f"{where}: csid")
            if spec in outs or spec == in_spec:
                raise OODBenchError(f"{where}: csid set {spec} is also {'an OOD set' if spec in outs else 'the ID set'}"
                                    f"; a csID set is the ID classes under covariate shift, named once")
    return found


def data_check(spec: str, where: str) -> None:
    from oodbench import data

    try:
        data.check_spec(spec)
    except OODBenchError as e:
        raise OODBenchError(f"{where}: {e}") from None


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
        kinds = sorted({c.kind for c in registry.REGISTRY.values()} | set(registry.TRAINERS) | {"all"})
        for k in value:
            if str(k) not in kinds:
                close = difflib.get_close_matches(str(k), kinds, n=1)
                raise OODBenchError(f"{where}: train_overrides.{k}: unknown run kind"
                                    + (f"; did you mean {close[0]!r}?" if close else "") + f" (kinds: {', '.join(kinds)})")
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
    model_overrides = []
    if item.get("model") is not None:   # model.mean=... etc. set how the `model:` spec is loaded (as eval's --set)
        model_overrides = [o for o in overrides if o.split("=", 1)[0].strip().split(".")[0] in ("model", "clip")]
        overrides = [o for o in overrides if o not in model_overrides]
        bad = [o for o in model_overrides if o.split("=", 1)[0].strip() not in MODEL_KEYS]
        if bad:
            raise OODBenchError(f"{where}: method {item['method']} overrides {bad[0]}: with `model:`, the model "
                                f"options are {', '.join(MODEL_KEYS)}")
    try:
        kind = registry.get(item["method"]).kind
    except OODBenchError:
        kind = ""   # the entry's cells fail with the unknown-method error below
    training = [o for o in overrides if registry.is_training(kind, o.split("=", 1)[0].strip())]
    entry = Entry(method=item["method"], label=str(item.get("label") or item["method"]),
                  preset=item.get("preset", bench.preset), train_overrides=training,
                  score_overrides=[o for o in overrides if o not in training],
                  limit=_limit(item.get("limit", bench.limit), f"{where}: method {item['method']}"),
                  model=item.get("model"), fit_limit=_limit(item.get("fit_limit"), f"{where}: fit_limit"),
                  tune=_flag(item.get("tune", bench.tune), f"{where}: method {item['method']} tune"),
                  model_overrides=model_overrides)
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


def _recipe_entries(value, bench: Bench, where: str) -> list:
    """The entries with `recipes:`: each classifier method of `methods` once per recipe item (recipe-major, in
    config order; the item's label prefixes the rows, `plain` keeps the default run and names), then the other
    entries. Each recipe's config is checked here, before any work (unknown recipe or option, missing outliers)."""
    from oodbench.detectors.recipes import get_recipe, recipe_from_config

    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise OODBenchError(f"{where}: recipes must be a list of recipe names or {{recipe: NAME, label: ..., "
                            f"overrides: [...]}} items (docs/recipes.md), got {value!r}")
    setting = [o for o in bench.train_overrides.get("all", []) + bench.train_overrides.get("classifier", [])]
    setting += [o for e in bench.entries for o in e.train_overrides]
    if any(o.split("=", 1)[0].strip() == "train.recipe" for o in setting):
        raise OODBenchError(f"{where}: train.recipe is set in train_overrides or a method's overrides and the "
                            f"bench has `recipes:`; name every recipe in `recipes:` only")
    scored = [e for e in bench.entries if e.kind == "classifier" and not e.model and not e.error]
    if not scored:
        raise OODBenchError(f"{where}: `recipes:` needs at least one classifier method in `methods` (msp, energy, "
                            f"knn, ...) to score each recipe's run")
    expanded, labels = [], []
    for item in items:
        item = {"recipe": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or not isinstance(item.get("recipe"), str):
            raise OODBenchError(f"{where}: each recipes item is a recipe name or a mapping with `recipe:`, "
                                f"got {item!r}")
        _check_keys(item, RECIPE_KEYS, f"{where}: recipe {item['recipe']}")
        name, label = item["recipe"], str(item.get("label") or item["recipe"])
        here = f"{where}: recipe {label}"
        try:
            get_recipe(name)
        except OODBenchError as e:
            raise OODBenchError(f"{here}: {e}") from None
        overrides = _overrides(item.get("overrides"), f"{here} overrides")
        wrong = [o for o in overrides if not registry.is_training("classifier", o.split("=", 1)[0].strip())
                 or o.split("=", 1)[0].strip() == "train.recipe"]
        if wrong:
            raise OODBenchError(f"{here}: overrides {wrong[0]} is not a training option of the classifier (the "
                                f"recipe's own options, e.g. {name}.OPTION=..., or train./model./data. keys)")
        if label in labels:
            raise OODBenchError(f"{where}: recipes lists {label} twice; give one of them a `label:`")
        if label == "plain" and (name != "plain" or overrides):
            raise OODBenchError(f"{here}: the label plain is the plain classifier's default run; give this item "
                                f"another `label:`")
        if not label.replace("_", "").replace("-", "").isalnum():
            raise OODBenchError(f"{here}: a recipe label is a plain name (letters, digits, _ and -); it names the "
                                f"run folder and prefixes the rows")
        labels.append(label)
        own = [f"train.recipe={name}"] + overrides
        try:   # the run's config as training resolves it: bad options and missing outliers stop here
            cfg = configs.load_config("classifier", bench.preset, setting + own,
                                      sections=registry.option_sections("classifier"))
            recipe_from_config(cfg)
            for key, spec in registry.datasets_named("classifier", cfg).items():
                data_check(spec, f"{key}")
        except OODBenchError as e:
            raise OODBenchError(f"{here}: {e}") from None
        for e in scored:
            expanded.append(e if label == "plain" else
                            Entry(**{**e.__dict__, "label": f"{label}:{e.label}"}))
            expanded[-1].recipe, expanded[-1].base_label = label, e.label
            expanded[-1].recipe_overrides = [] if label == "plain" else own
    bench.recipes = labels
    return expanded + [e for e in bench.entries if e not in scored]


def executor_options(raw, where: str) -> ExecutorOptions:
    """Checked executor options from a mapping (the YAML's `executor:` section, or CLI values)."""
    if not isinstance(raw, dict):
        raise OODBenchError(f"{where} must be a mapping (name, jobs, partition, gpus, cpus, time, sbatch), "
                            f"got {raw!r}")
    _check_keys(raw, EXECUTOR_KEYS, where)
    name = raw.get("name", "sequential")
    if name not in EXECUTORS:
        raise OODBenchError(f"{where}: executor {name!r} is not one of {', '.join(EXECUTORS)}")
    for key in ("jobs", "cpus"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise OODBenchError(f"{where}: {key} must be a positive integer, got {value!r}")
    gpus = raw.get("gpus", 0)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise OODBenchError(f"{where}: gpus must be a number of GPUs per job >= 0, got {gpus!r}")
    partition, folder = raw.get("partition"), raw.get("folder")
    for key, value in (("partition", partition), ("folder", folder)):
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise OODBenchError(f"{where}: {key} must be a name, got {value!r}")
    sbatch = raw.get("sbatch") or ()
    sbatch = (sbatch,) if isinstance(sbatch, str) else tuple(sbatch)
    for flag in sbatch:
        sbatch_flag(flag, where)
    return ExecutorOptions(name=name, jobs=raw.get("jobs"), partition=partition, gpus=gpus, cpus=raw.get("cpus"),
                           time=minutes(raw.get("time", 60), where), sbatch=sbatch, folder=folder)


def minutes(value, where: str) -> int:
    """A time limit as whole minutes: a number of minutes, or `H:MM:SS` / `D-HH:MM:SS` as sbatch writes it."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        days, _, clock = value.strip().rpartition("-")
        parts = clock.split(":")
        if (not days or days.isdigit()) and len(parts) == 3 and all(p.isdigit() for p in parts):
            h, m, s = map(int, parts)
            total = int(days or 0) * 1440 + h * 60 + m + (s > 0)
            if total >= 1:
                return total
    raise OODBenchError(f"{where}: time must be minutes (e.g. 120) or H:MM:SS / D-HH:MM:SS, got {value!r}")


def sbatch_flag(flag, where: str = "--sbatch") -> tuple:
    """`--qos=high` → ("qos", "high"); `--exclusive` → ("exclusive", True)."""
    if not isinstance(flag, str) or not flag.startswith("--") or len(flag) < 3 or " " in flag.split("=", 1)[0]:
        raise OODBenchError(f"{where}: an sbatch flag is written --name or --name=value (e.g. --qos=high), "
                            f"got {flag!r}")
    key, eq, value = flag[2:].partition("=")
    return key, (value if eq else True)


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
    overrides = overrides + list(entry.recipe_overrides)
    own = list(entry.train_overrides) + ([f"preset={entry.preset}"] if entry.preset != bench.preset else [])
    name = bench.run_name
    if entry.recipe_overrides:   # a recipe's run is named after its item, as `oodbench train --method NAME` does
        name = f"{name}-{entry.recipe}" if name else entry.recipe
    if own:  # this method's own training settings get their own run folder
        suffix = hashlib.sha1("\n".join(own).encode()).hexdigest()[:6]
        name = f"{name}-{suffix}" if name else suffix
    return RunJob(entry.kind, in_spec, seed, entry.preset, tuple(overrides + entry.train_overrides), name)


class TaskFailed:
    """What an executor returns for a task that gave no result (its worker died, its job failed)."""

    def __init__(self, message: str):
        self.message = message


def renamer(entry: Entry):
    """Row names carry the entry's label when it has one (odin → odin_t1; msma_gmm → msma-big_gmm); a recipe row
    the recipe's label before the base entry's name (logitnorm:msp, logitnorm:odin_t1)."""
    if entry.recipe_overrides:
        base = renamer(Entry(**{**entry.__dict__, "label": entry.base_label, "recipe_overrides": []}))
        return lambda row: f"{entry.recipe}:{base(row)}"
    if entry.label == entry.method:
        return lambda row: row
    return lambda row: entry.label + row[len(entry.method):] if row.startswith(entry.method) else \
        f"{entry.label}:{row}"

