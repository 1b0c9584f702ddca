"""The base of every post-hoc method: a plain object that scores a classifier, scikit-learn style.

    m = oodbench.method("knn", k=50)         # options are constructor arguments (declared once, in OPTIONS)
    m.fit(model, train_images, labels=None)  # fits statistics (returns m); `fit_features` for arrays
    m.score(x)                               # (B,) scores, higher = more OOD; `score_features` for arrays
    torch.save(m.state_dict(), path)         # fitted state: plain tensors, loads with weights_only=True

A method never trains a network, never loads data and never writes files. It fits on *reference outputs*: the model's
outputs on the fit set (`reference_pass`, by default the penultimate features and logits, plus labels). Whoever
calls `fit` may hand those outputs over already computed (`outputs=`): the workflow keeps them in a run's cache so
that every method, process and tuning grid point reuses one pass. `fit_on` says which split the statistics come
from ("train", "val", or None: nothing to fit).

Subclasses implement `fit_outputs(ref) -> stats` (optional) and `score_outputs(out) -> (B,)` on dicts of float32
tensors: "features" (N, D), "logits" (N, K) and, in `ref`, "labels" (N,) or None. Methods that read other maps
(multilayer.py, ODIN) bring their own `outputs` and say what they depend on in `outputs_key`.
"""
from __future__ import annotations

import difflib
import os
from collections import OrderedDict
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from oodbench import progress
from oodbench.config import check_type
from oodbench.detectors.base import Option
from oodbench.errors import NotFittedError, OODBenchError


