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

from oodbench.data.validation import validation_ood
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

# ---- per-image autograd references (the straightforward way; for tests and scripts/perf) -----------------------
def gradnorm_per_sample(net, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """GradNorm as the original repository computes it: per image (batch of 1), forward and backward of the whole
    network for KL(u || softmax(z/T)), L1 norm of the head's weight gradient. Slow; `gradnorm_scores` must equal it.
    (The original code's targets are ones instead of 1/C, which multiplies every score by C; rankings are the same.)"""
    scores = []
    for i in range(len(x)):
        net.zero_grad()
        logits = net(x[i:i + 1])
        targets = torch.full_like(logits, 1.0 / logits.shape[1])
        loss = torch.mean(torch.sum(-targets * F.log_softmax(logits / temperature, dim=-1), dim=-1))
        loss.backward()
        scores.append(net.head.weight.grad.abs().sum())
    return torch.stack(scores)


def gradnorm_openood(net, x: torch.Tensor, temperature: float = 1.0, batch_size: int = 256) -> torch.Tensor:
    """GradNorm as OpenOOD's postprocessor computes it: batched penultimate features without gradients, then per
    image a backward through a copy of the head alone (rebuilt from NumPy arrays for every batch, as OpenOOD does),
    L1 norm of its weight gradient, one host copy per image. Targets are ones as there (score = C x ours); divided
    by C here so that it equals `gradnorm_scores`."""
    weight, bias = net.head.weight.detach().cpu().numpy(), net.head.bias.detach().cpu().numpy()
    num_classes = weight.shape[0]
    scores = []
    for start in range(0, len(x), batch_size):
        with torch.no_grad():
            features = net.features(x[start:start + batch_size]).cpu().numpy()
        fc = nn.Linear(weight.shape[1], num_classes).to(x.device)
        fc.weight.data[...] = torch.from_numpy(weight)
        fc.bias.data[...] = torch.from_numpy(bias)
        for h in torch.from_numpy(features).float().to(x.device):
            targets = torch.ones((1, num_classes), device=x.device)
            fc.zero_grad()
            loss = torch.mean(torch.sum(-targets * F.log_softmax(fc(h[None]) / temperature, dim=-1), dim=-1))
            loss.backward()
            scores.append(float(fc.weight.grad.abs().sum().cpu().numpy()))
    return torch.tensor(scores, dtype=torch.float32) / num_classes


def layer_norms_per_sample(net, x: torch.Tensor, names) -> Dict[str, torch.Tensor]:
    """Per image alone: CE(f(x), argmax) backward, L2 norm of each named weight's gradient. Slow; `per_layer_grad_norms`
    must equal it."""
    params = dict(net.named_parameters())
    rows = {name: [] for name in names}
    for i in range(len(x)):
        net.zero_grad()
        logits = net(x[i:i + 1])
        F.cross_entropy(logits, logits.argmax(1)).backward()
        for name in names:
            rows[name].append(params[name].grad.norm())
    return {name: torch.stack(v) for name, v in rows.items()}

# Detectors: post-hoc methods on the classifier (a run's, or any model); they train nothing.

from oodbench.detectors.base import register  # noqa: E402
from oodbench.detectors.classifier import ClassifierDetector  # noqa: E402


@register("gradnorm")
class GradNorm(ClassifierDetector):
    summary = "GradNorm: L1 norm of the last layer's KL(uniform || softmax) gradient, in closed form (Huang et al. 2021)"

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_features(*self.model.features_and_logits(x))

    def score_features(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """From penultimate features (B, D) and logits (B, C) alone (no network needed)."""
        return -gradnorm_scores(features, logits, float(self.options["temperature"]))


@register("gradlayer")
class GradLayer(ClassifierDetector):
    """Rows `gradlayer/<weight name>` for every weight tensor, and `gradlayer` = the chosen layer.

    The layer is `gradlayer.layer`, or with `auto` the one with the best AUROC between the in-distribution validation
    split and the train split of `gradlayer.val_ood`, both given by the workflow (`fit_data`: the validation split is
    re-derived as training made it, from `data.in`, `data.limit`, `data.val_fraction` and `seed`). It is chosen on
    first use.
    The choice records its validation pair (`val_ood`, `val_size`); scoring with another pair (`--set` at eval time)
    chooses again. Choices are kept in the workflow's cache (<run>/cache/gradlayer_choice.json).
    """

    summary = "per-layer L2 norm of the gradient of CE(f(x), argmax) per weight tensor, layer chosen on validation OOD"
    chosen_layer: str = ""
    layer_aurocs: dict = {}
    chosen_on: Optional[dict] = None    # the validation pair the choice was made on

    def validation_pair(self) -> dict:
        return {"val_ood": str(self.options["val_ood"]), "val_size": int(self.options["val_size"])}

    def layer_norms(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{weight name: (B,)} per-sample gradient norms of a uint8 batch."""
        return per_layer_grad_norms(self.net, self.prepare(x), micro_batch=int(self.options["micro_batch"]),
                                    memory_mb=self.options["memory_mb"])

    def score_rows(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        layer = self.layer()
        norms = self.layer_norms(x)
        rows = {f"{self.name}/{name}": value for name, value in norms.items()}
        rows[self.name] = norms[layer]
        return rows

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_rows(x)[self.name]

    def layer(self) -> str:
        """The reported layer: `gradlayer.layer` when named, else the one chosen on the validation pair."""
        named = self.options["layer"]
        if named != "auto":
            return check_layers(self.net, [named])[0]
        if not self.chosen_layer or self.chosen_on != self.validation_pair():
            self._choose_at_scoring_time()
        return self.chosen_layer

    def _choose_at_scoring_time(self) -> None:
        """choose_layer on the re-derived validation split, or the same choice read back from the run's cache."""
        d = self.cfg["data"]
        key = self.cache_key(self.validation_pair(), self.cfg["seed"], [d["in"], d.get("limit"), d["val_fraction"]])
        saved = self.cache.load_json("gradlayer_choice.json") if self.cache is not None else {}
        if key in saved:
            self.chosen_layer, self.layer_aurocs = saved[key]["layer"], saved[key]["aurocs"]
            self.chosen_on = self.validation_pair()
            return
        fit_data = self.require_fit_data()
        self.choose_layer(fit_data.split()[1], fit_data.load)
        if self.cache is not None:
            saved[key] = {"layer": self.chosen_layer, "aurocs": self.layer_aurocs, **self.chosen_on}
            self.cache.save_json("gradlayer_choice.json", saved)

    def choose_layer(self, val, load_train_split) -> None:
        """Pick the layer with the best AUROC: validation split (ID) vs `gradlayer.val_ood`, never a test split
        (`data.validation.validation_ood`: derived from `val` when it derives from the in-distribution dataset,
        else the training split `load_train_split(spec, like)` gives)."""
        spec, n = self.options["val_ood"], int(self.options["val_size"])
        if val is None or len(val) == 0:
            raise OODBenchError("gradlayer chooses its layer on the validation split, which is empty; set "
                                "data.val_fraction > 0 or name the layer with --set gradlayer.layer=<weight name>")
        ood = validation_ood(spec, str((self.cfg.get("data") or {}).get("in", "")), val, load_train_split,
                             tuple(val.shape))
        id_norms, ood_norms = self._set_norms(_sample(val, n, self.cfg["seed"])), self._set_norms(
            _sample(ood, n, self.cfg["seed"]))
        self.chosen_layer, self.layer_aurocs = select_layer(id_norms, ood_norms)
        self.chosen_on = self.validation_pair()

    def _set_norms(self, imageset, batch_size: int = 512) -> Dict[str, torch.Tensor]:
        parts = [self.layer_norms(x.to(self.device)) for x, _ in imageset.batches(batch_size)]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def _sample(imageset, n: int, seed: int):
    """A seeded random subset of n images (all when the set is smaller)."""
    if len(imageset) <= n:
        return imageset
    index = torch.randperm(len(imageset), generator=torch.Generator().manual_seed(seed))[:n]
    return imageset.subset(index.to(imageset.device))
