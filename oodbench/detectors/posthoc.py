"""The base of the post-hoc methods: score a classifier from its penultimate features and logits.

A post-hoc method never trains anything. It may fit statistics on *reference outputs* — the model's features, logits
and labels on the in-distribution training split (or, for `fit_on = "val"`, the validation split) that the workflow
hands it through `fit_data`. Those outputs are computed once per model and split and kept in the run's cache
(`<run>/cache/<split>_outputs.npz`), so every method, every process and every tuning grid point reuses them.

Reference outputs always hold both features and logits, whatever a method's own `outputs` computes per batch.
Subclasses implement `fit_outputs(ref) -> stats` (optional) and `score_outputs(out) -> (B,)`, where `ref`/`out` are
dicts of float32 tensors on the device: "features" (N, D), "logits" (N, K) and, in `ref`, "labels" (N,). `sweep`
names the options `--tune` may choose, with OpenOOD v1.5's `postprocessor_sweep` grids. Methods whose outputs
depend on their options or read other maps (multilayer.py) say so in `outputs_key` and bring their own
`reference_pass`.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch

from oodbench import progress
from oodbench.detectors.classifier import ClassifierDetector
from oodbench.errors import OODBenchError


class PostHoc(ClassifierDetector):
    """Features/logits in, OOD scores out; statistics fitted lazily on the cached reference outputs."""

    fit_on: Optional[str] = "train"   # the ID split the statistics come from ("train", "val", or None: no fit)
    sweep: Dict[str, list] = {}       # option → values tried by --tune
    stats = None                      # what fit_outputs returned (None until the first score)

    # -- what subclasses implement ---------------------------------------------------------------------------------
    def fit_outputs(self, ref: dict):
        """Statistics from the reference outputs (default: none)."""
        return None

    def score_outputs(self, out: dict) -> torch.Tensor:
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> dict:
        """The model's outputs on a uint8 batch: {"features": (B, D), "logits": (B, K)} (float32)."""
        features, logits = self.model.features_and_logits(x)
        return {"features": features, "logits": logits}

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_fitted(self.outputs(x))

    def score_imageset(self, imageset, batch_size: int = 500) -> dict:
        """{name: (N,) scores} of a whole set. The model's outputs on it are shared by every post-hoc method of
        this process (SET_OUTPUTS), so scoring 20 methods on one set runs the network over it once."""
        outputs = type(self).outputs
        key = (self.cache_tag or self.model.digest, imageset.fingerprint, len(imageset), *self.outputs_key())
        arrays = SET_OUTPUTS.get(key)
        if arrays is None:
            arrays = outputs_of(lambda x: outputs(self, x), imageset, self.name, batch_size)
            SET_OUTPUTS.put(key, arrays)
        out = {k: torch.as_tensor(v, device=self.device) for k, v in arrays.items()}
        return {self.name: self.score_fitted(out)}

    def outputs_key(self) -> tuple:
        """What `outputs` computes besides the model and the set (part of the key of outputs shared in a process)."""
        return (type(self).outputs.__qualname__,)

    def score_fitted(self, out: dict) -> torch.Tensor:
        """Scores of precomputed outputs, fitting the statistics first if they are not fitted yet."""
        if self.stats is None and self.fit_on is not None:
            self.stats = self.fit_outputs(self.reference_outputs(self.fit_on))
        return self.score_outputs(out)

    def refit(self) -> None:
        """Forget the fitted statistics (an option changed); they are refitted from the cached outputs."""
        self.stats = None

    def reference_outputs(self, split: str = "train") -> dict:
        """Outputs and labels of the ID `split` ("train" or "val"), as float32 tensors on the device (cached)."""
        held = self.__dict__.setdefault("_reference", {})   # kept across refits (tuning refits many times)
        if split not in held:
            held[split] = self._load_reference(split)
        return held[split]

    def reference_pass(self) -> tuple:
        """(cache file stem, per-batch outputs, key material) of the reference outputs: by default the penultimate
        features and logits every method shares (<split>_outputs.npz); methods reading other maps name their own."""
        return "outputs", lambda x: PostHoc.outputs(self, x), ()

    def _load_reference(self, split: str) -> dict:
        train, val = self.require_fit_data().split()
        imageset = {"train": train, "val": val}[split]
        stem, outputs, material = self.reference_pass()
        half = bool((self.cfg.get("features") or {}).get("float16", False))
        name = f"{split}_{stem}.npz"
        key = self.cache_key(split, imageset.fingerprint, *material, *(["float16"] if half else []))
        saved = self.cache.load_npz(name, key) if self.cache is not None else None
        if saved is None:
            saved = outputs_of(outputs, imageset, self.name)
            if half:   # features.float16: half the cache on disk and in memory (a big training sample)
                saved = {k: v.astype(np.float16) for k, v in saved.items()}
            saved["labels"] = imageset.labels.cpu().numpy()
            if self.cache is not None:
                self.cache.save_npz(name, key, saved)
        return {k: torch.as_tensor(v, device=self.device).float() if v.dtype == np.float16 else
                torch.as_tensor(v, device=self.device) for k, v in saved.items()}

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final linear layer's weight (K, D) and bias (K,) as float32 tensors on the device."""
        head = self.model.head
        if not isinstance(head, torch.nn.Linear):
            raise OODBenchError(f"{self.name} needs the model's final nn.Linear layer; this model has none (name it "
                                f"with --set model.head=LAYER_NAME)")
        bias = head.bias if head.bias is not None else torch.zeros(head.out_features)
        return head.weight.detach().float().to(self.device), bias.detach().float().to(self.device)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of (shaped) features through the model's own head."""
        weight, bias = self.head_weights()
        return features @ weight.T + bias


