"""Run directories and the train → score → evaluate workflow that the CLI and `bench` share.

A run is `runs/<kind>-<in>-s<seed>[-<name>]/` holding `config.yaml` (fully resolved), `meta.json`, `checkpoints/`,
`detector.pt` (the fitted detector), `scores/<method>/<set>.npz`, `metrics.json`/`metrics.csv`, `log.jsonl`.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shlex
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from oodbench import config as configs
from oodbench import data, locks, metrics, progress, tuning
from oodbench import detectors as registry
from oodbench.engine import Engine, TrainSpec, checkpoint, distributed, setup_device
from oodbench.errors import OODBenchError


def safe_name(spec: str) -> str:
    """A dataset spec as a file/folder name: `vflip:fashion_mnist` → `vflip_fashion_mnist`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_") or "data"


def write_atomic(path: Path, text: str) -> None:
    with checkpoint.atomic_file(path, "w") as f:
        f.write(text)


def runs_root(runs_dir: Optional[str] = None) -> Path:
    return Path(runs_dir or os.environ.get("OODBENCH_RUNS", "runs"))


def default_run_dir(kind: str, in_spec: str, seed: int, runs_dir=None, name: Optional[str] = None) -> Path:
    return runs_root(runs_dir) / (f"{kind}-{safe_name(in_spec)}-s{seed}" + (f"-{safe_name(name)}" if name else ""))


