"""Uncertainty baselines on a trained classifier: MC-dropout (Gal & Ghahramani 2016) and gradient uncertainty
(Igoe et al. 2020).

- `mcdropout`: T stochastic passes with the model's own dropout layers active (the rest of the network, BatchNorm
  included, stays in evaluation mode), as pytorch-ood's `MCD`; or, with `where=features`, OpenOOD's `dropout`
  postprocessor: one network pass, then T dropout masks on the penultimate features through the head. Scores:
  `mean_logits` (OpenOOD: −max softmax of the mean logits), `mean_softmax` (pytorch-ood `mode="mean"`: −max of the
  mean softmax) or `var` (pytorch-ood `mode="var"`: the class-averaged variance, Bessel-corrected, of the T softmax
  outputs). The masks are drawn from `seed` in every scored call (a batch, or a whole set of precomputed features).
- `graduncertainty`: per sample, Σ over parameters of ||∂ BCE(softmax(f(x)), 1) / ∂θ||², negated (pytorch-ood's
  `GradUncertainty`: confident predictions have large gradients). `params=all` differentiates every parameter with
  torch.func (vmap over grad, micro-batched as gradlayer is); `params=head` only the final linear layer, in closed
  form: the logit gradient is C·p − 1, so the score is −||C·p − 1||² (||h||² + 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from oodbench.detectors.base import Option, register
from oodbench.detectors.gradients import auto_micro_batch, memory_budget_mb
from oodbench.detectors.posthoc import PostHoc, _arrays
from oodbench.errors import OODBenchError


def dropout_layers(net: nn.Module) -> list:
    """The dropout modules of `net` that drop anything (p > 0)."""
    return [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def mc_softmax_stats(probs: torch.Tensor, score: str) -> torch.Tensor:
    """OOD score (B,) of T passes' softmax outputs (B, T, K) for `mean_softmax` or `var`."""
    if score == "var":
        return probs.var(dim=1).mean(1)
    return -probs.mean(1).amax(1)


def _seeded(device):
    return torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else [])


@register("mcdropout")
class MCDropout(PostHoc):
    summary = "MC-dropout: T stochastic passes with dropout active, -max softmax of the mean logits " \
              "(Gal & Ghahramani 2016)"
    OPTIONS = {
        "passes": Option(5, "T stochastic passes (OpenOOD dropout.yml: 5; pytorch-ood MCD: 30)"),
        "where": Option("model", "model = the model's own dropout layers (pytorch-ood MCD) | features = dropout on "
                                 "the penultimate features, one network pass (OpenOOD's forward_with_dropout)"),
        "p": Option(0.5, "drop probability of where=features (OpenOOD dropout_p)"),
        "score": Option("mean_logits", "mean_logits (OpenOOD) | mean_softmax (pytorch-ood mode=mean) | var "
                                       "(pytorch-ood mode=var)"),
        "seed": Option(0, "seed of the dropout masks, drawn again in every scored call"),
    }
    fit_on = None
    array_level = False   # where=model runs the network T times; where=features also scores from arrays

    def check(self) -> None:
        o = self.options
        if int(o["passes"]) < 1 or (o["score"] == "var" and int(o["passes"]) < 2):
            raise OODBenchError(f"mcdropout.passes must be >= 1 (>= 2 for score=var), got {o['passes']}")
        if o["where"] not in ("model", "features"):
            raise OODBenchError(f"mcdropout.where is model or features, got {o['where']!r}")
        if o["score"] not in ("mean_logits", "mean_softmax", "var"):
            raise OODBenchError(f"mcdropout.score is mean_logits, mean_softmax or var, got {o['score']!r}")
        if not 0.0 <= float(o["p"]) < 1.0:
            raise OODBenchError(f"mcdropout.p is a probability in [0, 1), got {o['p']}")

    def fit(self, model, data=None, val=None, labels=None, **kwargs) -> "MCDropout":
        """Check the options and that the model has dropout to activate (where=model); nothing is fitted."""
        self.use_model(model)
        self.check()
        if self.options["where"] == "model" and not dropout_layers(self.net):
            raise OODBenchError(f"mcdropout: model {self.model.name} has no dropout layer (nn.Dropout with p > 0) to "
                                f"activate; score a model trained with dropout (e.g. oodbench train --set "
                                f"model.arch=wrn40_2 --set model.dropout=0.3), or set mcdropout.where=features "
                                f"(OpenOOD's dropout on the penultimate features)")
        self.fitted_ = True
        return self

    def fit_features(self, features, logits, labels=None, head=None) -> "MCDropout":
        self.check()
        if self.options["where"] != "features":
            self._check_array_level("fit_features")
        return PostHoc.fit_features(self, features, logits, labels, head)

    def score_features(self, features, logits) -> torch.Tensor:
        if self.options["where"] != "features":
            self._check_array_level("score_features")
        self.require_fitted()
        return self.score_outputs(_arrays(self.name, features, logits, self.device))

    @torch.no_grad()
    def outputs(self, x):
        if self.options["where"] == "features":
            return PostHoc.outputs(self, x)
        return {"mc_logits": self.passes_of(self.prepare(x))}

    def outputs_key(self):
        o = self.options
        return ("features+logits",) if o["where"] == "features" else ("mcdropout", int(o["passes"]), int(o["seed"]))

    def passes_of(self, inp: torch.Tensor) -> torch.Tensor:
        """(B, T, K) logits of T passes with the dropout layers in training mode, masks from `seed`."""
        layers = dropout_layers(self.net)
        try:
            for m in layers:
                m.train()
            with _seeded(inp.device):
                torch.manual_seed(int(self.options["seed"]))
                return torch.stack([self.net(inp).float() for _ in range(int(self.options["passes"]))], dim=1)
        finally:
            for m in layers:
                m.eval()

    def score_outputs(self, out):
        if "mc_logits" in out:
            logits = out["mc_logits"]
        else:
            p = float(self.options["p"])
            with _seeded(out["features"].device):
                torch.manual_seed(int(self.options["seed"]))
                logits = torch.stack([self.head_logits(F.dropout(out["features"], p, training=True))
                                      for _ in range(int(self.options["passes"]))], dim=1)
        if self.options["score"] == "mean_logits":
            return -logits.mean(1).softmax(1).amax(1)
        return mc_softmax_stats(logits.softmax(2), self.options["score"])


