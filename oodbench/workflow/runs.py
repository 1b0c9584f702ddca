"""Runs: where a model, its in-distribution data and everything derived from them live.

A trained run is `runs/<kind>-<in>-s<seed>[-<name>]/` holding `config.yaml` (fully resolved), `meta.json`,
`checkpoints/`, `detector.pt`, `cache/`, `scores/<method>/<set>.npz`, `metrics.json`/`metrics.csv`, `log.jsonl`.
A `ModelRun` is a model oodbench did not train (`--model`, `oodbench.Evaluator`): `runs/model-<model>-<in>/` with
the same caches, or nothing on disk at all (`path=None`: everything stays in memory).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from oodbench import config as configs
from oodbench import data, detectors as registry, locks
from oodbench.data.overlap import check_overlap, image_hashes
from oodbench.data.split import per_class_sample
from oodbench.detectors.posthoc import PostHoc
from oodbench.engine import checkpoint, distributed, setup_device
from oodbench.errors import OODBenchError
from oodbench.workflow import fitting
from oodbench.workflow.fitting import Scoring
from oodbench.workflow.files import (check_limit, file_digest, merge_metrics, read_meta, read_npz, safe_name,
                                     save_npz, write_atomic)
from oodbench.workflow.scoring import score_cached


class RunCache:
    """Data derived while fitting and scoring, kept in a run's `cache/` between processes (main rank writes);
    `folder=None` keeps nothing."""

    def __init__(self, folder: Optional[Path]):
        self.folder = None if folder is None else Path(folder)

    def load_npz(self, name: str, key: str) -> Optional[dict]:
        return None if self.folder is None else read_npz(self.folder / name, "key", key)

    def save_npz(self, name: str, key: str, arrays: dict) -> None:
        if self.folder is not None and distributed.is_main():
            save_npz(self.folder / name, {**arrays, "key": np.array(key)})

    def load_json(self, name: str) -> dict:
        path = None if self.folder is None else self.folder / name
        try:
            value = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        except (ValueError, UnicodeDecodeError):
            return {}
        return value if isinstance(value, dict) else {}

    def save_json(self, name: str, value: dict) -> None:
        if self.folder is not None and distributed.is_main():
            write_atomic(self.folder / name, json.dumps(value, indent=2))

    def load_state(self, name: str, key: str) -> Optional[dict]:
        path = None if self.folder is None else self.folder / "fitted" / f"{name}-{key}.pt"
        if path is None or not path.is_file():
            return None
        try:
            return checkpoint.load(path)
        except OODBenchError:
            return None   # damaged: refitted

    def save_state(self, name: str, key: str, state: dict) -> None:
        if self.folder is not None and distributed.is_main():
            checkpoint.save_atomic(state, self.folder / "fitted" / f"{name}-{key}.pt")


class Run:
    """A trained run directory on disk."""

    def __init__(self, path, reused: bool = False):
        self.path = Path(path)
        self.reused = reused    # set by `train` when it found this run finished with the same config
        if not (self.path / "config.yaml").is_file():
            raise OODBenchError(f"{self.path} is not a run directory (no config.yaml); train one with "
                                f"`oodbench train --method M --in D` or pass the right --run")
        self.config = configs.read_yaml(self.path / "config.yaml")
        if not isinstance(self.config.get("data"), dict) or not self.config["data"].get("in"):
            raise OODBenchError(f"{self.path / 'config.yaml'} has no data.in (the in-distribution set): it is not "
                                f"the config oodbench wrote; restore it, or delete the run and retrain")
        self.meta = read_meta(self.path / "meta.json")
        self.kind = self.meta.get("kind") or self.path.name.split("-")[0]
        self._init_state()

    def _init_state(self) -> None:
        self.cache = RunCache(None if self.path is None else self.path / "cache")
        self._splits: dict = {}
        self._models: dict = {}
        self._tag: Optional[str] = None
        self.overlap: Optional[int] = None

    # -- identity -------------------------------------------------------------------------------------------------
    @property
    def trained(self) -> bool:
        return (self.path / "detector.pt").is_file()

    @property
    def tag(self) -> str:
        """A digest of what this run scores (its detector file); part of every cache key."""
        if self._tag is None:
            self._tag = file_digest(self.path / "detector.pt")
        return self._tag

    def in_distribution(self) -> str:
        return self.config["data"]["in"]

    # -- configs --------------------------------------------------------------------------------------------------
    def scoring_config(self, overrides: Iterable[str] = ()) -> dict:
        """The run's config with scoring `overrides` applied (training options are refused)."""
        schema, _ = configs.schema(self.kind, registry.option_sections(self.kind))
        cfg = json.loads(json.dumps(schema))  # options added since the run was trained keep their defaults
        configs.deep_update(cfg, self.config)
        for item in overrides:
            keys, _ = configs.parse_override(item)
            if registry.is_training(self.kind, ".".join(keys)):
                raise OODBenchError(f"--set {item}: {'.'.join(keys)} is a training setting of this run; train a new "
                                    f"run with it (oodbench train ... --set {item} --run-name NAME)")
            configs.apply_override(cfg, item, schema)
        return cfg

    # -- methods --------------------------------------------------------------------------------------------------
    def prepare(self, method, overrides: Iterable[str] = (), device="auto", seed: Optional[int] = None) -> Scoring:
        """`method` (a registered name or a post-hoc method object) fitted and ready to score this run."""
        device = setup_device(device)
        cfg = self.scoring_config(overrides)
        if isinstance(method, str):
            cls = registry.get(method)
            self.check_kind(cls, method)
            if issubclass(cls, PostHoc):
                det = registry.build(method, cfg)   # a combo:A+B's members from their own sections
            else:
                return Scoring(self.trainer(cls, cfg, device), cfg, self.tag, method)
        elif isinstance(method, PostHoc):
            det = method
        else:
            raise OODBenchError(f"a method is a name (see `oodbench methods`) or a post-hoc method object "
                                f"(oodbench.method(...) or your own PostHoc subclass), got {type(method).__name__}")
        return fitting.fit(self, det, cfg, device)

    def check_kind(self, cls, method: str) -> None:
        if cls.kind != self.kind:
            raise OODBenchError(f"method {method!r} scores {cls.kind!r} runs but {self.path} is a {self.kind!r} run")
        if not self.trained:
            raise OODBenchError(f"{self.path} has no fitted detector yet (training unfinished?); run "
                                f"`oodbench train ... --resume` to finish it")

    def trainer(self, cls, cfg: dict, device):
        """The run's trained detector (its networks from detector.pt), ready to score."""
        trainer = registry.trainer_for(cls)(cfg, device)
        try:
            state = checkpoint.load(self.path / "detector.pt", trainer.device)
        except OODBenchError as e:
            raise OODBenchError(f"{self.path / 'detector.pt'} is corrupt or truncated (it does not verify); the "
                                f"`oodbench train` command that made this run refits it from its checkpoints") from e
        trainer.load_state_dict(state)
        if trainer.needs_training_images:
            trainer.use_training_images(self.fit_splits(cfg, trainer.device)[0])
        return trainer

    def model(self, device):
        """The classifier that this run's post-hoc methods score (a ClassifierModel)."""
        key = str(device)
        if key not in self._models:
            cfg = self.scoring_config()
            self._models[key] = self.trainer(registry.TRAINERS[self.kind], cfg, device).model()
        return self._models[key]

    # -- data -----------------------------------------------------------------------------------------------------
    def fit_splits(self, cfg: dict, device) -> tuple:
        """(train, val) of the ID data the run's statistics are fitted on: re-derived as training made them."""
        key = str(device)
        if key not in self._splits:
            self._splits[key] = data.run_split(cfg, device)
        return self._splits[key]

    def load_set(self, spec, split: str = "test", limit: Optional[int] = None, device="cpu", stream="auto",
                 decode="auto"):
        """`spec` as this run scores it: converted to its input shape; `stream` and `decode` are the scoring config's
        data.stream and data.decode."""
        shape = tuple(self.meta["shape"]) if "shape" in self.meta else None
        d = self.config["data"]
        return data.load(spec, split=split, root=d.get("root"), device=device, like=shape,
                         stream=stream, decode_to=d.get("decode_to"), crop_resize=d.get("crop_resize"),
                         decode=decode).head(limit)

    def scored_set(self, spec, scoring_or_cfg, limit: Optional[int] = None, device=None):
        """`spec` as a method scores it: on its device, streamed and decoded as its data.stream / data.decode say."""
        cfg = scoring_or_cfg.cfg if isinstance(scoring_or_cfg, Scoring) else scoring_or_cfg
        if device is None:
            device = scoring_or_cfg.det.device if isinstance(scoring_or_cfg, Scoring) else "cpu"
        d = cfg["data"]
        return self.load_set(spec, limit=limit, device=device, stream=d.get("stream", "auto"),
                             decode=d.get("decode", "auto"))

    def check_overlap(self, cfg: dict, device) -> int:
        """Refuse an ID test set that shares images with the fit split (a handful of exact duplicates is a warning);
        the count is recorded in the metrics rows."""
        if self.overlap is None:
            train, val = self.fit_splits(cfg, device)
            test = self.scored_set(self.in_distribution(), cfg, device=device)
            parts = [s for s in (train, val) if s is not None and len(s)]
            if all(hasattr(s, "paths") for s in [*parts, test]):   # streamed files: the same file, the same image
                paths = {p for s in parts for p in s.paths}
                count = sum(p in paths for p in test.paths)
            elif parts and tuple(test.shape) == tuple(parts[0].shape):
                fitted = np.concatenate([image_hashes(s) for s in parts])
                count = int(np.isin(image_hashes(test), fitted).sum())
            else:
                count = 0   # the model fits on images of another shape than it is tested on: none can be the same
            fit_name = cfg["data"].get("fit") or f"{self.id_name()} (training split)"
            self.overlap = check_overlap(parts[0] if parts else test, test, fit_name, self.id_name(), count=count)
        return self.overlap

    def id_name(self) -> str:
        return str(self.in_distribution())

    # -- scores and metrics ---------------------------------------------------------------------------------------
    def score(self, scoring: Scoring, spec, limit: Optional[int] = None, batch_size: int = 256) -> dict:
        """Scores of a prepared method on dataset `spec` ({row: (N,) array, '_extra': array}), cached in scores/."""
        return score_cached(self, scoring, spec, limit, batch_size)

    def score_path(self, scoring: Scoring, spec) -> Optional[Path]:
        return self.path / "scores" / safe_name(scoring.name) / f"{safe_name(spec)}.npz"

    def update_metrics(self, rows: list) -> None:
        """Merge rows into metrics.json / metrics.csv (under the run's lock: concurrent evaluations keep all rows)."""
        with locks.FileLock(self.path.with_name(f".{self.path.name}.metrics.lock")):
            merge_metrics(self.path, rows)


