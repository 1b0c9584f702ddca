"""The two method bases' shared parts: the registry, option declarations, and the trainer base `Detector`.

Post-hoc methods (posthoc.py) are plain objects: options in the constructor, `fit` fits statistics. Trainers
(`Detector` here: classifier training, msma, llr, amp, ddpm) own networks that the training engine fits; their
options come from `configs/<kind>.yaml`.

Every detector returns OOD scores with **higher = more out-of-distribution**; a method whose own score is
"higher = in-distribution" negates it once, inside its `score`.

Methods of one *kind* share one trained run: every post-hoc method (msp, energy, knn, vim, gradnorm, ...) scores the
same classifier (kind "classifier"), trained once by that kind's trainer (`register_trainer`; the methods themselves
train nothing). The run directory is `runs/<kind>-<in>-s<seed>/` and
its config comes from `configs/<kind>.yaml`. A method's variants (MSMA's gmm/knn/flow, LLR vs plain likelihood, AMP's
score types) are rows of one `score_rows` call, not separate trainings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch

from oodbench.errors import OODBenchError


@dataclass(frozen=True)
class Option:
    """One option of a post-hoc method, declared once: its default, a line of help, the values `--tune` tries
    (OpenOOD v1.5's sweep grid; empty: not tuned) and whether its value is a dataset spec (checked before any
    work, loaded by the workflow as a validation set, never a test split). A value keeps the default's type unless
    `any_type` (the method checks it itself, e.g. a number or a list). Post-hoc options are scoring options."""

    default: object
    help: str = ""
    grid: tuple = ()
    dataset: bool = False
    any_type: bool = False


class Detector:
    """Base class. Subclasses set `kind` and `summary`, implement `fit`, `score`, `state_dict`, `load_state_dict`.

    - `__init__(cfg, device)`: `cfg` is the fully resolved config of the kind (a nested dict from
      `configs/<kind>.yaml` + preset + overrides); options of one method live under `cfg[<method name>]`.
      Networks are built in `fit` (they need the data's shape) or in `load_state_dict`.
    - `train(train, val, engine)`: train networks through `engine.fit(...)` and fit what they score with.
      `train`/`val` are ImageSets already on the device (uint8). Never sees a test OOD set.
    - `score(x)`: x is a uint8 batch (B, C, H, W) on the device; returns a float tensor (B,), higher = more OOD.
    - `score_rows(x)`: all rows this method reports from one pass, {row name: (B,) tensor}. Keys starting with
      "_" are extra per-image arrays (e.g. MSMA's (B, L) score norms) saved in the score file, not evaluated.
    - `state_dict()`: everything needed to score again, as tensors / numbers / strings / lists / dicts only
      (it is saved with torch.save and loaded with `weights_only=True`).
    """

    name: str = ""      # registry key, set by `register`
    training_keys: tuple = ()   # config keys of this kind fixed at training (beyond config.TRAINING_SECTIONS)
    dataset_keys: tuple = ()    # config keys (SECTION.NAME) whose values are dataset specs
    kind: str = ""      # training kind shared by methods that score one trained run; names configs/<kind>.yaml
    summary: str = ""   # one line for `oodbench methods`
    needs_training_images = False   # scoring draws from the ID training split (AMP's anchor pools)
    training_images = None          # handed over by the workflow (`use_training_images`), never loaded here

    def __init__(self, cfg: dict, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)

    @property
    def options(self) -> dict:
        """This method's own scoring options: `cfg[<method name>]` (empty when the config has none)."""
        if not isinstance(self.cfg.get(self.name), dict):
            self.cfg[self.name] = {}
        return self.cfg[self.name]

    def use_training_images(self, images) -> None:
        """The ID training split (an ImageSet), for methods that draw from it while scoring."""
        self.training_images = images

    def train(self, train, val, engine) -> None:
        raise NotImplementedError

    def score(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_rows(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {self.name: self.score(x)}

    def row_notes(self, id_scores: dict) -> dict:
        """{row: [caveat]} the report shows beside this method's rows (default: none)."""
        return {}

    def extra_metrics(self, id_scores: dict, ood_scores: dict) -> dict:
        """Numbers reported beside each metrics row (default: none)."""
        return {}

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def artifacts(self) -> Dict[str, str]:
        """Text files {file name: contents} the workflow writes into the run folder after training (default none)."""
        return {}


REGISTRY: Dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: `@register("msp")` makes the method available by that name."""

    def wrap(cls: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


TRAINERS: Dict[str, type] = {}


def register_trainer(kind: str) -> Callable[[type], type]:
    """Class decorator for what trains the shared run of a kind whose methods train nothing themselves (the
    classifier that the post-hoc methods score)."""

    def wrap(cls: type) -> type:
        TRAINERS[kind] = cls
        return cls

    return wrap


def trainer_for(cls: type) -> type:
    """The class whose `fit` trains the run that method class `cls` scores: its kind's trainer, or `cls` itself."""
    return TRAINERS.get(cls.kind, cls)
