"""Gradient-based OOD scores on a trained classifier (GradNorm, Huang et al. 2021, and per-layer gradient norms).

- `gradnorm`: the L1 norm of d KL(u || softmax(z/T)) / dW for the last layer's weight W. That gradient is the rank-one
  matrix (1/T)(p - u) h^T, so S(x) = (1/T) * ||h||_1 * sum_j |p_j - 1/C| (exact, batched, no backward pass).
  Higher S = in-distribution; the OOD score is -S.
- `gradlayer`: per sample, the L2 norm of d CE(f(x), argmax f(x)) / dW for every weight tensor W (BatchNorm and bias
  parameters skipped), computed with torch.func (vmap over grad) in micro-batches. A small gradient means
  in-distribution, so the norm itself is the OOD score. One row per layer, plus `gradlayer` = the layer with the best
  AUROC on a validation pair (the in-distribution validation split vs `gradlayer.val_ood`, never a test set).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import PostHoc, _as_imageset, _batch
from oodbench.errors import OODBenchError

_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def gradnorm_scores(features: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """GradNorm S(x) (higher = in-distribution) from penultimate features (B, D) and logits (B, C), in closed form."""
    if temperature <= 0:
        raise OODBenchError(f"gradnorm.temperature must be > 0, got {temperature}")
    num_classes = logits.shape[1]
    p = torch.softmax(_full(logits) / temperature, dim=1)
    return _full(features).abs().sum(1) * (p - 1.0 / num_classes).abs().sum(1) / temperature


def last_layer_grad_norm(features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """||d CE(z, argmax z) / dW||_2 for the head weight W: ||p - e_yhat||_2 * ||h||_2, shape (B,)."""
    p = torch.softmax(_full(logits), dim=1)
    residual = p - F.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)
    return residual.norm(dim=1) * _full(features).norm(dim=1)


def _full(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision inputs (autocast), else unchanged (float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def weight_names(net: nn.Module) -> List[str]:
    """Names of the weight tensors that get a per-layer score: every parameter except biases and norm-layer params."""
    names = []
    for module_name, module in net.named_modules():
        if isinstance(module, _NORM_LAYERS):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param_name != "bias" and param.requires_grad:
                names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def check_layers(net: nn.Module, layers: Iterable[str]) -> List[str]:
    """Validate layer names against `weight_names(net)`; an unknown name is an error listing the valid ones."""
    known = weight_names(net)
    layers = list(layers)
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise OODBenchError(f"unknown layer {unknown[0]!r} for gradlayer; this network's weight tensors are: "
                            f"{', '.join(known)}")
    return layers


CPU_BUDGET_MB = 1024          # on a CPU a larger micro-batch is not faster (docs/gradients.md)
GPU_BUDGET_FRACTION, GPU_BUDGET_CAP_MB = 0.25, 8192


def memory_budget_mb(option, device) -> float:
    """`gradlayer.memory_mb` in MiB: a positive number, or "auto" = a quarter of the free GPU memory (at most
    8 GiB) on CUDA, 1024 on a CPU."""
    if str(option).strip().lower() == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return min(GPU_BUDGET_CAP_MB, GPU_BUDGET_FRACTION * free / 2 ** 20)
        return float(CPU_BUDGET_MB)
    try:
        value = float(option)
    except (TypeError, ValueError):
        value = 0.0
    if not value > 0:
        raise OODBenchError(f"gradlayer.memory_mb must be auto or a positive number of MiB, got {option!r}")
    return value


def auto_micro_batch(net: nn.Module, sample: torch.Tensor, layers: List[str], memory_mb: float) -> int:
    """Micro-batch size whose per-sample gradients and activations fit in about `memory_mb` MiB.

    Per sample: the tracked gradients (one copy of each weight tensor) plus the activations of one forward pass,
    counted 3x (forward values, their gradients, and workspace). An estimate; the perf script measures the real peak.
    """
    params = dict(net.named_parameters())
    grad_elems = sum(params[name].numel() for name in layers)
    activation_elems = 0

    def count(_module, _inputs, output):
        nonlocal activation_elems
        if isinstance(output, torch.Tensor):
            activation_elems += output.numel()

    hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            net(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    per_sample = sample.element_size() * (grad_elems + 3 * activation_elems)
    return max(1, int(memory_mb * 2 ** 20 // per_sample))


def per_layer_grad_norms(net: nn.Module, x: torch.Tensor, layers: List[str] | None = None,
                         micro_batch: int = 0, memory_mb="auto") -> Dict[str, torch.Tensor]:
    """Per sample, the L2 norm of d CE(f(x_i), argmax f(x_i)) / dW for each weight tensor W in `layers`.

    `x` is the network's (normalised float) input (B, ...). Returns {layer name: (B,)}. The network runs in eval mode
    (BatchNorm uses its running statistics), so each sample's gradient is that of the sample alone.
    `micro_batch` 0 picks the size from `memory_mb` (MiB, or "auto": see `memory_budget_mb`).
    """
    layers = weight_names(net) if layers is None else check_layers(net, layers)
    if len(x) == 0:
        return {name: x.new_zeros(0) for name in layers}
    was_training = net.training
    net.eval()
    try:
        if micro_batch <= 0:
            micro_batch = auto_micro_batch(net, x, layers, memory_budget_mb(memory_mb, x.device))
        params = {k: v.detach() for k, v in net.named_parameters()}
        tracked = {k: params[k] for k in layers}
        frozen = {k: v for k, v in params.items() if k not in tracked}
        buffers = dict(net.named_buffers())

        def loss(weights, xi):
            logits = functional_call(net, (weights, frozen, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(logits, logits.argmax(1))

        per_sample_grads = vmap(grad(loss), in_dims=(None, 0))
        norms: Dict[str, list] = {name: [] for name in layers}
        for start in range(0, len(x), micro_batch):
            grads = per_sample_grads(tracked, x[start:start + micro_batch])
            for name in layers:
                norms[name].append(grads[name].flatten(1).norm(dim=1))
            del grads
        return {name: torch.cat(parts) for name, parts in norms.items()}
    finally:
        net.train(was_training)


def select_layer(id_norms: Dict[str, torch.Tensor], ood_norms: Dict[str, torch.Tensor]) -> tuple[str, Dict[str, float]]:
    """The layer whose norm best separates a validation pair (highest AUROC, OOD positive), and every layer's AUROC."""
    from oodbench.metrics import evaluate

    aurocs = {name: evaluate(id_norms[name].cpu().numpy(), ood_norms[name].cpu().numpy())["auroc"]
              for name in id_norms}
    best = max(aurocs, key=lambda name: aurocs[name])
    return best, aurocs


