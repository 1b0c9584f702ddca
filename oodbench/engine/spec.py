"""TrainSpec: the training settings every method shares (the `train:` section of a config)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from oodbench.engine.precision import AMP_MODES
from oodbench.errors import OODBenchError


@dataclass
class TrainSpec:
    steps: int = 1000
    batch_size: int = 128
    optimizer: str = "adam"          # adam | sgd
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8                # Adam's epsilon (PyTorch's default; Keras' is 1e-7)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"       # constant | multistep | cosine | exponential
    milestones: list = field(default_factory=list)   # steps at which multistep multiplies the lr by gamma
    gamma: float = 0.1               # multistep factor, or per-step factor for exponential
    warmup: int = 0                  # linear warm-up steps
    ema: float = 0.0                 # EMA decay of the weights; 0 = off
    grad_clip: float = 0.0           # max global grad norm; 0 = off
    ckpt_every: int = 1000
    max_to_keep: int = 2
    eval_every: int = 1000           # steps between val_fn evaluations
    amp: str = "auto"                # auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16
    log_every: int = 50

    @classmethod
    def from_cfg(cls, cfg: dict) -> "TrainSpec":
        """Build from a config's `train:` section; keys that are not TrainSpec fields are ignored (method-specific)."""
        names = {f.name for f in dataclasses.fields(cls)}
        spec = cls(**{k: v for k, v in cfg.items() if k in names})
        spec.betas = tuple(spec.betas)
        spec.validate()
        return spec

    def validate(self) -> None:
        checks = [
            (self.steps >= 0, "train.steps must be >= 0"),
            (self.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.eps > 0, "train.eps must be > 0"),
            (self.optimizer in ("adam", "sgd"), f"train.optimizer {self.optimizer!r}: use adam or sgd"),
            (self.schedule in ("constant", "multistep", "cosine", "exponential"),
             f"train.schedule {self.schedule!r}: use constant, multistep, cosine or exponential"),
            (self.lr > 0, "train.lr must be > 0"),
            (0 <= self.ema < 1, "train.ema must be in [0, 1) (0 turns EMA off)"),
            (self.ckpt_every >= 1, "train.ckpt_every must be >= 1"),
            (self.amp in AMP_MODES, f"train.amp {self.amp!r}: use auto, off, bf16 or fp16"),
        ]
        for ok, message in checks:
            if not ok:
                raise OODBenchError(message)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base lr at `step` (a pure function of the step, so resuming is exact)."""
        f = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.schedule == "multistep":
            f *= self.gamma ** sum(step >= m for m in self.milestones)
        elif self.schedule == "cosine":
            f *= 0.5 * (1 + math.cos(math.pi * min(step, self.steps) / max(1, self.steps)))
        elif self.schedule == "exponential":
            f *= self.gamma ** step
        return f

    def optimizer_for(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                    weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                               weight_decay=self.weight_decay)