class OutputMemo:
    """A small in-process store of per-set model outputs, least recently used dropped first past `budget` bytes
    ($OODBENCH_OUTPUT_MEMO_MB, default 2048)."""

    def __init__(self):
        self.items: "OrderedDict[tuple, dict]" = OrderedDict()

    def budget(self) -> int:
        return int(float(os.environ.get("OODBENCH_OUTPUT_MEMO_MB", 2048)) * 2 ** 20)

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
        return self.items.get(key)

    def put(self, key, arrays: dict) -> None:
        self.items[key] = arrays
        while self.items and sum(v.nbytes for a in self.items.values() for v in a.values()) > self.budget():
            self.items.popitem(last=False)


SET_OUTPUTS = OutputMemo()


def outputs_of(outputs, imageset, name: str, batch_size: int = 500) -> dict:
    """`outputs(x)` (a dict of tensors per uint8 batch) over a whole set → {key: numpy float32 array}."""
    chunks: dict = {}
    total = -(-len(imageset) // batch_size)
    for x, _ in progress.bar(imageset.batches(batch_size), total=total, desc=f"{name}: outputs on {imageset.name}",
                             unit="batch", leave=False):
        for k, v in outputs(x).items():
            chunks.setdefault(k, []).append(v.float().cpu().numpy())
    if not chunks:
        raise OODBenchError(f"{name}: the set {imageset.name!r} has no images")
    return {k: np.concatenate(v) for k, v in chunks.items()}


def energy(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp of the logits: the free energy's negative (higher = in-distribution)."""
    return torch.logsumexp(logits, dim=1)


def subspace_dim(name: str, dim: int, features: int) -> int:
    """The principal-subspace size used by ViM / Residual: `dim`, or D//2 when the features have ≤ dim dimensions
    (as pytorch-ood does; a 512-dimensional default cannot leave a residual in 128-dimensional features)."""
    if dim <= 0:
        raise OODBenchError(f"{name}.dim must be a positive integer, got {dim}")
    return dim if dim < features else features // 2