# ---------------------------------------------------------------------------------------------------------------------
# Detectors: post-hoc methods on the classifier (a run's, or any model); they train nothing.

@register("gradnorm")
class GradNorm(PostHoc):
    summary = "GradNorm: L1 norm of the last layer's KL(uniform || softmax) gradient, in closed form (Huang et al. 2021)"
    OPTIONS = {"temperature": Option(1.0, "T in softmax(z/T); GradNorm used T=1")}
    fit_on = None

    def score_outputs(self, out):
        return -gradnorm_scores(out["features"], out["logits"], float(self.options["temperature"]))


@register("gradlayer")
class GradLayer(PostHoc):
    """Rows `gradlayer/<weight name>` for every weight tensor, and `gradlayer` = the chosen layer.

    The layer is `gradlayer.layer`, or with `auto` the one with the best AUROC between `val` (the in-distribution
    validation split) and `val_ood` (the workflow loads the set `gradlayer.val_ood` names: derived from the
    validation split or a training split, never a test split), `val_size` images of each drawn with `seed`.
    """

    summary = "per-layer L2 norm of the gradient of CE(f(x), argmax) per weight tensor, layer chosen on validation OOD"
    OPTIONS = {
        "layer": Option("auto", "the weight tensor reported as `gradlayer` (e.g. head.weight); auto = best validation "
                                "AUROC"),
        "val_ood": Option("glyphs", "validation OOD set for `auto` (its *train* split, never a test set); name a real "
                                    "one", dataset=True),
        "val_size": Option(1000, "images of the ID validation split and of val_ood used to choose the layer"),
        "micro_batch": Option(0, "per-sample gradients per vmap call; 0 = size micro-batches from memory_mb"),
        "memory_mb": Option("auto", "MiB for one micro-batch's per-sample gradients and activations; auto = 1/4 of "
                                    "free GPU memory (at most 8192) on CUDA, 1024 on a CPU"),
    }
    fit_on = "val"
    array_level = False
    cache_fitted = True   # choosing a layer costs per-sample gradients: the workflow keeps the choice
    layer_: str = ""
    layer_aurocs_: dict = {}

    def fit_datasets(self) -> dict:
        return super().fit_datasets() if self.options["layer"] == "auto" else {}

    def fit(self, model, data=None, val=None, labels=None, *, val_labels=None, outputs=None, val_ood=None,
            seed: int = 0, **sets) -> "GradLayer":
        """Choose the layer (with layer=auto) on `val` (ID) against `val_ood`; a named layer needs no data."""
        self.use_model(model)
        if self.options["layer"] != "auto":
            self.layer_, self.layer_aurocs_ = check_layers(self.net, [self.options["layer"]])[0], {}
        else:
            if val is None or len(val) == 0 or val_ood is None:
                raise OODBenchError("gradlayer chooses its layer on a validation pair: pass val= (ID validation "
                                    "images) and val_ood= (validation OOD images, never a test set), or name the "
                                    "layer with layer=<weight name> (--set gradlayer.layer=...)")
            n = int(self.options["val_size"])
            val = _as_imageset(val, val_labels, self.device, "gradlayer val")
            val_ood = _as_imageset(val_ood, None, self.device, "gradlayer val_ood")
            id_norms, ood_norms = (self._set_norms(_sample(s, n, seed)) for s in (val, val_ood))
            self.layer_, self.layer_aurocs_ = select_layer(id_norms, ood_norms)
        self.fitted_ = True
        return self

    def layer_norms(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{weight name: (B,)} per-sample gradient norms of a uint8 batch."""
        return per_layer_grad_norms(self.net, self.prepare(x), micro_batch=int(self.options["micro_batch"]),
                                    memory_mb=self.options["memory_mb"])

    def score_rows(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        self.require_fitted()
        norms = self.layer_norms(_batch(self.name, x, self.device))
        rows = {f"{self.name}/{name}": value for name, value in norms.items()}
        rows[self.name] = norms[self.layer_]
        return rows

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_rows(x)[self.name]

    def score_set(self, imageset, batch_size: int = 500, outputs=None) -> Dict[str, torch.Tensor]:
        parts = [self.score_rows(x) for x, _ in imageset.batches(batch_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def row_notes(self, id_scores: dict) -> dict:
        how = "gradlayer.layer" if self.options["layer"] != "auto" else \
            f"chosen on validation vs {self.options['val_ood']}"
        return {self.name: [f"layer {self.layer_} ({how})"]}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "layer": self.layer_, "layer_aurocs": dict(self.layer_aurocs_)}

    def load_state_dict(self, state: dict) -> "GradLayer":
        super().load_state_dict(state)
        self.layer_, self.layer_aurocs_ = str(state.get("layer", "")), dict(state.get("layer_aurocs") or {})
        return self

    def _set_norms(self, imageset, batch_size: int = 512) -> Dict[str, torch.Tensor]:
        parts = [self.layer_norms(x.to(self.device)) for x, _ in imageset.batches(batch_size)]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def _sample(imageset, n: int, seed: int):
    """A seeded random subset of n images (all when the set is smaller)."""
    if len(imageset) <= n:
        return imageset
    index = torch.randperm(len(imageset), generator=torch.Generator().manual_seed(seed))[:n]
    return imageset.subset(index.to(imageset.device))