def check_model_takes(model, shape, in_spec: str) -> None:
    """One forward of a blank image of the ID set's `shape`, before any work: a model that cannot take the set's
    images (a ViT given 8x8 inputs, a 1-channel net given RGB) is a one-line error, not a traceback mid-run."""
    blank = torch.zeros((1, *shape), dtype=torch.uint8)
    net = model.net
    training = net.training
    try:
        net.eval()
        with torch.no_grad():   # logits only for a model without a features/head split (torchscript)
            forward = model.features_and_logits if model.head is not None else model.logits
            forward(blank.to(next(net.parameters(), blank).device))
    except OODBenchError:
        raise
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # noqa: BLE001 - the user's forward may raise anything
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OODBenchError(f"model {model.name} cannot score {in_spec}'s images (prepared from {tuple(shape)}): "
                            f"{first}; give the model its input size (weights with a preprocessing size, or "
                            f"size=/resize= in oodbench.load_model/wrap)") from None
    finally:
        net.train(training)


def runs_root(runs_dir=None) -> Path:
    """The folder of runs: `runs_dir`, else $OODBENCH_RUNS, else ./runs (an empty name or a file is an error)."""
    if runs_dir is not None and not str(runs_dir).strip():
        raise OODBenchError("--runs-dir '': give a folder name (or leave the option out for ./runs)")
    root = Path(runs_dir if runs_dir is not None else (os.environ.get("OODBENCH_RUNS") or "runs"))
    if root.exists() and not root.is_dir():
        raise OODBenchError(f"--runs-dir {root} is a file, not a folder; name a folder for the runs")
    return root


