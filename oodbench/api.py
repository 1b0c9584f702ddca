"""The Python API over the CLI's workflow: `Evaluator(model, in_dataset, methods)` gives `oodbench eval`'s rows."""
from __future__ import annotations

from typing import Iterable, Optional

from oodbench import runs
from oodbench.errors import OODBenchError


class Evaluator:
    """Post-hoc classifier methods on one model and in-distribution set; results cached as the CLI caches them.

    `model`: a ClassifierModel (`oodbench.load_model` / `oodbench.wrap`) or a model spec string. `overrides`:
    `--set` strings for the methods' options (e.g. "knn.k=10"). Scores and metrics go to
    `runs/model-<model>-<in>/` (or `runs_dir`).
    """

    def __init__(self, model, in_dataset: str, methods: Iterable[str] = ("msp",), fit_limit: Optional[int] = None,
                 overrides: Iterable[str] = (), runs_dir=None, data_root=None, device="auto"):
        from oodbench.models import ClassifierModel, load_model

        label = None
        if isinstance(model, str):
            options, overrides = runs.split_model_overrides(overrides)
            model, label = load_model(model, **options), model
        elif not isinstance(model, ClassifierModel):
            raise OODBenchError(f"Evaluator needs a ClassifierModel (oodbench.load_model or oodbench.wrap) or a "
                                f"model spec, got {type(model).__name__}")
        self.methods = [methods] if isinstance(methods, str) else list(methods)
        if not self.methods:
            raise OODBenchError("Evaluator needs at least one method, e.g. methods=['msp', 'energy']")
        self.overrides, self.device = list(overrides), device
        self.run = runs.ModelRun(model, in_dataset, label or f"{model.name}-{model.digest[:8]}", fit_limit,
                                 runs_dir, data_root)

    def evaluate(self, out_datasets: Iterable[str], limit: Optional[int] = None, bootstrap: int = 0) -> list:
        """The rows of `oodbench eval --format json`: one per method row × OOD set."""
        outs = [out_datasets] if isinstance(out_datasets, str) else list(out_datasets)
        return runs.evaluate(self.run, self.methods, outs, limit, self.overrides, self.device, bootstrap)

    def score(self, method: str, dataset: str, limit: Optional[int] = None) -> dict:
        """{row: (N,) scores} of one method on one dataset (higher = more OOD)."""
        return self.run.score(method, dataset, limit, self.overrides, self.device)
