"""Likelihood ratio with PixelCNN++ (Ren et al., NeurIPS 2019) and the plain likelihood baseline.

One run (kind "llr") trains a foreground PixelCNN++ on the data and a grid of background PixelCNN++ models on
perturbed data (each pixel-channel replaced with probability mu by a uniform 0..255 value, redrawn every step, plus
an L2 penalty lambda * sum(w^2) over weights; `llr.background_l2=released`, the paper preset, leaves it out as
the released code does). The background model with the best validation AUROC of the ratio
(held-out `val` split vs the validation OOD set `llr.val_ood`, never a test split: `data.validation`) is kept.

Rows, all "higher = more OOD": `llr` = -(log p_fg - log p_bg), `likelihood` = -log p_fg; `_bpd` is the foreground's
bits per dimension. Method "llr" reports all three from one pass; method "likelihood" reports the baseline only.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Dict, Optional

import numpy as np
import torch

from oodbench.detectors.base import Detector, register
from oodbench.engine import TrainSpec
from oodbench.errors import OODBenchError
from oodbench.metrics import evaluate
from oodbench.nets.pixelcnnpp import INITS, PixelCNNpp
from oodbench.tables import rows_to_csv

NET_KEYS = ("num_filters", "num_resnet", "num_hierarchies", "num_logistic_mix", "dropout_p")


# --- training pieces -------------------------------------------------------------------------------------------
def mutate(x: torch.Tensor, rate: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Replace each pixel-channel of a uint8 batch with probability `rate` by a uniform value in 0..255 (on x's device)."""
    if rate <= 0:
        return x
    replace = torch.rand(x.shape, device=x.device, generator=generator) < rate
    noise = torch.randint(0, 256, x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return torch.where(replace, noise, x)


def l2_penalty(model: torch.nn.Module) -> torch.Tensor:
    """sum(w^2) over weight tensors (convolution kernels), biases excluded."""
    return sum(p.pow(2).sum() for p in model.parameters() if p.ndim > 1)


BACKGROUND_L2 = ("applied", "released")
FG_CHECKPOINTS = ("best", "final")


def background_l2(options: dict) -> str:
    """llr.background_l2: `applied` (the paper: + lambda * sum(w^2)) | `released` (the released code, whose L2 term
    never reaches the loss, so every lambda trains as lambda = 0)."""
    value = options.get("background_l2") or "applied"
    if value not in BACKGROUND_L2:
        raise OODBenchError(f"llr.background_l2={value!r}: use applied (the paper's L2 penalty) or released (the "
                            f"released code's, which has no effect)")
    return value


def fg_checkpoint(options: dict) -> str:
    """llr.fg_checkpoint: `best` (the foreground at its best clean-validation bits/dim) | `final` (its last step, as
    the original's eval.py, which reads every model at the last --ckpt_step)."""
    value = options.get("fg_checkpoint") or "best"
    if value not in FG_CHECKPOINTS:
        raise OODBenchError(f"llr.fg_checkpoint={value!r}: use best (the best validation bits/dim) or final (the "
                            f"last step, as the original)")
    return value


def likelihood_loss(mutation_rate: float, reg_weight: float, l2: str = "applied"):
    """loss_fn(model, batch) = -mean log p(mutate(x)) + reg_weight * sum(w^2) (`l2="released"`: the penalty is
    left out, as in the released code); the perturbation is redrawn per call."""

    def loss_fn(model, batch):
        x = mutate(batch[0], mutation_rate)
        nll = -model(x).mean()
        if reg_weight == 0 or l2 == "released":
            return nll, {"nll": nll.detach()}
        penalty = l2_penalty(model)
        return nll + reg_weight * penalty, {"nll": nll.detach(), "l2": penalty.detach()}

    return loss_fn


def bits_per_dim(log_p: torch.Tensor, dims: int) -> torch.Tensor:
    """Per-image -log2 p / number of pixel-channels."""
    return -log_p / (dims * math.log(2))


def check_8bit(x: torch.Tensor, where: str) -> None:
    """PixelCNN++ models 8-bit pixels: uint8, or integer values in 0..255."""
    if x.dtype == torch.uint8:
        return
    if x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        if x.numel() and (x.min() < 0 or x.max() > 255 or (x.is_floating_point() and (x != x.round()).any())):
            raise OODBenchError(f"{where}: PixelCNN++ needs 8-bit images (integers 0..255), got {x.dtype} values "
                                f"in [{float(x.min()):g}, {float(x.max()):g}]; pass uint8 images")
        return
    raise OODBenchError(f"{where}: PixelCNN++ needs 8-bit images, got dtype {x.dtype}; pass uint8 images")


def background_grid(options: dict) -> list:
    """[(mutation_rate, reg_weight), ...] after validation of both lists."""
    rates, weights = list(options.get("mutation_rates") or []), list(options.get("reg_weights") or [])
    if not rates or not weights:
        raise OODBenchError("llr.mutation_rates and llr.reg_weights must each list at least one value, "
                            "e.g. --set llr.mutation_rates=[0.1,0.2] --set llr.reg_weights=[0,10]")
    for mu in rates:
        if not 0 <= float(mu) <= 1:
            raise OODBenchError(f"llr.mutation_rates: {mu} is not a probability; use values in [0, 1]")
    for lam in weights:
        if float(lam) < 0:
            raise OODBenchError(f"llr.reg_weights: {lam} is negative; use values >= 0")
    return [(float(mu), float(lam)) for mu in rates for lam in weights]


def background_name(mutation_rate: float, reg_weight: float) -> str:
    return f"bg-mu{mutation_rate:g}-l{reg_weight:g}"


@torch.no_grad()
def log_prob(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """log p(x) per image (nats), in batches, model in eval mode; images are never perturbed here."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


# --- the detector ----------------------------------------------------------------------------------------------
class LikelihoodRatioRun(Detector):
    """Trains the foreground model and the background grid once (kind "llr"); both methods score this run."""

    kind = "llr"
    training_keys = ("llr",)            # the background-model grid and its validation selection
    dataset_keys = ("llr.val_ood",)

    @property
    def llr_options(self) -> dict:
        return self.cfg.get("llr", {}) or {}

    @staticmethod
    def check_config(cfg: dict) -> None:
        """The llr options and model.init, checked before any data is loaded (one-line errors)."""
        opts = cfg.get("llr", {}) or {}
        background_grid(opts), background_l2(opts), fg_checkpoint(opts)
        init = cfg["model"].get("init") or "torch"
        if init not in INITS:
            raise OODBenchError(f"model.init={init!r}: use torch (PyTorch's defaults) or keras (the released "
                                f"network's Glorot-uniform kernels and zero biases)")

    def net_config(self, channels: int) -> dict:
        mc = self.cfg["model"]
        return {"in_channels": int(channels), "rescale": bool(mc["rescale_pixel_value"]),
                "ones_channel": bool(mc.get("ones_channel", True)), "init": str(mc.get("init") or "torch"),
                **{k: (float if k == "dropout_p" else int)(mc[k]) for k in NET_KEYS}}

    def build(self) -> PixelCNNpp:
        return PixelCNNpp(**self.net_config_)

    def train(self, train, val, engine) -> None:
        opts = self.llr_options
        grid, l2, fg_ckpt = background_grid(opts), background_l2(opts), fg_checkpoint(opts)
        check_8bit(train.images, f"training set {train.name!r}")
        batch = int(opts.get("eval_batch_size", 256))
        limit = opts.get("val_limit")
        val_in = None if val is None or len(val) == 0 else val.head(limit).images.to(engine.device)
        val_ood = self.load_val_ood(train, val, engine)
        if len(grid) > 1 and (val_in is None or val_ood is None):
            raise OODBenchError(f"{len(grid)} background models need a validation pair to choose from: set "
                                f"llr.val_ood (e.g. hflip:fashion_mnist) and data.val_fraction > 0, or give one "
                                f"mutation rate and one reg weight")
        if val_ood is not None:
            val_ood = val_ood.head(limit).images
        self.net_config_ = self.net_config(train.shape[0])
        spec = TrainSpec.from_cfg(self.cfg["train"])

        val_fn = None
        if val_in is not None and fg_ckpt == "best":
            def val_fn(model):     # clean held-out data, lower is better (bits per dimension)
                return float(bits_per_dim(log_prob(model, val_in, batch), val_in[0].numel()).mean())
        self.fg = engine.fit("fg", self.build(), likelihood_loss(0.0, 0.0), train, spec, val_fn=val_fn).eval()

        fg_in = fg_ood = None
        if val_ood is not None and val_in is not None:
            fg_in, fg_ood = log_prob(self.fg, val_in, batch), log_prob(self.fg, val_ood, batch)
        rows, best = [], None
        for mu, lam in grid:
            bg = engine.fit(background_name(mu, lam), self.build(), likelihood_loss(mu, lam, l2), train, spec).eval()
            row = {"mutation_rate": mu, "reg_weight": lam, "val_auroc": None}
            if fg_in is not None:
                llr_in = -(fg_in - log_prob(bg, val_in, batch))
                llr_ood = -(fg_ood - log_prob(bg, val_ood, batch))
                row["val_auroc"] = evaluate(llr_in.cpu().numpy(), llr_ood.cpu().numpy())["auroc"]
            rows.append(row)
            if best is None or (row["val_auroc"] or 0) > (best[0]["val_auroc"] or 0):
                best = (row, bg)
        self.bg = best[1]
        self.selected = {"mutation_rate": best[0]["mutation_rate"], "reg_weight": best[0]["reg_weight"]}
        self.selection = rows
        if fg_in is not None:
            auroc = evaluate((-fg_in).cpu().numpy(), (-fg_ood).cpu().numpy())["auroc"]
            self.selection_baseline = {"likelihood_val_auroc": auroc}
        else:
            self.selection_baseline = {"likelihood_val_auroc": None}
        if engine.is_main:
            print(format_selection(self.selection, self.selected, getattr(self, "val_ood_spec", None),
                                   self.selection_baseline["likelihood_val_auroc"]), file=sys.stderr)

    def load_val_ood(self, train, val, engine):
        """`llr.val_ood` ({in} = data.in) through `data.validation.validation_ood`: a set derived from the
        in-distribution dataset is built from its validation split (gray:cifar10 = the grayscale validation tail, as
        the original), any other from its training split; never a test split."""
        spec = self.llr_options.get("val_ood")
        if not spec:
            return None
        from oodbench.data import load
        from oodbench.data.validation import validation_ood

        d = self.cfg.get("data", {})
        spec = str(spec).replace("{in}", str(d.get("in", "")))
        self.val_ood_spec = spec

        def load_train_split(name, like):
            return load(name, "train", root=d.get("root"), device=engine.device, like=like)

        return validation_ood(spec, str(d.get("in", "")), val, load_train_split, train.shape)

    def artifacts(self) -> Dict[str, str]:
        """The background-model selection table, written by the workflow into the run folder as
        llr_selection.csv / .json."""
        summary = {"val_ood": getattr(self, "val_ood_spec", None), "selected": self.selected,
                   "table": self.selection, **self.selection_baseline}
        return {"llr_selection.csv": rows_to_csv([{**row, "selected": self.is_selected(row)}
                                                  for row in self.selection]),
                "llr_selection.json": json.dumps(summary, indent=2)}

    def is_selected(self, row) -> bool:
        return (row["mutation_rate"], row["reg_weight"]) == (self.selected["mutation_rate"],
                                                              self.selected["reg_weight"])

    # --- scoring ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_probs(self, x: torch.Tensor, background: bool = True):
        check_8bit(x, "scored batch")
        fg = self.fg(x).float()
        return fg, (self.bg(x).float() if background else None)

    def score_rows(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        fg, bg = self.log_probs(x, background=True)
        return {"llr": -(fg - bg), "likelihood": -fg, "_bpd": bits_per_dim(fg, x[0].numel())}

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_rows(x)[self.name]

    # --- state -----------------------------------------------------------------------------------------------
    def extra_metrics(self, id_scores: dict, ood_scores: dict) -> dict:
        """Mean bits per dimension of both sets beside the rows."""
        return {"id_bpd": float(np.mean(id_scores["_bpd"])), "out_bpd": float(np.mean(ood_scores["_bpd"]))}

    def state_dict(self) -> dict:
        return {"net": dict(self.net_config_), "fg": self.fg.state_dict(), "bg": self.bg.state_dict(),
                "selected": dict(self.selected), "selection": [dict(r) for r in self.selection],
                "val_ood": getattr(self, "val_ood_spec", None), **self.selection_baseline}

    def load_state_dict(self, state: dict) -> None:
        self.net_config_ = dict(state["net"])
        self.fg, self.bg = self.build().to(self.device), self.build().to(self.device)
        self.fg.load_state_dict(state["fg"])
        self.bg.load_state_dict(state["bg"])
        self.fg.eval()
        self.bg.eval()
        self.selected, self.selection = dict(state["selected"]), [dict(r) for r in state["selection"]]
        self.selection_baseline = {"likelihood_val_auroc": state.get("likelihood_val_auroc")}
        self.val_ood_spec = state.get("val_ood")


def format_selection(rows, selected, val_ood, baseline_auroc) -> str:
    """The background-model selection table as text."""
    lines = [f"LLR background selection on val vs {val_ood or '(no validation OOD set)'}:",
             "  mutation_rate  reg_weight  val_auroc"]
    for r in rows:
        auroc = "-" if r["val_auroc"] is None else f"{r['val_auroc']:.4f}"
        mark = "  <- selected" if (r["mutation_rate"], r["reg_weight"]) == (
            selected["mutation_rate"], selected["reg_weight"]) else ""
        lines.append(f"  {r['mutation_rate']:13g}  {r['reg_weight']:10g}  {auroc:>9}{mark}")
    if baseline_auroc is not None:
        lines.append(f"  (plain likelihood on the same pair: {baseline_auroc:.4f})")
    return "\n".join(lines)


@register("llr")
class LikelihoodRatio(LikelihoodRatioRun):
    summary = "likelihood ratio log p_fg - log p_bg of two PixelCNN++ (Ren et al. 2019); also reports likelihood"


@register("likelihood")
class Likelihood(LikelihoodRatioRun):
    summary = "plain PixelCNN++ likelihood -log p(x) (the baseline of Ren et al. 2019; scores the llr run)"

    def score_rows(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        fg, _ = self.log_probs(x, background=False)
        return {"likelihood": -fg, "_bpd": bits_per_dim(fg, x[0].numel())}
