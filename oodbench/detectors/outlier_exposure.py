"""The seed's classifier training variants beyond plain cross-entropy.

- `bce_onehot_loss`: binary cross-entropy on one-hot targets (the seed's `resnet_bce`), for `train.loss=bce`.
- `finetune_with_outliers`: energy-based outlier exposure (Liu et al. 2020, as in the seed's `train_energy.py`):
  fine-tune a trained classifier on batches of 128 in-distribution + 256 auxiliary outlier images with
  loss = CE + weight * [mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2], E = -logsumexp(logits).
  SGD Nesterov, lr 1e-3, cosine schedule, 10 epochs of the in-distribution set (`oe:` in configs/classifier.yaml).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.data.imageset import ImageSet
from oodbench.errors import OODBenchError


def bce_onehot_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every logit against the one-hot target (each class an independent sigmoid)."""
    targets = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets)


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Free energy E(x) = -logsumexp(logits): low for in-distribution after outlier exposure."""
    return -torch.logsumexp(logits.float(), dim=1)


def energy_oe_loss(logits: torch.Tensor, labels: torch.Tensor, m_in: float, m_out: float,
                   weight: float) -> tuple[torch.Tensor, dict]:
    """CE on the first len(labels) rows (in-distribution) + weight * squared hinge on both sets' energies.

    The rows after the first len(labels) are the outliers. Returns (loss, {ce, e_in, e_out}) for the log.
    """
    n = len(labels)
    id_logits, out_logits = logits[:n], logits[n:]
    ce = F.cross_entropy(id_logits.float(), labels)
    e_in, e_out = energy(id_logits), energy(out_logits)
    hinge = F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()
    stats = {"ce": ce.detach(), "e_in": e_in.mean().detach(), "e_out": e_out.mean().detach()}  # no sync per step
    return ce + weight * hinge, stats


class OutlierFeed:
    """`step -> (images, labels)`: `id_batch` in-distribution images followed by `outlier_batch` outlier images.

    Both sets live on the device; each is drawn from its own seeded per-epoch permutation, so the batch at a step
    depends only on (seed, step) and a resumed run sees the same batches.
    """

    def __init__(self, train: ImageSet, outliers: ImageSet, id_batch: int, outlier_batch: int, seed: int,
                 rank: int = 0, world: int = 1):
        from oodbench.engine.loop import EpochSampler

        if train.labels is None:
            raise OODBenchError(f"outlier exposure needs a labelled in-distribution set; {train.name!r} has no labels")
        if outliers.shape != train.shape:
            raise OODBenchError(
                f"outlier set {outliers.name!r} has images of shape {outliers.shape}, the in-distribution set "
                f"{train.name!r} {train.shape}; load the outliers converted to the in-distribution shape "
                f"(oodbench.data.load(..., like={train.shape}))")
        if len(outliers) == 0:
            raise OODBenchError(f"outlier set {outliers.name!r} is empty; name a non-empty set in oe.outliers")
        self.train, self.outliers = train, outliers
        self.id_sampler = EpochSampler(len(train), id_batch, seed, rank, world)
        self.out_sampler = EpochSampler(len(outliers), outlier_batch, seed + 7919, rank, world)

    @property
    def steps_per_epoch(self) -> int:
        """Steps per pass over the in-distribution set."""
        return self.id_sampler.per_epoch

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        id_idx = self.id_sampler.indices(step).to(self.train.device)
        out_idx = self.out_sampler.indices(step).to(self.outliers.device)
        images = torch.cat([self.train.images[id_idx], self.outliers.images[out_idx]])
        return images, self.train.labels[id_idx]


def finetune_with_outliers(engine, net: nn.Module, prepare: Callable[[torch.Tensor], torch.Tensor],
                           train: ImageSet, outliers: ImageSet, cfg: dict) -> nn.Module:
    """Energy outlier-exposure fine-tuning of a trained classifier (checkpoints under `checkpoints/oe/`).

    `prepare` maps uint8 images to the network's input; `cfg` is the resolved classifier config (its `oe:` section
    holds the settings; `train:` the checkpoint/log/amp settings and the augmentation, which is the classifier's own
    (`train.augment`, applied to in-distribution and outlier images alike, as the seed did). Returns the fine-tuned
    network in eval mode.
    """
    from oodbench.data.transforms import augment
    from oodbench.engine import TrainSpec

    opts = cfg["oe"]
    train, outliers = train.to(engine.device), outliers.to(engine.device)
    feed = OutlierFeed(train, outliers, int(opts["id_batch"]), int(opts["outlier_batch"]), engine.seed,
                       engine.rank, engine.world_size)
    how, padding = cfg["train"]["augment"], int(cfg["train"]["crop_padding"])
    steps = max(1, math.ceil(float(opts["epochs"]) * feed.steps_per_epoch))
    spec = TrainSpec.from_cfg({
        **cfg["train"], "steps": steps, "batch_size": int(opts["id_batch"]), "optimizer": "sgd",
        "lr": float(opts["lr"]), "momentum": float(opts["momentum"]), "nesterov": bool(opts["nesterov"]),
        "weight_decay": float(opts["weight_decay"]), "schedule": "cosine", "warmup": 0, "ema": 0.0,
    })
    m_in, m_out, weight = float(opts["m_in"]), float(opts["m_out"]), float(opts["weight"])

    def loss_fn(model, batch):
        images, labels = batch
        return energy_oe_loss(model(prepare(augment(images, how, padding))), labels, m_in, m_out, weight)

    return engine.fit("oe", net, loss_fn, feed, spec)