class Run:
    """A run directory on disk."""

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

    @property
    def trained(self) -> bool:
        return (self.path / "detector.pt").is_file()

    def detector(self, method: str, overrides: Iterable[str] = (), device="auto"):
        """The fitted detector `method` of this run; `overrides` may change scoring options only."""
        cls = registry.get(method)
        if cls.kind != self.kind:
            raise OODBenchError(f"method {method!r} scores {cls.kind!r} runs but {self.path} is a {self.kind!r} run")
        if not self.trained:
            raise OODBenchError(f"{self.path} has no fitted detector yet (training unfinished?); run "
                                f"`oodbench train ... --resume` to finish it")
        cfg = self.scoring_config(overrides)
        trainer = registry.trainer_for(cls)(cfg, setup_device(device))
        try:
            state = checkpoint.load(self.path / "detector.pt", trainer.device)
        except OODBenchError as e:
            raise OODBenchError(f"{self.path / 'detector.pt'} is corrupt or truncated (it does not verify); the "
                                f"`oodbench train` command that made this run refits it from its checkpoints") from e
        trainer.load_state_dict(state)
        if registry.trainer_for(cls) is not cls:   # a post-hoc method: it scores the run's trained classifier
            det = cls(cfg, trainer.device)
            det.use_model(trainer.model())
        else:
            det = trainer
        return self.bind(det, file_digest(self.path / "detector.pt"))

    def bind(self, det, cache_tag: str):
        """Hand `det` what it may derive data from and keep it in: this run's cache and its fit split."""
        det.cache_tag = cache_tag
        det.cache, det.fit_data = RunCache(self.path / "cache"), FitData(det.cfg, det.device)
        return det

    def scoring_config(self, overrides: Iterable[str]) -> dict:
        schema = configs.read_yaml(configs.config_path(self.kind))
        schema.pop("presets", None)
        cfg = json.loads(json.dumps(schema))  # options added since the run was trained keep their defaults
        configs.deep_update(cfg, self.config)
        for item in overrides:
            keys, _ = configs.parse_override(item)
            if configs.is_training_option(".".join(keys)):
                raise OODBenchError(f"--set {item}: {'.'.join(keys)} is a training setting of this run; train a new "
                                    f"run with it (oodbench train ... --set {item} --run-name NAME)")
            configs.apply_override(cfg, item, schema)
        return cfg

    # ------------------------------------------------------------------------------------------------------------
    def in_distribution(self) -> str:
        return self.config["data"]["in"]

    def load_set(self, spec: str, split: str = "test", limit: Optional[int] = None, device="cpu", stream="auto",
                 decode="auto"):
        """`spec` as this run scores it: converted to its input shape; `stream` and `decode` are the scoring config's
        data.stream and data.decode."""
        shape = tuple(self.meta["shape"]) if "shape" in self.meta else None
        d = self.config["data"]
        return data.load(spec, split=split, root=d.get("root"), device=device, like=shape,
                         stream=stream, decode_to=d.get("decode_to"), crop_resize=d.get("crop_resize"),
                         decode=decode).head(limit)

    def scored_set(self, spec: str, det, limit: Optional[int] = None):
        """`spec` as `det` scores it: on its device, streamed and decoded as its data.stream / data.decode say."""
        d = det.cfg["data"]
        return self.load_set(spec, limit=limit, device=det.device, stream=d.get("stream", "auto"),
                             decode=d.get("decode", "auto"))

    def score(self, method: str, spec: str, limit: Optional[int] = None, overrides: Iterable[str] = (),
              device="auto", batch_size: int = 256, detector=None) -> dict:
        """Scores of `method` on dataset `spec` ({row: (N,) array, '_extra': array}), cached in scores/."""
        check_limit(limit)
        det = detector or self.detector(method, overrides, device)
        imageset = self.scored_set(spec, det, limit)
        key = self.cache_key(det, imageset, limit)
        path = self.path / "scores" / method / f"{safe_name(spec)}.npz"
        cached = read_npz(path, "_cache_key", key)
        if cached is not None:
            return cached
        arrays = score_set(det, imageset, batch_size)
        for row, values in ((r, v) for r, v in arrays.items() if not r.startswith("_")):
            bad = int(np.size(values) - np.isfinite(values).sum())
            if bad:
                raise OODBenchError(f"{method} gave {bad} NaN or infinite score(s) of {len(values)} on {spec} "
                                    f"(row {row}); nothing was saved. Is the run's training finished and sound?")
        if distributed.is_main():
            save_npz(path, {**arrays, "_cache_key": np.array(key)})
        return arrays

    def cache_key(self, det, imageset, limit) -> str:
        h = hashlib.sha1()
        h.update((det.cache_tag or file_digest(self.path / "detector.pt")).encode())  # digest taken at load
        h.update(imageset.fingerprint.encode())
        h.update(json.dumps({"options": det.options, "limit": limit}, sort_keys=True, default=str).encode())
        return h.hexdigest()[:20]

    def update_metrics(self, rows: list) -> None:
        """Merge rows into metrics.json / metrics.csv (a row replaces the one with the same method, in and out)."""
        path = self.path / "metrics.json"
        old = read_metrics(path)
        keyed = {(r["method"], r["in"], r["out"]): r for r in old}
        keyed.update({(r["method"], r["in"], r["out"]): r for r in rows})
        merged = list(keyed.values())
        write_atomic(path, json.dumps(merged, indent=2) + "\n")
        write_atomic(self.path / "metrics.csv", rows_to_csv(merged))


