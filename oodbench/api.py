"""The Python API: `Evaluator(model, methods, fit=..., in_dataset=...)` gives `oodbench eval`'s rows for any model and
any data, through the same evaluation path as the CLI and the bench (oodbench/workflow/evaluation.py)."""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from oodbench import data, workflow
from oodbench.detectors import PostHoc
from oodbench.errors import OODBenchError
from oodbench.metrics import METRIC_NAMES


class Evaluator:
    """Post-hoc methods on one classifier and its in-distribution data.

    - `model`: a ClassifierModel (`oodbench.load_model` / `oodbench.wrap`), an `nn.Module` (images in [0, 1] go in
      as they are) or a model spec string.
    - `methods`: names (`oodbench methods`) or method objects (`oodbench.method("knn", k=10)`, your own `PostHoc`
      subclass).
    - The ID data: `in_dataset="cifar10"` (statistics fitted on its training split, its test split scored), or your
      own `fit=` images (anything `oodbench.data.as_imageset` takes; `val=` a validation split, else a seeded 10% of
      `fit`) with `id_test=` given here or to `evaluate`.
    - `runs_dir=None` keeps everything in memory and writes nothing; with a folder, scores and metrics are cached
      there exactly as the CLI caches them (`<runs_dir>/model-<model>-<in>/`).
    - `overrides`: `--set` strings for the methods' options (e.g. "knn.k=10").
    A fit set that shares images with the ID test set is refused (oodbench.data.overlap).
    """

    def __init__(self, model, methods: Iterable = ("msp",), in_dataset: Optional[str] = None, fit=None, val=None,
                 id_test=None, fit_limit: Optional[int] = None, overrides: Iterable[str] = (), runs_dir=None,
                 data_root=None, device="auto", seed: int = 0):
        import torch.nn as nn

        from oodbench.models import ClassifierModel, load_model, wrap

        overrides = list(overrides)
        label = None
        if isinstance(model, str):
            options, overrides = workflow.split_model_overrides(overrides)
            model, label = load_model(model, in_dataset=in_dataset, data_root=data_root, **options), model
        elif isinstance(model, nn.Module):
            model = wrap(model, mean=[0.0], std=[1.0])
        elif not isinstance(model, ClassifierModel):
            raise OODBenchError(f"Evaluator needs a ClassifierModel (oodbench.load_model or oodbench.wrap), an "
                                f"nn.Module or a model spec, got {type(model).__name__}")
        self.methods = [methods] if isinstance(methods, (str, PostHoc)) else list(methods)
        if not self.methods:
            raise OODBenchError("Evaluator needs at least one method, e.g. methods=['msp', 'energy']")
        for m in self.methods:
            if not isinstance(m, (str, PostHoc)):
                raise OODBenchError(f"a method is a name or a post-hoc method object, got {type(m).__name__}")
        if in_dataset is not None and not isinstance(in_dataset, str):
            raise OODBenchError(f"in_dataset is a dataset spec such as 'cifar10'; give your own images as fit= and "
                                f"id_test=, got {type(in_dataset).__name__}")
        self.model, self.label = model, label or f"{model.name}-{model.digest[:8]}"
        self.overrides, self.device = overrides, device
        self.options = dict(in_dataset=in_dataset, fit=fit, val=val, fit_limit=fit_limit, seed=seed,
                            runs_dir=False if runs_dir is None else runs_dir, data_root=data_root)
        self._runs: dict = {}
        if id_test is not None or in_dataset is not None:
            self.run_for(id_test)   # checks the data and the model before anything is scored

    def run_for(self, id_test=None):
        """The ModelRun of this ID test set (built once per set)."""
        key = id(id_test)
        if key not in self._runs:
            o = self.options
            if id_test is None and o["in_dataset"] is None:
                raise OODBenchError("give the in-distribution test images: evaluate(id_test=...) or "
                                    "Evaluator(..., in_dataset='cifar10')")
            self._runs[key] = workflow.ModelRun(
                self.model, o["in_dataset"] if id_test is None else data.as_imageset(id_test, name="id_test"),
                self.label, o["fit_limit"], o["runs_dir"], o["data_root"], o["seed"], fit=o["fit"], val=o["val"])
        return self._runs[key]

    def evaluate(self, ood, id_test=None, limit: Optional[int] = None, bootstrap: int = 0,
                 groups: Optional[dict] = None, joint: bool = False, csid=None) -> list:
        """The rows of `oodbench eval --format json`: one per method row × OOD set.

        `ood`: dataset specs (a list or one string) or {name: data}; `groups` {"near": [names], "far": [...]} adds
        a row per method and group with the mean of each metric over the group's sets (out = the group's name);
        `joint` adds the joint metrics (OSCR, CCR@FPR, AUTC, AURC, ECE, ...) as `oodbench eval --joint` does;
        `csid` (specs or {name: labelled data}, as `ood`): covariate-shifted ID sets, as `oodbench eval --csid`: the
        full-spectrum metrics (fs_*, ID ∪ csID against each OOD set) and csid_accuracy join every row."""
        outs = self._ood_sets(ood)
        shifted = self._ood_sets(csid) if csid is not None else []
        run = self.run_for(id_test)
        rows = workflow.evaluate(run, self.methods, outs, limit, self.overrides, self.device, bootstrap, joint=joint,
                                 csid=shifted)
        return rows + group_rows(rows, groups) if groups else rows

    def score(self, method, dataset, limit: Optional[int] = None, id_test=None) -> dict:
        """{row: (N,) scores} of one method on one dataset (higher = more OOD)."""
        run = self.run_for(id_test)
        out = self._ood_sets(dataset if isinstance(dataset, (str, dict)) else {"data": dataset})[0]
        return run.score(run.prepare(method, self.overrides, self.device), out, limit)

    @staticmethod
    def _ood_sets(ood) -> list:
        if isinstance(ood, str):
            return [ood]
        if isinstance(ood, dict):
            if not ood:
                raise OODBenchError("ood={} holds no sets; give {name: images, ...} or dataset specs")
            return [spec if isinstance(spec, str) else data.as_imageset(spec, name=str(name))
                    for name, spec in ood.items()]
        if isinstance(ood, (list, tuple)) and all(isinstance(s, str) for s in ood):
            return list(ood)
        raise OODBenchError("ood is a dataset spec, a list of specs, or a {name: images} mapping (tensors, arrays, "
                            f"Datasets, DataLoaders), got {type(ood).__name__}")


def group_rows(rows: list, groups: dict) -> list:
    """Per method and group, the mean of each metric over the group's OOD sets (sets not evaluated are an error)."""
    if not isinstance(groups, dict):
        raise OODBenchError(f"groups maps a group name to a list of OOD set names, got {type(groups).__name__}")
    found = {r["out"] for r in rows}
    out = []
    for group, members in groups.items():
        missing = [m for m in members if m not in found]
        if missing or not members:
            raise OODBenchError(f"group {group!r} names {', '.join(missing) or 'no sets'}, not among the evaluated "
                                f"OOD sets ({', '.join(sorted(found))})")
        for method in dict.fromkeys(r["method"] for r in rows):
            chosen = [r for r in rows if r["method"] == method and r["out"] in members]
            means = {k: float(np.mean([r[k] for r in chosen])) for k in METRIC_NAMES if k in chosen[0]}
            out.append({"method": method, "in": chosen[0]["in"], "out": group, **means, "sets": list(members)})
    return out
