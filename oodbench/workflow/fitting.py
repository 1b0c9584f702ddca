"""Fitting a post-hoc method on a run: its reference outputs come from the run's cache (one network pass per model
and split, shared by every method, process and tuning grid point), its validation sets from data/validation.py
(never a test split), and methods whose own fit is costly (gradlayer) keep their fitted state in the cache."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from oodbench import data
from oodbench.data.validation import validation_ood
from oodbench.detectors.posthoc import PostHoc, outputs_of, shared_outputs


@dataclass
class Scoring:
    """A method ready to score on a run: the fitted method object, the run's scoring config, the cache tag of the
    model it scores, and the method's name in the run (its row prefix and score folder)."""

    det: object
    cfg: dict
    tag: str
    name: str

    @property
    def posthoc(self) -> bool:
        return isinstance(self.det, PostHoc)

    @property
    def options(self) -> dict:
        return self.det.get_params() if self.posthoc else self.det.options


def cache_key(*material) -> str:
    text = json.dumps(list(material), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


class ReferenceOutputs:
    """The `outputs=` provider a method's fit is handed: reference passes over the run's fit splits are read from
    (and written to) `<run>/cache/<split>_<stem>.npz`; any other set goes through the in-process memo."""

    def __init__(self, run, cfg: dict, splits: dict):
        self.run, self.splits = run, splits
        self.half = bool((cfg.get("features") or {}).get("float16", False))

    def __call__(self, method, imageset, stem, fn, material, batch_size: int = 500) -> dict:
        split = next((name for name, s in self.splits.items() if s is not None and len(s) == len(imageset)
                      and s.fingerprint == imageset.fingerprint), None)
        if split is None or self.run.cache.folder is None:   # in memory: this process's memo
            return shared_outputs(method, imageset, stem, fn, material, batch_size)
        name = f"{split}_{stem}.npz"
        key = cache_key(self.run.tag, split, imageset.fingerprint, *material, *(["float16"] if self.half else []))
        saved = self.run.cache.load_npz(name, key)
        if saved is None:
            saved = outputs_of(fn, imageset, method.name, batch_size, method.device)
            if self.half:   # features.float16: half the cache on disk and in memory (a big training sample)
                saved = {k: v.astype(np.float16) for k, v in saved.items()}
            self.run.cache.save_npz(name, key, saved)
        return saved


def train_split_loader(cfg: dict, device):
    """`load(spec, like)`: the training split of a validation OOD set, read as the run's config says."""
    d = cfg["data"]

    def load(spec, like):
        return data.load(spec, split="train", root=d.get("root"), device=device, like=like, stream=d.get("stream"),
                         decode_to=d.get("decode_to"), crop_resize=d.get("crop_resize"), decode=d.get("decode"))

    return load


def validation_set(spec: str, cfg: dict, val, like, device):
    """A validation OOD set as data/validation.py builds it (from `val` when derived from the ID set, else a
    training split; never a test split)."""
    return validation_ood(spec, str(cfg["data"].get("in", "")), val, train_split_loader(cfg, device), like)


def validation_sets(run, det, cfg: dict, val, like) -> dict:
    """{option: ImageSet} of the validation sets `det` names (`fit_datasets`)."""
    return {option: validation_set(spec, cfg, val, like, det.device) for option, spec in det.fit_datasets().items()}


def fit(run, det, cfg: dict, device):
    """`det` fitted on the run's fit splits and bound to its model; returns the run's `Scoring` of it."""
    model = run.model(device)
    det.use_model(model)
    name = det.name or type(det).__name__.lower()
    if det.fit_on is None:
        det.fit(model)
        return Scoring(det, cfg, run.tag, name)
    train, val = run.fit_splits(cfg, det.device)
    if getattr(det, "cache_fitted", False):
        key = cache_key(run.tag, name, det.get_params(), train.fingerprint, None if val is None else val.fingerprint,
                        cfg["seed"])
        state = run.cache.load_state(name, key)
        if state is not None:
            det.load_state_dict(state)
            return Scoring(det, cfg, run.tag, name)
    sets = validation_sets(run, det, cfg, val, tuple(train.shape))
    det.fit(model, train, val, outputs=ReferenceOutputs(run, cfg, {"train": train, "val": val}), seed=cfg["seed"],
            **sets)
    if getattr(det, "cache_fitted", False):
        run.cache.save_state(name, key, det.state_dict())
    return Scoring(det, cfg, run.tag, name)


def reference(run, det, cfg: dict) -> dict:
    """The reference outputs `det` fits on (its `fit_on` split), from the run's cache."""
    train, val = run.fit_splits(cfg, det.device)
    imageset = {"train": train, "val": val}[det.fit_on]
    return det.reference_outputs(imageset, ReferenceOutputs(run, cfg, {"train": train, "val": val}))


def tensors(arrays: dict, device) -> dict:
    return {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}
