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

from typing import Dict, Iterable, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from oodbench.errors import OODBenchError

_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def check_split(net: nn.Module, method: str) -> None:
    """Raise unless `net` has the features/head split that gradient scores need."""
    if not (callable(getattr(net, "features", None)) and isinstance(getattr(net, "head", None), nn.Linear)):
        raise OODBenchError(
            f"{method} needs a classifier with a features/head split (`.features(x)` and a `.head` nn.Linear), got "
            f"{type(net).__name__}; train the run with an oodbench classifier (oodbench.nets.classifiers)")


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
                         micro_batch: int = 0, memory_mb: float = 1024) -> Dict[str, torch.Tensor]:
    """Per sample, the L2 norm of d CE(f(x_i), argmax f(x_i)) / dW for each weight tensor W in `layers`.

    `x` is the network's (normalised float) input (B, ...). Returns {layer name: (B,)}. The network runs in eval mode
    (BatchNorm uses its running statistics), so each sample's gradient is that of the sample alone.
    `micro_batch` 0 picks the size from `memory_mb`.
    """
    layers = weight_names(net) if layers is None else check_layers(net, layers)
    if len(x) == 0:
        return {name: x.new_zeros(0) for name in layers}
    was_training = net.training
    net.eval()
    try:
        if micro_batch <= 0:
            micro_batch = auto_micro_batch(net, x, layers, memory_mb)
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


def auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    """AUROC with OOD as the positive class (higher score = OOD), ties counted half (Mann-Whitney U)."""
    scores = torch.cat([id_scores, ood_scores]).double().cpu()
    ranks = _average_ranks(scores)
    n_id, n_ood = len(id_scores), len(ood_scores)
    u = ranks[n_id:].sum().item() - n_ood * (n_ood + 1) / 2
    return u / (n_id * n_ood)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing their average rank."""
    sorted_values, order = torch.sort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(values)
    ranks[order] = average[inverse]
    return ranks


def select_layer(id_norms: Dict[str, torch.Tensor], ood_norms: Dict[str, torch.Tensor]) -> tuple[str, Dict[str, float]]:
    """The layer whose norm best separates a validation pair (highest AUROC, OOD positive), and every layer's AUROC."""
    aurocs = {name: auroc(id_norms[name], ood_norms[name]) for name in id_norms}
    best = max(aurocs, key=lambda name: aurocs[name])
    return best, aurocs