def check_model_takes(model, shape, in_spec: str) -> None:
    """One forward of a blank image of the ID set's `shape`, before any work: a model that cannot take the set's
    images (a ViT given 8x8 inputs, a 1-channel net given RGB) is a one-line error, not a traceback mid-run."""
    blank = torch.zeros((1, *shape), dtype=torch.uint8)
    net = model.net
    training = net.training
    try:
        net.eval()
        with torch.no_grad():
            model.features_and_logits(blank.to(next(net.parameters(), blank).device))
    except (RuntimeError, AssertionError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OODBenchError(f"model {model.name} cannot score {in_spec}'s images (prepared from {tuple(shape)}): "
                            f"{first}; give the model its input size (weights with a preprocessing size, or "
                            f"size=/resize= in oodbench.load_model/wrap)") from None
    finally:
        net.train(training)


class ModelRun(Run):
    """Post-hoc classifier methods on a model that oodbench did not train (`--model SPEC`, `oodbench.Evaluator`).

    Folder `runs/model-<safe spec>-<in>/` holds the same `scores/`, `cache/` and metrics files as a run. Statistics
    (class means, the kNN bank, gradlayer's validation choice) are fitted on the training split of `in_spec` (a
    seeded class-balanced sample of `fit_limit` images when given), less the seeded `data.val_fraction` held out as
    the validation split.
    """

    def __init__(self, model, in_spec: str, label: Optional[str] = None, fit_limit: Optional[int] = None,
                 runs_dir=None, data_root=None, seed: int = 0):
        check_limit(fit_limit, "--fit-limit")
        self.model, self.kind = model, "classifier"
        label = label or model.name
        self.path = runs_root(runs_dir) / f"model-{safe_name(label)}-{safe_name(in_spec)}"
        # Image folders and lists are decoded straight to the model's input (its resize + centre crop); in-memory
        # sets keep their size and the model prepares each batch.
        decode_to = (model.channels or 3, *model.size) if model.size else None
        crop = model.resize if model.size else None
        self.config = {"seed": seed, "data": {"in": in_spec, "root": data_root, "limit": fit_limit,
                                              "sample": "per_class", "decode_to": decode_to, "crop_resize": crop}}
        self._in_test = data.load(in_spec, split="test", root=data_root, decode_to=decode_to,
                                  crop_resize=crop)   # checks the set before anything is written
        self.meta = {"kind": "classifier", "model": label, "in": in_spec, "shape": list(self._in_test.shape)}
        check_model_takes(model, self._in_test.shape, in_spec)

    def load_set(self, spec: str, split: str = "test", limit: Optional[int] = None, device="cpu", stream="auto",
                 decode="auto"):
        as_loaded = data.stream_choice(stream) == "auto" and data.decode_choice(decode) == "auto"
        if spec == self.in_distribution() and split == "test" and as_loaded:   # loaded once, in __init__
            return self._in_test.head(limit).to(device)
        return super().load_set(spec, split, limit, device, stream, decode)

    @property
    def trained(self) -> bool:
        return True

    def detector(self, method: str, overrides: Iterable[str] = (), device="auto"):
        cls = registry.get(method)
        if cls.kind != "classifier":
            raise OODBenchError(f"method {method!r} trains its own {cls.kind!r} model; --model takes classifier "
                                f"methods (msp, energy, knn, ...; see `oodbench methods`)")
        det = cls(self.scoring_config(overrides), setup_device(device))
        det.use_model(self.model.to(det.device))
        return self.bind(det, f"{self.model.digest}-fit{self.config['data']['limit']}")


class RunCache:
    """Data a detector derives while scoring, kept in a run's `cache/` between processes (main rank writes)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load_npz(self, name: str, key: str) -> Optional[dict]:
        """The arrays saved under `name` with this key, or None (missing, stale or unreadable: recomputed)."""
        return read_npz(self.folder / name, "key", key)

    def save_npz(self, name: str, key: str, arrays: dict) -> None:
        if distributed.is_main():
            save_npz(self.folder / name, {**arrays, "key": np.array(key)})

    def load_json(self, name: str) -> dict:
        path = self.folder / name
        try:
            value = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def save_json(self, name: str, value: dict) -> None:
        if distributed.is_main():
            write_atomic(self.folder / name, json.dumps(value, indent=2))


class FitData:
    """What a method may fit on: the in-distribution train/validation split of a config (never a test set), and
    the training split of a validation OOD set, converted to a given shape."""

    def __init__(self, cfg: dict, device):
        self.cfg, self.device, self._split = cfg, device, None

    def split(self):
        if self._split is None:
            self._split = data.run_split(self.cfg, self.device)
        return self._split

    def load(self, spec: str, like) -> "data.ImageSet":
        d = self.cfg["data"]
        return data.load(spec, split="train", root=d.get("root"), device=self.device, like=like,
                         stream=d.get("stream"), decode_to=d.get("decode_to"), crop_resize=d.get("crop_resize"),
                         decode=d.get("decode"))


def split_model_overrides(overrides: Iterable[str]) -> tuple[dict, list]:
    """(`model.mean/std/size/head/layers` values for load_model, the other overrides)."""
    model, rest = {}, []
    for item in overrides:
        keys, value = configs.parse_override(item)
        if keys[0] != "model":
            rest.append(item)
        elif len(keys) == 2 and keys[1] in ("mean", "std", "size", "head", "layers"):
            model[keys[1]] = value
        else:
            raise OODBenchError(f"--set {item}: with --model, the model options are model.mean, model.std, "
                                f"model.size, model.head and model.layers")
    return model, rest


def read_npz(path: Path, key_name: str, key: str) -> Optional[dict]:
    """The arrays of a cache file whose `key_name` array equals `key`, without it; None when the file is missing or
    stale, and None with one warning line when it is unreadable (truncated, garbled, keyless): then it is recomputed."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f[key_name]) != key:
                return None
            return {k: f[k] for k in f.files if k != key_name}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:100]
        print(f"oodbench: warning: cache file {path} is unreadable ({reason}); recomputing it", file=sys.stderr)
        return None


