"""`--tune`: choose a post-hoc method's options on validation data, never on a test set.

The validation OOD set follows data/validation.py, as llr's and gradlayer's do: `gray:`/`vflip:`/`hflip:` of the
in-distribution set are built from its validation split, any other set comes from its training split.
The grid is the method's `sweep` (OpenOOD v1.5's `postprocessor_sweep`); `tune.grid` replaces it per option, e.g.
`--set 'tune.grid={react.percentile: [80, 90, 95]}'`. Each grid point is scored on the ID
validation split against the *training* split of a validation OOD set (`tune.val_ood`, `tune.val_size` images of
each), and the point with the highest AUROC wins (the first one on ties). The model runs over the two validation sets
once; every grid point (skipping those the data cannot take, such as knn.k above the training set size)
refits the method's statistics from the cached training outputs and scores the stored
features/logits, so a sweep costs little more than one evaluation. The choice is kept in `<run>/cache/tuning.json`.
"""
from __future__ import annotations

import itertools

from oodbench import metrics
from oodbench.detectors.posthoc import PostHoc, outputs_of
from oodbench.errors import OODBenchError
from oodbench.workflow.fitting import cache_key, reference, tensors, validation_set


def tune(run, scoring) -> dict:
    """Set the method's options to the best grid point (`set_params`, then a refit from the cached reference
    outputs); returns {"<method>.<option>": value, ...} ({} if no grid)."""
    det, cfg = scoring.det, scoring.cfg
    settings = cfg.get("tune") or {}
    if not isinstance(det, PostHoc):
        return {}
    grid = {**det.sweep(), **_own_grid(det, settings.get("grid") or {})}
    if not grid:
        return {}
    val_ood, val_size = settings.get("val_ood"), int(settings.get("val_size", 1000))
    if not val_ood or val_size <= 0:
        raise OODBenchError("--tune needs tune.val_ood (a validation OOD set; its training split is used) and a "
                            "positive tune.val_size")
    train, val = run.fit_splits(cfg, det.device)
    fixed = {k: v for k, v in det.get_params().items() if k not in grid}
    key = cache_key(scoring.tag, "tune", det.name, grid, fixed, val.fingerprint, val_ood, val_size)
    saved = run.cache.load_json("tuning.json")
    choice = saved.get(key)
    if not (isinstance(choice, dict) and set(choice.get("chosen", {})) == set(grid)):
        ood = validation_set(val_ood, cfg, val, tuple(train.shape), det.device).head(val_size)   # never a test split
        sets = [tensors(outputs_of(det.outputs, s, det.name, device=det.device), det.device)
                for s in (val.head(val_size), ood)]
        ref = reference(run, det, cfg) if det.fit_on is not None else None
        best = None
        for point in itertools.product(*grid.values()):
            try:
                _refit(det, dict(zip(grid, point)), ref)
                id_scores, ood_scores = (det.score_outputs(out).cpu().numpy() for out in sets)
            except OODBenchError:   # a point this data cannot take (e.g. knn.k above the training set size)
                continue
            auroc = metrics.evaluate(id_scores, ood_scores)["auroc"]
            if best is None or auroc > best[0]:
                best = (auroc, dict(zip(grid, point)))
        if best is None:
            raise OODBenchError(f"--tune: no grid point of {det.name} ({grid}) can be scored on this data")
        choice = {"chosen": best[1], "val_auroc": best[0], "val_ood": val_ood, "val_size": val_size}
        run.cache.save_json("tuning.json", {**saved, key: choice})
    _refit(det, choice["chosen"], reference(run, det, cfg) if det.fit_on is not None else None)
    scoring.cfg.setdefault(det.name, {}).update(choice["chosen"])   # the scores' cache key follows the choice
    return {f"{det.name}.{k}": v for k, v in choice["chosen"].items()}


def _refit(det, options: dict, ref) -> None:
    det.set_params(**options)
    if ref is not None:
        det.fit_reference(ref)
def _own_grid(det, grid: dict) -> dict:
    """This method's part of `tune.grid` ({"react.percentile": [80, 90], ...} replaces the shipped values)."""
    if not isinstance(grid, dict):
        raise OODBenchError(f"tune.grid must map METHOD.OPTION to a list of values, got {grid!r}")
    own = {}
    for name, values in _flat(grid).items():
        method, _, option = str(name).partition(".")
        if method != det.name:
            continue
        if not option or not isinstance(values, list) or not values:
            raise OODBenchError(f"tune.grid: {name!r} must be METHOD.OPTION with a non-empty list of values")
        own[option] = values
    return own


def _flat(grid: dict, prefix: str = "") -> dict:
    """{"react": {"percentile": [...]}} (from --set tune.grid.react.percentile=...) → {"react.percentile": [...]}."""
    flat = {}
    for key, value in grid.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