@register("graduncertainty")
class GradUncertainty(PostHoc):
    summary = "-sum of squared gradient norms of BCE(softmax, all-ones) over the parameters (Igoe et al. 2020)"
    OPTIONS = {
        "params": Option("all", "all = every parameter (pytorch-ood's default; per-sample gradients) | head = the "
                                "final linear layer only, in closed form"),
        "micro_batch": Option(0, "per-sample gradients per vmap call with params=all; 0 = from memory_mb"),
        "memory_mb": Option("auto", "MiB for one micro-batch (as gradlayer.memory_mb)"),
    }
    fit_on = None
    array_level = False   # params=all differentiates the whole network; params=head also scores from arrays

    def fit(self, model, data=None, val=None, labels=None, **kwargs) -> "GradUncertainty":
        self.use_model(model)
        if self.options["params"] not in ("all", "head"):
            raise OODBenchError(f"graduncertainty.params is all or head, got {self.options['params']!r}")
        self.fitted_ = True
        return self

    def fit_features(self, features, logits, labels=None, head=None):
        if self.options["params"] != "head":
            self._check_array_level("fit_features")
        return PostHoc.fit_features(self, features, logits, labels, head)

    def score_features(self, features, logits):
        if self.options["params"] != "head":
            self._check_array_level("score_features")
        self.require_fitted()
        return self.score_outputs(_arrays(self.name, features, logits, self.device))

    def outputs(self, x):
        if self.options["params"] == "head":
            return PostHoc.outputs(self, x)
        return {"grad_sq": self.squared_grad_norms(self.prepare(x))}

    def outputs_key(self):
        return ("features+logits",) if self.options["params"] == "head" else ("graduncertainty", "all")

    def squared_grad_norms(self, inp: torch.Tensor) -> torch.Tensor:
        """Σ_θ ||∂ BCE(softmax(f(x_i)), 1) / ∂θ||² per sample (B,), every parameter of the network."""
        net = self.net
        params = {k: v.detach() for k, v in net.named_parameters()}
        buffers = dict(net.named_buffers())

        def loss(weights, xi):
            logits = functional_call(net, (weights, buffers), (xi.unsqueeze(0),))
            probs = logits.softmax(1)
            return F.binary_cross_entropy(probs, torch.ones_like(probs), reduction="sum")

        micro = int(self.options["micro_batch"]) or auto_micro_batch(
            net, inp, list(params), memory_budget_mb(self.options["memory_mb"], inp.device))
        per_sample = vmap(grad(loss), in_dims=(None, 0))
        parts = []
        with torch.enable_grad():
            for start in range(0, len(inp), micro):
                grads = per_sample(params, inp[start:start + micro])
                parts.append(sum(g.flatten(1).square().sum(1) for g in grads.values()).detach())
        return torch.cat(parts) if parts else inp.new_zeros(0)

    def score_outputs(self, out):
        if "grad_sq" in out:
            return -out["grad_sq"]
        logits, features = out["logits"], out["features"]
        residual = logits.shape[1] * logits.softmax(1) - 1
        has_bias = self.head_ is not None or self.require_model().head.bias is not None
        return -residual.square().sum(1) * (features.square().sum(1) + float(has_bias))