def read_meta(path: Path) -> dict:
    """A run's meta.json ({} when absent); a corrupt one is a clear error that says how to rewrite it."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise OODBenchError(f"{path} is corrupt (not a JSON mapping); the `oodbench train` command that made this "
                            f"run rewrites it")
    return meta


def read_metrics(path: Path) -> list:
    """The rows saved in metrics.json ([] when absent); an unreadable file is replaced, with one warning line."""
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
        if isinstance(rows, list) and all(isinstance(r, dict) and {"method", "in", "out"} <= set(r) for r in rows):
            return rows
    except (ValueError, UnicodeDecodeError):
        pass
    print(f"oodbench: warning: {path} is unreadable; rewriting it with this evaluation's rows only", file=sys.stderr)
    return []


def check_limit(limit, what: str = "--limit") -> None:
    """`limit` (images per set) is None or a positive integer."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise OODBenchError(f"{what} must be a positive number of images, got {limit!r}")


def file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_npz(path: Path, arrays: dict) -> None:
    with checkpoint.atomic_file(path) as f:
        np.savez(f, **arrays)


def score_set(det, imageset, batch_size: int = 256) -> dict:
    """Run `det.score_rows` over a set in batches (sharded across ranks under torchrun) → numpy arrays."""
    world = distributed.world_size()
    part = imageset.subset(distributed.shard(len(imageset), distributed.rank(), world)) if world > 1 else imageset
    if hasattr(det, "score_imageset"):   # post-hoc methods: one network pass per set, shared between methods
        arrays = {k: v.detach().float().cpu().numpy() for k, v in det.score_imageset(part, batch_size).items()}
        return distributed.gather_concat(arrays, world)
    chunks: dict = {}
    total = -(-len(part) // batch_size)
    for x, _ in progress.bar(part.batches(batch_size), total=total, desc=f"score {imageset.name}", unit="batch",
                             leave=False, enabled=distributed.is_main()):
        for k, v in det.score_rows(x).items():
            chunks.setdefault(k, []).append(v.detach().float().cpu().numpy())
    arrays = {k: np.concatenate(v) for k, v in chunks.items()}
    return distributed.gather_concat(arrays, world)


# ----------------------------------------------------------------------------------------------------------------
def train(method: str, in_spec: Optional[str] = None, preset: Optional[str] = None, overrides: Iterable[str] = (),
          seed: Optional[int] = None, runs_dir=None, run_name: Optional[str] = None, data_root=None,
          device="auto", resume: bool = False) -> Run:
    """Train (or finish training) the run that `method` scores; returns the Run. Never overwrites another config."""
    cls = registry.get(method)
    overrides = list(overrides)
    if in_spec:
        overrides.append(f"data.in={in_spec}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    if data_root:
        overrides.append(f"data.root={data_root}")
    cfg = configs.load_config(cls.kind, preset, overrides)
    check_training_config(cfg)
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
        det.fit(train_set, val_set, engine)
        if engine.is_main:
            engine.begin()   # a detector that trained no network here (oe.from_run) still gets its config
            meta = {"kind": cls.kind, "method": method, "in": cfg["data"]["in"], "shape": list(train_set.shape),
                    "train_size": len(train_set), "val_size": len(val_set), "torch": torch.__version__}
            write_atomic(run_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
            checkpoint.save_atomic(det.state_dict(), run_dir / "detector.pt")
            checkpoint.load(run_dir / "detector.pt")   # success is reported only for a detector file that loads back
        distributed.barrier(engine.world_size)
        return Run(run_dir)


def check_training_config(cfg: dict) -> None:
    """Training settings that fail only late (or silently) otherwise, checked before any data or file is touched."""
    TrainSpec.from_cfg(cfg["train"])
    check_limit(cfg["data"].get("limit"), "data.limit")
    fraction = cfg["data"].get("val_fraction")
    if fraction is not None and not 0 <= fraction < 1:
        raise OODBenchError(f"data.val_fraction must be in [0, 1), got {fraction!r}")
    check_dataset_options(cfg)


def check_dataset_options(cfg: dict) -> None:
    """The dataset specs named by options (config.DATASET_OPTIONS), checked as --out specs are; data.stream and
    data.decode."""
    data.stream_choice((cfg.get("data") or {}).get("stream"))
    data.decode_choice((cfg.get("data") or {}).get("decode"))
    for key, spec in configs.dataset_options(cfg).items():
        try:
            data.check_spec(spec)
        except OODBenchError as e:
            raise OODBenchError(f"{key}: {e}") from None


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


def metric_rows(id_scores: dict, ood_scores: dict, in_spec: str, out_spec: str, bootstrap: int = 0,
                rename=lambda row: row) -> list:
    """One metrics row per reported score row (keys not starting with "_"), with bootstrap intervals if asked."""
    rows = []
    for row in (k for k in id_scores if not k.startswith("_")):
        result = {"method": rename(row), "in": in_spec, "out": out_spec,
                  **metrics.evaluate(id_scores[row], ood_scores[row])}
        if bootstrap:
            for name, (lo, hi) in metrics.bootstrap_ci(id_scores[row], ood_scores[row], bootstrap).items():
                result[f"{name}_ci"] = [lo, hi]
        rows.append(result)
    return rows


def evaluate(run: Run, methods: Iterable[str], out_specs: Iterable[str], limit: Optional[int] = None,
             overrides: Iterable[str] = (), device="auto", bootstrap: int = 0, tune: bool = False) -> list:
    """Metrics rows (one per reported row × OOD set) for methods of one run; also saved in the run. With `tune`,
    each method's options are first chosen on validation data (oodbench.tuning) and recorded in its rows.
    Every method, option, dataset spec and setting is checked before the first image is scored."""
    methods, out_specs = list(methods), list(out_specs)
    check_evaluation(methods, out_specs, limit, bootstrap)
    detectors = {method: run.detector(method, overrides, device) for method in methods}
    for det in detectors.values():
        check_dataset_options(det.cfg)
        data.decoder_for(data.decode_choice(det.cfg["data"].get("decode")), det.device)   # gpu needs a usable GPU
    rows, accuracies = [], {}
    in_spec = run.in_distribution()
    check_available(run, [in_spec] + out_specs, next(iter(detectors.values())))
    for method, det in detectors.items():
        extra = {}
        if tune:
            extra["tuned"] = tuning.tune(det)
        id_scores = run.score(method, in_spec, limit, overrides, detector=det)
        if hasattr(det, "accuracy"):  # classifiers report their in-distribution test accuracy beside the rows
            if det.cache_tag not in accuracies:   # one model for all the run's classifier methods: once
                accuracies[det.cache_tag] = det.accuracy(run.scored_set(in_spec, det, limit))
            if accuracies[det.cache_tag] is not None:
                extra["id_accuracy"] = accuracies[det.cache_tag]
        if "_bpd" in id_scores:  # likelihood models: mean bits per dimension of both sets beside the rows
            extra["id_bpd"] = float(np.mean(id_scores["_bpd"]))
        for out in out_specs:
            ood_scores = run.score(method, out, limit, overrides, detector=det)
            if "_bpd" in ood_scores:
                extra["out_bpd"] = float(np.mean(ood_scores["_bpd"]))
            rows += [{**r, **extra} for r in metric_rows(id_scores, ood_scores, in_spec, out, bootstrap)]
    if distributed.is_main():
        run.update_metrics(rows)
    return rows


def check_evaluation(methods: list, out_specs: list, limit, bootstrap) -> None:
    if not methods:
        raise OODBenchError("name at least one method, e.g. --method msp,energy")
    if not out_specs:
        raise OODBenchError("name at least one OOD dataset, e.g. --out digits,noise:gaussian")
    name_every_failure(out_specs, data.check_spec)
    check_limit(limit)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise OODBenchError(f"--bootstrap must be a number of resamples >= 0 (0 = no intervals), got {bootstrap!r}")


def check_available(run: Run, specs: list, det) -> None:
    """One error naming every set of `specs` that cannot be loaded as `det` scores it (streamed or not, decoded how),
    before any scoring starts (in-memory loads are cached, streamed ones only list their files)."""
    name_every_failure(specs, lambda spec: run.scored_set(spec, det))


def name_every_failure(specs, check) -> None:
    """Run `check(spec)` on every spec; one error naming each spec that failed, with its reason."""
    failed = []
    for spec in dict.fromkeys(specs):
        try:
            check(spec)
        except OODBenchError as e:
            failed.append(f"{spec}: {e}")
    if failed:
        raise OODBenchError(f"{len(failed)} dataset(s) not available; " + " | ".join(failed))


def rows_to_csv(rows: list) -> str:
    if not rows:
        return ""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    return buf.getvalue()


def find_run(method: str, in_spec: Optional[str], seed: int = 0, runs_dir=None, run: Optional[str] = None,
             run_name: Optional[str] = None, model: Optional[str] = None, fit_limit: Optional[int] = None,
             overrides: Iterable[str] = (), data_root=None) -> tuple[Run, list]:
    """(the run given by --model, --run, or the default run of `method`'s kind for this set and seed; the overrides
    left for scoring)."""
    overrides = list(overrides)
    if model:
        if run:
            raise OODBenchError("give either --model SPEC or --run RUN_DIR, not both")
        if not in_spec:
            raise OODBenchError("--model needs --in DATASET: the in-distribution set whose training split fits the "
                                "statistics and whose test split is scored")
        from oodbench.models import load_model

        options, overrides = split_model_overrides(overrides)
        return ModelRun(load_model(model, **options), in_spec, model, fit_limit, runs_dir, data_root), overrides
    if fit_limit is not None:
        raise OODBenchError("--fit-limit applies to --model; a trained run fits on its own training split")
    return _find_trained_run(method, in_spec, seed, runs_dir, run, run_name, data_root), overrides


def _find_trained_run(method, in_spec, seed, runs_dir, run, run_name, data_root=None) -> Run:
    if run:
        return Run(run)
    if not in_spec:
        raise OODBenchError("say which run to use: --run RUN_DIR, or --in DATASET (with --seed/--run-name)")
    kind = registry.get(method).kind
    path = default_run_dir(kind, in_spec, seed, runs_dir, run_name)
    if not (path / "config.yaml").is_file():
        raise OODBenchError(f"no trained run at {path}; train it first: "
                            + train_hint(method, kind, in_spec, seed, runs_dir, run_name, data_root))
    return Run(path)


def train_hint(method, kind, in_spec, seed, runs_dir=None, run_name=None, data_root=None) -> str:
    """The `oodbench train` command that makes the run these options look for: the user's own options echoed back,
    `--preset P` when the run name is a preset's name, else a pointer to the quick preset."""
    presets = configs.read_yaml(configs.config_path(kind)).get("presets") or {}
    options = [("--method", method), ("--in", in_spec), ("--seed", seed or None), ("--run-name", run_name),
               ("--preset", run_name if run_name in presets else None), ("--runs-dir", runs_dir),
               ("--data-root", data_root)]
    command = "oodbench train " + " ".join(f"{k} {shlex.quote(str(v))}" for k, v in options if v is not None)
    if run_name in presets or "quick" not in presets:
        return command
    return command + " (the paper-scale config; add --preset quick for a run of minutes)"