class ModelRun(Run):
    """Post-hoc classifier methods on a model that oodbench did not train (`--model SPEC`, `oodbench.Evaluator`).

    The in-distribution data is a dataset spec (`in_spec`: statistics are fitted on its training split, the test
    split is scored) or anything `data.as_imageset` takes: `fit` (the images statistics are fitted on; `val` the
    validation split, else a seeded `data.val_fraction` of `fit`) and `id_test`. `fit_limit`: a seeded,
    class-balanced sample of the fit set. `runs_dir=False` keeps everything in memory and writes nothing.
    """

    def __init__(self, model, in_spec=None, label: Optional[str] = None, fit_limit: Optional[int] = None,
                 runs_dir=None, data_root=None, seed: int = 0, fit=None, val=None, id_test=None,
                 fit_spec: Optional[str] = None):
        check_limit(fit_limit, "--fit-limit")
        self.model_, self.kind, self.reused = model, "classifier", False
        label = label or model.name
        if in_spec is None and id_test is None:
            raise OODBenchError("give the in-distribution data: in_dataset='cifar10' (a dataset spec) or id_test= "
                                "(your test images)")
        if in_spec is not None and not isinstance(in_spec, str):
            id_test, in_spec = in_spec, None
        if fit is None and in_spec is None and fit_spec is None:
            raise OODBenchError("the statistics need in-distribution training images: pass fit= (your training "
                                "images) or name a dataset (in_dataset=..., --fit-data SPEC)")
        # Image folders and lists are decoded straight to the model's input (its resize + centre crop); in-memory
        # sets keep their size and the model prepares each batch.
        decode_to = (model.channels or 3, *model.size) if model.size else None
        crop = model.resize if model.size else None
        d = {"in": in_spec, "root": data_root, "limit": fit_limit, "sample": "per_class", "decode_to": decode_to,
             "crop_resize": crop}
        if fit_spec:
            d["fit"] = fit_spec
            data.check_spec(fit_spec)
        self._id_test = self._given(id_test, "in-distribution test set") if id_test is not None else \
            data.load(in_spec, split="test", root=data_root, decode_to=decode_to, crop_resize=crop)
        self._fit = None if fit is None else (self._given(fit, "fit set"),
                                             None if val is None else self._given(val, "validation set"))
        self._given_test = in_spec is None   # the user's own images: no spec to load them again from
        self._name = in_spec or getattr(self._id_test, "name", "id")
        self.config = {"seed": seed, "data": {**d, "in": in_spec or self._name}}
        # keyed by the weights' digest too: two models whose specs share a name get their own folders
        folder = f"model-{safe_name(label)}-{model.digest[:8]}-{safe_name(self._name)}"
        self.path = None if runs_dir is False else runs_root(runs_dir) / folder
        self.meta = {"kind": "classifier", "model": label, "in": self._name, "shape": list(self._id_test.shape)}
        check_model_takes(model, self._id_test.shape, self._name)
        self._init_state()
        self._tag = f"{model.digest}-fit{fit_limit}-{fit_spec or ''}" + \
            ("" if self._fit is None else "-" + "-".join(s.fingerprint for s in self._fit if s is not None))

    @staticmethod
    def _given(obj, what: str):
        if isinstance(obj, str):
            return data.load(obj, split="test")
        return data.as_imageset(obj, name=getattr(obj, "name", None) or what)

    @property
    def trained(self) -> bool:
        return True

    def id_name(self) -> str:
        return self._name

    def check_kind(self, cls, method: str) -> None:
        if cls.kind != "classifier" or not issubclass(cls, PostHoc):
            raise OODBenchError(f"method {method!r} trains its own {cls.kind!r} model; --model takes classifier "
                                f"methods (msp, energy, knn, ...; see `oodbench methods`)")

    def model(self, device):
        return self.model_.to(device)

    def fit_splits(self, cfg: dict, device) -> tuple:
        key = str(device)
        if key not in self._splits:
            if self._fit is None:
                self._splits[key] = data.run_split(cfg, device)
            else:
                fit, val = self._fit
                fit = per_class_sample(fit, cfg["data"].get("limit"), cfg["seed"]) if hasattr(fit, "images") else fit
                if val is None and hasattr(fit, "images"):
                    fit, val = data.train_val_split(fit, cfg["data"]["val_fraction"], cfg["seed"])
                self._splits[key] = (fit.to(device), None if val is None else val.to(device))
        return self._splits[key]

    def load_set(self, spec, split: str = "test", limit: Optional[int] = None, device="cpu", stream="auto",
                 decode="auto"):
        as_loaded = data.stream_choice(stream) == "auto" and data.decode_choice(decode) == "auto"
        if not isinstance(spec, str):
            return data.as_imageset(spec, device=device).head(limit)
        if spec == self._name and split == "test" and (as_loaded or self._given_test):   # given data: as it is
            return self._id_test.head(limit).to(device)
        return super().load_set(spec, split, limit, device, stream, decode)

    def score_path(self, scoring: Scoring, spec) -> Optional[Path]:
        if self.path is None:
            return None
        name = spec if isinstance(spec, str) else getattr(spec, "name", "data")
        return super().score_path(scoring, name)

    def update_metrics(self, rows: list) -> None:
        if self.path is not None:
            super().update_metrics(rows)