class PostHoc:
    """Features/logits in, OOD scores out. Options in the constructor, fitted state in attributes ending in `_`."""

    name: str = ""                    # registry key, set by `register`
    kind: str = "classifier"          # post-hoc methods score a classifier (the run's, or any model)
    summary: str = ""                 # one line for `oodbench methods`
    OPTIONS: Dict[str, Option] = {}   # this method's options: default, help, --tune grid, whether a dataset spec
    fit_on: Optional[str] = "train"   # the ID split the statistics come from ("train", "val", or None: no fit)
    needs_labels: bool = False        # fit_outputs reads ref["labels"]
    array_level: bool = True          # scores from features/logits alone (fit_features / score_features work)

    def __init__(self, *args, **options):
        if args:
            raise OODBenchError(f"{type(self).__name__} takes its options as keyword arguments, e.g. "
                                f"{type(self).__name__}(k=50); got {len(args)} positional argument(s)")
        if not self.name:   # a user's own subclass, not registered: named after its class
            self.name = type(self).__name__.lower()
        self.options = self.check_options(options, defaults=True)
        self.model = None
        self.device = torch.device("cpu")
        self.stats_ = None
        self.head_ = None             # an explicit head (W, b) given to fit_features, else the model's own
        self.fitted_ = self.fit_on is None

    # -- options ------------------------------------------------------------------------------------------------
    @classmethod
    def defaults(cls) -> dict:
        return {k: o.default for k, o in cls.OPTIONS.items()}

    @classmethod
    def sweep(cls) -> Dict[str, list]:
        """The options `--tune` may choose, with their grids (OpenOOD v1.5's `postprocessor_sweep`)."""
        return {k: list(o.grid) for k, o in cls.OPTIONS.items() if o.grid}

    @classmethod
    def check_options(cls, options: dict, defaults: bool = False) -> dict:
        """`options` checked against OPTIONS (unknown names get the nearest valid one), over the defaults if asked."""
        checked = cls.defaults() if defaults else {}
        for key, value in options.items():
            if key not in cls.OPTIONS:
                close = difflib.get_close_matches(key, cls.OPTIONS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                valid = ", ".join(cls.OPTIONS) or "none"
                raise OODBenchError(f"{cls.name} has no option {key!r}.{hint} Its options: {valid}")
            option = cls.OPTIONS[key]
            checked[key] = value if option.any_type else check_type(f"{cls.name}.{key}", value, option.default,
                                                                    cls.name)
        return checked

    def get_params(self) -> dict:
        return dict(self.options)

    def set_params(self, **options) -> "PostHoc":
        """Change options; fitted statistics are dropped (fit again) when the method fits any."""
        self.options.update(self.check_options(options))
        if self.fit_on is not None:
            self.stats_, self.fitted_ = None, False
        return self

    def fit_datasets(self) -> dict:
        """{option: dataset spec} of the options naming a validation set this method's fit needs (e.g. gradlayer's
        val_ood); the workflow loads them, never a test split."""
        return {k: self.options[k] for k, o in self.OPTIONS.items() if o.dataset and self.options.get(k)}

    # -- the model ------------------------------------------------------------------------------------------------
    def use_model(self, model) -> "PostHoc":
        """Score `model`: a ClassifierModel (`oodbench.load_model` / `oodbench.wrap`), or an nn.Module (wrapped with
        no normalisation: images in [0, 1] go in as they are)."""
        from_module = isinstance(model, nn.Module)
        if from_module:
            from oodbench.models import wrap

            model = wrap(model, mean=[0.0], std=[1.0])
        if not hasattr(model, "features_and_logits"):
            raise OODBenchError(f"{self.name}: the model must be a ClassifierModel (oodbench.wrap(net, mean=..., "
                                f"std=...) or oodbench.load_model(spec)) or an nn.Module, got {type(model).__name__}")
        self.model = model
        first = next(model.net.parameters(), None)
        self.to(first.device if first is not None else "cpu")
        return self

    def to(self, device) -> "PostHoc":
        """Keep the fitted statistics on `device` (where the model's outputs are)."""
        self.device = torch.device(device)
        self.stats_ = _move(self.stats_, self.device)
        self.head_ = _move(self.head_, self.device)
        return self

    def require_model(self):
        if self.model is None:
            raise OODBenchError(f"{self.name} has no model: call .fit(model, data) or .use_model(model) first (or "
                                f"score arrays with .score_features(features, logits))")
        return self.model

    @property
    def net(self):
        return self.require_model().net

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch → normalised float input of the scored model."""
        return self.require_model().prepare(x)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.require_model().logits(x)

    @torch.no_grad()
    def accuracy(self, imageset, batch_size: int = 500):
        """Test accuracy, or None when the model's classes are not the set's (e.g. an ImageNet model)."""
        model = self.require_model()
        if imageset.labels is None or model.num_classes != imageset.num_classes:
            return None
        correct = sum((model.logits(x.to(self.device)).argmax(1) == y.to(self.device)).sum().item()
                      for x, y in imageset.batches(batch_size))
        return correct / max(1, len(imageset))

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final linear layer's weight (K, D) and bias (K,) as float32 tensors on the device: the head given to
        `fit_features`, else the model's."""
        if self.head_ is not None:
            return self.head_
        head = self.require_model().head
        if not isinstance(head, torch.nn.Linear):
            raise OODBenchError(f"{self.name} needs the model's final nn.Linear layer; this model has none (name it "
                                f"with --set model.head=LAYER_NAME, or pass head=(W, b) to fit_features)")
        bias = head.bias if head.bias is not None else torch.zeros(head.out_features)
        return head.weight.detach().float().to(self.device), bias.detach().float().to(self.device)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of (shaped) features through the model's own head."""
        weight, bias = self.head_weights()
        return features @ weight.T + bias

    # -- what subclasses implement ---------------------------------------------------------------------------------
    def fit_outputs(self, ref: dict):
        """Statistics from the reference outputs (default: none)."""
        return None

    def score_outputs(self, out: dict) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> dict:
        """The model's outputs on a uint8 batch: {"features": (B, D), "logits": (B, K)} (float32)."""
        features, logits = self.require_model().features_and_logits(x)
        return {"features": features, "logits": logits}

    def outputs_key(self) -> tuple:
        """What `outputs` computes besides the model and the set (the key of outputs shared between methods)."""
        return ("features+logits",)

    def reference_pass(self) -> tuple:
        """(name, per-batch outputs, key material) of the outputs fitted on: by default the features and logits
        every method shares; methods reading other maps name their own."""
        return "outputs", lambda x: PostHoc.outputs(self, x), ("features+logits",)

    # -- fitting --------------------------------------------------------------------------------------------------
    def fit(self, model, data=None, val=None, labels=None, *, val_labels=None, outputs=None, **sets) -> "PostHoc":
        """Fit the statistics on `data` (the ID training images; `val` for methods fitted on a validation split).

        `data`/`val`: anything `oodbench.data.as_imageset` takes (tensors, arrays, Datasets, DataLoaders, specs);
        `labels`/`val_labels` label tensors when the images come without. `outputs(method, imageset, name, fn,
        material)` may supply the reference outputs already computed (the workflow's cache). Returns self."""
        self.use_model(model)
        if self.fit_on is None:
            self.fitted_ = True
            return self
        source = {"train": (data, labels), "val": (val, val_labels)}[self.fit_on]
        if source[0] is None:
            what = "a validation split: pass val=" if self.fit_on == "val" else "the ID training images"
            raise OODBenchError(f"{self.name} fits on {what} (fit(model, data, val=...))")
        imageset = _as_imageset(source[0], source[1], self.device, f"{self.name} fit data")
        return self.fit_reference(self.reference_outputs(imageset, outputs))

    def reference_outputs(self, imageset, outputs=None) -> dict:
        """The reference pass over `imageset` with its labels, as float32 tensors on the device."""
        if self.needs_labels and imageset.labels is None:
            raise OODBenchError(f"{self.name} needs class labels of its fit set ({imageset.name} has none): pass "
                                f"labels=... or a labelled dataset")
        stem, fn, material = self.reference_pass()
        arrays = (outputs or _compute)(self, imageset, stem, fn, material)
        ref = {k: torch.as_tensor(v, device=self.device).float() for k, v in arrays.items() if k != "labels"}
        labels = imageset.labels
        ref["labels"] = None if labels is None else torch.as_tensor(labels).to(self.device)
        return ref

    def fit_reference(self, ref: dict) -> "PostHoc":
        """Fit on reference outputs already computed ({"features", "logits", "labels", ...})."""
        if self.needs_labels and ref.get("labels") is None:
            raise OODBenchError(f"{self.name} needs class labels of its fit set: pass labels=...")
        self.stats_ = self.fit_outputs(ref)
        self.fitted_ = True
        return self

    def fit_features(self, features, logits, labels=None, head=None) -> "PostHoc":
        """Fit on arrays: penultimate features (N, D), logits (N, K), labels (N,) where the method needs them;
        `head=(W, b)` for methods that read the head's weights when no model is bound."""
        self._check_array_level("fit_features")
        if head is not None:
            self.head_ = tuple(torch.as_tensor(t, dtype=torch.float32, device=self.device) for t in head)
        ref = _arrays(self.name, features, logits, self.device)
        ref["labels"] = None if labels is None else _labels(self.name, labels, len(ref["logits"]), self.device)
        if self.fit_on is None:
            self.fitted_ = True
            return self
        return self.fit_reference(ref)

    # -- scoring --------------------------------------------------------------------------------------------------
    def require_fitted(self) -> None:
        if not self.fitted_:
            raise NotFittedError(f"{self.name} is not fitted: call .fit(model, data) (or .fit_features(features, "
                                 f"logits, labels)) first, or load a fitted state with .load_state_dict(state)")

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """OOD scores (B,) of a uint8 (B, C, H, W) batch (or floats in [0, 1]), higher = more OOD."""
        self.require_fitted()
        x = _batch(self.name, x, self.device)
        return self.score_outputs(self.outputs(x))

    def score_rows(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every row this method reports from one batch ({name: (B,)})."""
        return {self.name: self.score(x)}

    def score_features(self, features, logits) -> torch.Tensor:
        """OOD scores (B,) of precomputed penultimate features (B, D) and logits (B, K)."""
        self._check_array_level("score_features")
        self.require_fitted()
        return self.score_outputs(_arrays(self.name, features, logits, self.device))

    def score_set(self, imageset, batch_size: int = 500, outputs=None) -> Dict[str, torch.Tensor]:
        """{row: (N,) scores} of a whole set. The model's outputs on it are shared by every method that reads the
        same outputs (`outputs`, default: this process's memo), so 20 methods on one set cost one network pass."""
        self.require_fitted()
        arrays = (outputs or _compute)(self, imageset, "scored", self.outputs, self.outputs_key(), batch_size)
        return {self.name: self.score_outputs({k: torch.as_tensor(v, device=self.device) for k, v in arrays.items()})}

    def _check_array_level(self, what: str) -> None:
        if not self.array_level:
            raise OODBenchError(f"{self.name} reads more than the penultimate features and logits (intermediate maps "
                                f"or input gradients); {what} cannot serve it: use .fit(model, data) and .score(x)")

    # -- hooks for the evaluation ---------------------------------------------------------------------------------
    def row_notes(self, id_scores: dict) -> dict:
        """{row: [caveat]} the report shows beside this method's rows (default: none)."""
        return {}

    def extra_metrics(self, id_scores: dict, ood_scores: dict) -> dict:
        """Numbers reported beside each metrics row (default: none)."""
        return {}

    # -- fitted state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Options and fitted state as plain tensors, numbers, strings, lists, tuples and dicts."""
        return {"method": self.name, "options": dict(self.options), "fitted": bool(self.fitted_),
                "stats": _move(self.stats_, "cpu"), "head": _move(self.head_, "cpu")}

    def load_state_dict(self, state: dict) -> "PostHoc":
        if not isinstance(state, dict) or state.get("method") != self.name:
            found = state.get("method") if isinstance(state, dict) else type(state).__name__
            raise OODBenchError(f"this state is not a fitted {self.name} (it holds {found!r})")
        self.options = self.check_options(state.get("options") or {}, defaults=True)
        self.stats_, self.head_ = _move(state.get("stats"), self.device), _move(state.get("head"), self.device)
        self.fitted_ = bool(state.get("fitted"))
        return self

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({options})" + ("" if self.fitted_ else " (not fitted)")


class LogitScore(PostHoc):
    """A score of the logits alone (works for models without a features/head split)."""

    fit_on = None

    @torch.no_grad()
    def outputs(self, x):
        return {"logits": self.logits(x)}

    def outputs_key(self):
        return ("logits",)

    def score_outputs(self, out):
        return self.score_logits(out["logits"])

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
class OutputMemo:
    """Per-set model outputs kept in this process, least recently used dropped first past `budget` bytes
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


def memo_key(method: PostHoc, imageset, material) -> tuple:
    return (method.require_model().digest, imageset.fingerprint, len(imageset), *material)


def shared_outputs(method: PostHoc, imageset, stem: str, fn: Callable, material, batch_size: int = 500) -> dict:
    """`fn` over a whole set, shared in this process (SET_OUTPUTS) by every method reading the same outputs; a
    logits-only method reuses the logits of a features+logits pass already made."""
    key = memo_key(method, imageset, tuple(material))
    arrays = SET_OUTPUTS.get(key)
    if arrays is None and tuple(material) == ("logits",):
        both = SET_OUTPUTS.get(memo_key(method, imageset, ("features+logits",)))
        arrays = None if both is None else {"logits": both["logits"]}
    if arrays is None:
        arrays = outputs_of(fn, imageset, method.name, batch_size, method.device)
        SET_OUTPUTS.put(key, arrays)
    return arrays


def _compute(method, imageset, stem, fn, material, batch_size: int = 500) -> dict:
    return shared_outputs(method, imageset, stem, fn, material, batch_size)


def outputs_of(fn, imageset, name: str, batch_size: int = 500, device=None) -> dict:
    """`fn(x)` (a dict of tensors per uint8 batch) over a whole set → {key: numpy float32 array}."""
    chunks: dict = {}
    total = -(-len(imageset) // batch_size)
    for x, _ in progress.bar(imageset.batches(batch_size), total=total, desc=f"{name}: outputs on {imageset.name}",
                             unit="batch", leave=False):
        for k, v in fn(x if device is None else x.to(device)).items():
            chunks.setdefault(k, []).append(v.float().cpu().numpy())
    if not chunks:
        raise OODBenchError(f"{name}: the set {imageset.name!r} has no images")
    return {k: np.concatenate(v) for k, v in chunks.items()}


def _as_imageset(data, labels, device, what: str):
    from oodbench.data import as_imageset

    return as_imageset(data, labels=labels, name=what, device=device)


def _move(obj, device):
    """Tensors inside nested tuples/lists/dicts moved to `device` (numbers and strings as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _arrays(name: str, features, logits, device) -> dict:
    out = {}
    for key, value, dim in (("features", features, 2), ("logits", logits, 2)):
        t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
        if t.dim() != dim or not t.is_floating_point():
            raise OODBenchError(f"{name}: {key} must be a float array (N, {'D' if key == 'features' else 'K'}), got "
                                f"{t.dtype} {tuple(t.shape)}")
        out[key] = t.detach().to(device).float()
    if len(out["features"]) != len(out["logits"]):
        raise OODBenchError(f"{name}: {len(out['features'])} feature rows but {len(out['logits'])} logit rows")
    return out


def _labels(name: str, labels, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if t.dim() != 1 or len(t) != n or t.is_floating_point() or t.dtype == torch.bool:
        raise OODBenchError(f"{name}: labels must be {n} integers (one per row), got {t.dtype} {tuple(t.shape)}")
    return t.to(device).long()


def _batch(name: str, x, device) -> torch.Tensor:
    """A uint8 (B, C, H, W) batch on `device`; floats in [0, 1] are converted, anything else refused."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() != 4:
        raise OODBenchError(f"{name}.score takes a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise OODBenchError(f"{name}.score takes uint8 images or floats in [0, 1], got {x.dtype}")
        lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
        if lo < 0 or hi > 1:
            raise OODBenchError(f"{name}.score: float images must be in [0, 1] before normalisation (the model's "
                                f"wrapper normalises), got values in [{lo:.3g}, {hi:.3g}]")
        x = (x * 255).round().to(torch.uint8)
    return x.to(device)


def energy(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp of the logits: the free energy's negative (higher = in-distribution)."""
    return torch.logsumexp(logits, dim=1)


def subspace_dim(name: str, dim: int, features: int) -> int:
    """The principal-subspace size used by ViM / Residual: `dim`, or D//2 when the features have ≤ dim dimensions
    (as pytorch-ood does; a 512-dimensional default cannot leave a residual in 128-dimensional features)."""
    if dim <= 0:
        raise OODBenchError(f"{name}.dim must be a positive integer, got {dim}")
    return dim if dim < features else features // 2


def chosen_split(det, key: str = "fit_split") -> str:
    """The ID split a method with a `fit_split` option fits on: "train" or "val"."""
    split = det.options[key]
    if split not in ("train", "val"):
        raise OODBenchError(f"{det.name}.{key} is 'train' or 'val', got {split!r}")
    return split
