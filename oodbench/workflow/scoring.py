"""Scoring a prepared method on a set: batched (sharded across ranks under torchrun), checked for NaNs, cached in
the run's `scores/<method>/<set>.npz` keyed by what the scores depend on."""
from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np

from oodbench import progress
from oodbench.detectors.posthoc import PostHoc
from oodbench.engine import distributed
from oodbench.errors import OODBenchError
from oodbench.workflow.files import check_limit, read_npz, save_npz


def score_cached(run, scoring, spec, limit: Optional[int] = None, batch_size: int = 256) -> dict:
    """{row: (N,) array, '_extra': array} of `scoring` on `spec` (a dataset spec or data), from the cache when the
    model, data, options and limit are the same."""
    check_limit(limit)
    imageset = run.scored_set(spec, scoring, limit) if isinstance(spec, str) else \
        run.load_set(spec, limit=limit, device=scoring.det.device)
    h = hashlib.sha1()
    h.update(scoring.tag.encode())
    h.update(imageset.fingerprint.encode())
    h.update(json.dumps({"options": scoring.options, "limit": limit, "predictions": PREDICTIONS_VERSION},
                        sort_keys=True, default=str).encode())
    key = h.hexdigest()[:20]
    path = run.score_path(scoring, spec)
    cached = None if path is None else read_npz(path, "_cache_key", key)
    if cached is not None:
        return cached
    arrays = score_set(scoring.det, imageset, batch_size)
    for row, values in ((r, v) for r, v in arrays.items() if not r.startswith("_")):
        bad = int(np.size(values) - np.isfinite(values).sum())
        if bad:
            raise OODBenchError(f"{scoring.name} gave {bad} NaN or infinite score(s) of {len(values)} on "
                                f"{imageset.name} (row {row}); nothing was saved. Is the model's training finished "
                                f"and sound?")
    if path is not None and distributed.is_main():
        save_npz(path, {**arrays, "_cache_key": np.array(key)})
    return arrays


PREDICTIONS_VERSION = 1   # in the cache key: score files written before predictions were recorded are rescored


def predictions(det, imageset, batch_size: int = 256) -> dict:
    """The classifier's side of a post-hoc method's score file: `_pred` (N,) int64 arg-max class, `_conf` (N,)
    float32 top-class softmax probability and, when the set's labels are the model's classes, `_label` (N,) int64.
    The logits come from the process memo the methods share (no extra network pass after a features+logits one).
    {} for a detector without a classifier (trained families)."""
    if not isinstance(det, PostHoc) or det.model is None:
        return {}
    from oodbench.detectors.posthoc import shared_outputs

    logits = shared_outputs(det, imageset, "scored", lambda x: {"logits": det.logits(x)}, ("logits",),
                            batch_size)["logits"]
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    arrays = {"_pred": logits.argmax(axis=1).astype(np.int64),
              "_conf": (shifted.max(axis=1) / shifted.sum(axis=1)).astype(np.float32)}
    if imageset.labels is not None and det.model.num_classes == imageset.num_classes:
        arrays["_label"] = np.asarray(imageset.labels.cpu() if hasattr(imageset.labels, "cpu") else
                                      imageset.labels).astype(np.int64)
    return arrays


def score_set(det, imageset, batch_size: int = 256) -> dict:
    """`det` over a whole set → numpy arrays: a post-hoc method through its shared outputs (one network pass per
    set for all of them), a trained detector through `score_rows` per batch."""
    world = distributed.world_size()
    part = imageset.subset(distributed.shard(len(imageset), distributed.rank(), world)) if world > 1 else imageset
    if isinstance(det, PostHoc):
        arrays = {k: v.detach().float().cpu().numpy() for k, v in det.score_set(part, batch_size).items()}
        arrays.update(predictions(det, part, batch_size))
        return distributed.gather_concat(arrays, world)
    chunks: dict = {}
    total = -(-len(part) // batch_size)
    for x, _ in progress.bar(part.batches(batch_size), total=total, desc=f"score {imageset.name}", unit="batch",
                             leave=False, enabled=distributed.is_main()):
        for k, v in det.score_rows(x.to(det.device)).items():
            chunks.setdefault(k, []).append(v.detach().float().cpu().numpy())
    arrays = {k: np.concatenate(v) for k, v in chunks.items()}
    return distributed.gather_concat(arrays, world)
