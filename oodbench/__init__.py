"""oodbench: train and benchmark out-of-distribution detectors for images.

Python API: `oodbench.load_model(spec)` and `oodbench.wrap(net, mean=..., std=...)` give a ClassifierModel
(see oodbench/models.py); `oodbench.Evaluator(model, in_dataset=..., methods=[...]).evaluate([...])` gives the
rows of `oodbench eval --format json`.
"""

__version__ = "0.1.0"
__all__ = ["load_model", "wrap", "ClassifierModel", "Evaluator"]


def __getattr__(name):  # the model layer imports torch; keep `import oodbench` (and the CLI's start) light
    if name == "Evaluator":
        from oodbench.api import Evaluator

        return Evaluator
    if name in __all__:
        from oodbench import models

        return getattr(models, name)
    raise AttributeError(f"module 'oodbench' has no attribute {name!r}")
