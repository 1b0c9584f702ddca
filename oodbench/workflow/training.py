"""Training a run: the config resolved and checked before anything is written, one process training a run at a
time (locks.py), the detector file written atomically and read back, its artifacts (e.g. llr's selection table)
written by the workflow, never by the detector."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch

from oodbench import config as configs
from oodbench import data, detectors as registry, locks
from oodbench.detectors.recipes import RECIPES
from oodbench.engine import Engine, TrainSpec, checkpoint, distributed
from oodbench.errors import OODBenchError, check_seed
from oodbench.workflow.evaluation import check_dataset_options
from oodbench.workflow.files import check_limit, read_meta, write_atomic
from oodbench.workflow.lookup import default_run_dir
from oodbench.workflow.runs import Run


def train(method: str, in_spec: Optional[str] = None, preset: Optional[str] = None, overrides: Iterable[str] = (),
          seed: Optional[int] = None, runs_dir=None, run_name: Optional[str] = None, data_root=None,
          device="auto", resume: bool = False) -> Run:
    """Train (or finish training) the run that `method` scores; returns the Run. Never overwrites another config.

    `method` may name a training recipe (logitnorm, outlier_exposure, ...): the classifier trained with it (as
    `--set train.recipe=NAME`), in the run folder named after the recipe unless `run_name` is given."""
    overrides = list(overrides)
    if method in RECIPES and method not in registry.REGISTRY:
        for item in overrides:
            keys, value = configs.parse_override(item)
            if keys == ["train", "recipe"] and value != method:
                raise OODBenchError(f"--method {method} trains recipe {method}, --set {item} another; give one")
        overrides.insert(0, f"train.recipe={method}")
        run_name = run_name or (None if method == "plain" else method)
        method = "msp"
    cls = registry.get(method)
    if in_spec:
        overrides.append(f"data.in={in_spec}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    if data_root:
        overrides.append(f"data.root={data_root}")
    cfg = configs.load_config(cls.kind, preset, overrides, sections=registry.option_sections(cls.kind))
    check_training_config(cls.kind, cfg)
    check_seed(cfg["seed"], "seed" if seed is None else "--seed")
    run_dir = default_run_dir(cls.kind, cfg["data"]["in"], cfg["seed"], runs_dir, run_name)
    existing = run_dir / "config.yaml"

    def write_config():   # called by the engine before its first write: nothing is written before validation
        for folder in [run_dir, *(p for p in run_dir.rglob("*") if p.is_dir())]:
            checkpoint.clean_stale_temporaries(folder)   # left by a killed earlier process
        if not existing.is_file():
            write_atomic(existing, configs.dump(cfg))

    engine = Engine(run_dir, device, cfg["seed"], resume=resume, config=cfg, begin=write_config)
    train_set, val_set = data.run_split(cfg, engine.device)  # before anything is written: bad data leaves no run
    # One process trains a run at a time (bench workers, SLURM jobs, other hosts; oodbench/locks.py); under
    # torchrun the main rank holds the lock and the others wait for it at the barrier.
    with locks.FileLock(run_dir.with_name(f".{run_dir.name}.lock")) if engine.is_main else contextlib.nullcontext():
        distributed.barrier(engine.world_size)
        if existing.is_file():
            old = configs.read_yaml(existing)
            diff = differing_keys(old, cfg)
            if diff:
                raise OODBenchError(f"{run_dir} exists with a different config ({', '.join(diff[:4])}); give this one "
                                    f"its own --run-name, or delete that folder to retrain")
            if finished(run_dir):
                return Run(run_dir, reused=True)
        det = registry.trainer_for(cls)(cfg, engine.device)
        det.train(train_set, val_set, engine)
        if engine.is_main:
            engine.begin()   # a detector that trained no network here (oe.from_run) still gets its config
            meta = {"kind": cls.kind, "method": method, "in": cfg["data"]["in"], "shape": list(train_set.shape),
                    "train_size": len(train_set), "val_size": len(val_set), "torch": torch.__version__,
                    "threads": torch.get_num_threads()}   # CPU results move at float level with the thread count
            write_atomic(run_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
            checkpoint.save_atomic(det.state_dict(), run_dir / "detector.pt")
            checkpoint.load(run_dir / "detector.pt")   # success is reported only for a detector file that loads back
            for name, text in det.artifacts().items():   # e.g. llr_selection.csv: the detector writes no files
                write_atomic(run_dir / name, text)
        distributed.barrier(engine.world_size)
        return Run(run_dir)


def check_training_config(kind: str, cfg: dict) -> None:
    """Training settings that fail only late (or silently) otherwise, checked before any data or file is touched."""
    TrainSpec.from_cfg(cfg["train"])
    check_limit(cfg["data"].get("limit"), "data.limit")
    fraction = cfg["data"].get("val_fraction")
    if fraction is not None and not 0 <= fraction < 1:
        raise OODBenchError(f"data.val_fraction must be in [0, 1), got {fraction!r}")
    check_dataset_options(kind, cfg)
    checks = dict.fromkeys(getattr(c, "check_config", None) for c in registry.kind_classes(kind))  # train.recipe..
    for check in filter(None, checks):
        check(cfg)


def finished(run_dir: Path) -> bool:
    """Whether the run's detector file and meta.json read back; a corrupt one is refitted from the checkpoints."""
    if not (run_dir / "detector.pt").is_file():
        return False
    try:
        checkpoint.load(run_dir / "detector.pt")
        read_meta(run_dir / "meta.json")
    except OODBenchError as e:
        print(f"oodbench: warning: {str(e).split(';')[0]}; refitting the detector from the run's "
              f"checkpoints", file=sys.stderr)
        return False
    return True


def differing_keys(a: dict, b: dict, prefix: str = "") -> list:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += differing_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}: {va!r} → {vb!r}")
    return keys
