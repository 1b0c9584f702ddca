"""oodbench: train and benchmark out-of-distribution detectors for images.

Python API (docs/python.md): `oodbench.method("knn", k=50)` is a method you `fit(model, data)` and `score(x)`;
`oodbench.load_model(spec)` and `oodbench.wrap(net, mean=..., std=...)` give a ClassifierModel (oodbench/models.py;
`oodbench.load_clip` / `oodbench.wrap_clip` a zero-shot CLIP one, docs/clip.md);
`oodbench.Evaluator(model, methods=[...], fit=..., in_dataset=...).evaluate(...)` gives the rows of
`oodbench eval --format json`; `oodbench.as_imageset(...)` turns tensors, arrays, Datasets and DataLoaders into sets.
"""

__version__ = "0.1.0"
__all__ = ["load_model", "wrap", "ensemble", "load_clip", "wrap_clip", "ClassifierModel", "Evaluator", "method", "PostHoc", "Option",
           "as_imageset"]


def __getattr__(name):  # the model layer imports torch; keep `import oodbench` (and the CLI's start) light
    if name == "Evaluator":
        from oodbench.api import Evaluator

        return Evaluator
    if name in ("method", "PostHoc", "Option"):
        from oodbench import detectors

        return getattr(detectors, name)
    if name == "as_imageset":
        from oodbench.data import as_imageset

        return as_imageset
    if name in __all__:
        from oodbench import models

        return getattr(models, name)
    raise AttributeError(f"module 'oodbench' has no attribute {name!r}")
