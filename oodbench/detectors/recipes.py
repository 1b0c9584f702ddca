"""Training recipes of the classifier (kind "classifier"): how the run's one classifier is trained, chosen by
`train.recipe` (`oodbench train --method logitnorm ...` is the same as `--set train.recipe=logitnorm`).

A recipe is a plain object: its options are declared once (`OPTIONS`, with OpenOOD v1.5's defaults; each becomes a
config section named after the recipe, e.g. `logitnorm.temperature`), and it says
- `adapt(net)`: what it changes in the classifier itself, in place (T2FNorm's feature scaling, ISH's head). It is
  applied when the run's classifier is built, for training and for scoring, so the scored network is the one OpenOOD
  scores;
- `modules(net)`: the extra trainable modules it trains next to the classifier (VOS's energy weights); they are
  dropped after training (RotPred's rotation head is kept: `adapt` adds it to the classifier);
- `loss(model, x, labels)`: the training loss of one batch: `x` is the network's input (augmented, normalised) of
  the in-distribution images, followed by the auxiliary outlier images when the recipe uses outliers.

Training goes through the one engine (`Engine.fit`: checkpoints, bit-exact resume, DDP, autocast); a recipe owns
no loop. The recipes and their references are listed in docs/recipes.md.
"""
from __future__ import annotations

import difflib
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.detectors.base import Option
from oodbench.detectors.feature_space import chunked_topk
from oodbench.errors import OODBenchError

RECIPES: Dict[str, type] = {}


def register_recipe(name: str):
    def wrap(cls: type) -> type:
        if name in RECIPES:
            raise ValueError(f"recipe {name!r} registered twice")
        cls.name = name
        RECIPES[name] = cls
        return cls

    return wrap


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (the engine wraps the trained module under torchrun)."""
    return getattr(model, "module", model)


class Recipe:
    """Base: plain cross-entropy on the classifier's logits (subclasses override what they change)."""

    name = ""
    summary = ""
    paper = ""
    reference = ""          # OpenOOD v1.5 file(s) the recipe follows
    OPTIONS: Dict[str, Option] = {}
    uses_outliers = False    # batches carry auxiliary outlier images after the in-distribution ones
    views = 1                # independently augmented views of each batch, stacked (CIDER: 2)
    initialised_from_data = False   # `initialise` sets state from labelled images before training (CIDER)
    mixing_set_key = None    # option naming a dataset the recipe draws pictures from (PixMix): the trainer loads its
                             # train split at the ID shape and hands the images over with `use_images`

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], self.OPTIONS, n=1)
            hint = f" Did you mean {self.name}.{close[0]}?" if close else ""
            raise OODBenchError(f"recipe {self.name} has no option {unknown[0]!r}.{hint} Its options: "
                                f"{', '.join(self.OPTIONS) or 'none'}")
        self.options = {k: options.get(k, o.default) for k, o in self.OPTIONS.items()}
        self.check()

    @classmethod
    def defaults(cls) -> dict:
        return {k: o.default for k, o in cls.OPTIONS.items()}

    def check(self) -> None:
        """One-line errors for bad option values (before any data is loaded)."""

    def check_train(self, train: dict) -> None:
        """One-line errors for options that do not fit the run's `train:` section (before any data is loaded)."""

    def _positive(self, *keys) -> None:
        for k in keys:
            v = self.options[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise OODBenchError(f"{self.name}.{k} must be a number > 0, got {v!r}")

    def _non_negative(self, *keys) -> None:
        for k in keys:
            v = self.options[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise OODBenchError(f"{self.name}.{k} must be a number >= 0, got {v!r}")

    def adapt(self, net: nn.Module) -> nn.Module:
        return net

    def modules(self, net: nn.Module) -> Dict[str, nn.Module]:
        return {}

    def views_of(self, x: torch.Tensor, augment) -> list:
        """The uint8 batches the network sees for a batch `x` (ID images, then outliers): `views` draws of the
        run's device augmentation (`augment`); their network inputs are stacked in this order for `loss`."""
        return [augment(x) for _ in range(self.views)]

    def use_images(self, images: torch.Tensor) -> None:
        """Given the uint8 images of the dataset named by option `mixing_set_key`, before training."""

    def set_epoch_length(self, steps: int) -> None:
        """Told the steps per pass over the training set before training (recipes with epoch options)."""

    def initialise(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, prepare) -> None:
        """Set the trained module's state from labelled uint8 images (`prepare` makes the network's input) before
        the first step (CIDER's prototypes); a resumed run then restores its own from the checkpoint."""

    def optimizer_groups(self, model: nn.Module, weight_decay: float):
        """The optimiser's parameter groups (default: one, all of `model`'s parameters)."""
        return model.parameters()

    def loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor):
        """(loss, {statistic: value} for the log) of one batch; `model` is the engine's trained module (a
        RecipeNet, maybe inside DDP), called once on `x`."""
        _, logits = model(x)
        return F.cross_entropy(logits.float(), labels), {"acc": accuracy(logits, labels)}


@register_recipe("plain")
class Plain(Recipe):
    summary = "the classifier's own loss (train.loss: cross-entropy, or BCE on one-hot targets)"
    paper = "-"
    reference = "openood/trainers/base_trainer.py"


# -- LogitNorm ------------------------------------------------------------------------------------------------------
def logitnorm_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of the logits divided by `temperature` times their L2 norm (+1e-7): Wei et al. 2022, eq. 6."""
    logits = logits.float()
    norms = logits.norm(p=2, dim=1, keepdim=True) + 1e-7
    return F.cross_entropy(logits / (norms * temperature), labels)


@register_recipe("logitnorm")
class LogitNorm(Recipe):
    summary = "cross-entropy on L2-normalised logits / tau (Wei et al., ICML 2022)"
    paper = "Mitigating Neural Network Overconfidence with Logit Normalization (Wei et al., ICML 2022)"
    reference = "openood/trainers/logitnorm_trainer.py, configs/pipelines/train/train_logitnorm.yml"
    OPTIONS = {"temperature": Option(0.04, "tau: the logits enter the softmax with L2 norm 1/tau (train_logitnorm.yml)")}

    def check(self):
        self._positive("temperature")

    def loss(self, model, x, labels):
        _, logits = model(x)
        return logitnorm_loss(logits, labels, float(self.options["temperature"])), {"acc": accuracy(logits, labels)}


# -- Outlier exposure (classic) ---------------------------------------------------------------------------------------
def uniform_ce(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy from the uniform distribution to softmax(logits): logsumexp(z) - mean_c z_c per row."""
    logits = logits.float()
    return (torch.logsumexp(logits, dim=1) - logits.mean(1)).mean()


def outlier_exposure_loss(logits: torch.Tensor, labels: torch.Tensor, weight: float):
    """CE on the first len(labels) rows + weight * uniform CE on the rows after them (the outliers):
    Hendrycks et al. 2019, the loss of their code and of OpenOOD's oe_trainer. Returns (loss, {ce, oe})."""
    n = len(labels)
    ce, oe = F.cross_entropy(logits[:n].float(), labels), uniform_ce(logits[n:])
    return ce + weight * oe, {"ce": ce.detach(), "oe": oe.detach()}


@register_recipe("outlier_exposure")
class OutlierExposure(Recipe):
    summary = "cross-entropy + lambda * CE to the uniform distribution on auxiliary outliers (Hendrycks et al. 2019)"
    paper = "Deep Anomaly Detection with Outlier Exposure (Hendrycks, Mazeika & Dietterich, ICLR 2019)"
    reference = ("openood/trainers/oe_trainer.py, configs/pipelines/train/train_oe.yml, "
                 "configs/datasets/cifar10/cifar10_oe.yml")
    OPTIONS = {
        "outliers": Option(None, "auxiliary outlier dataset spec (any: glyphs, noise:..., folder:PATH; its train "
                                 "split, converted to the in-distribution shape)", dataset=True, any_type=True),
        "weight": Option(0.5, "lambda, the weight of the uniform-CE term (train_oe.yml lambda_oe)"),
        "outlier_batch": Option(256, "outlier images per step, next to train.batch_size ID images (cifar10_oe.yml)"),
    }
    uses_outliers = True

    def check(self):
        if not self.options["outliers"]:
            raise OODBenchError("train.recipe=outlier_exposure needs auxiliary outliers: set "
                                "outlier_exposure.outliers=SPEC (e.g. glyphs, noise:uniform or folder:PATH)")
        w = self.options["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise OODBenchError(f"outlier_exposure.weight must be a number >= 0, got {w!r}")
        b = self.options["outlier_batch"]
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise OODBenchError(f"outlier_exposure.outlier_batch must be an integer >= 1, got {b!r}")

    def loss(self, model, x, labels):
        _, logits = model(x)
        loss, stats = outlier_exposure_loss(logits, labels, float(self.options["weight"]))
        return loss, {**stats, "acc": accuracy(logits[:len(labels)], labels)}


# -- MixOE ------------------------------------------------------------------------------------------------------------
def cutmix_box(height: int, width: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the outlier patch: sides sqrt(1 - lam) of the image's, centred at (cy, cx),
    clipped to the image (OpenOOD's mixoe_trainer.py `rand_bbox`, its first axis being the height here)."""
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    return (min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height),
            min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width))


def mixoe_batch(x: torch.Tensor, outliers: torch.Tensor, lam: float, mix_op: str, cy: int = 0, cx: int = 0):
    """(the ID batch mixed with as many outliers, lam as the share of ID pixels): `cutmix` pastes an outlier patch
    into each ID image (lam then the exact unpasted share), `mixup` blends lam * x + (1 - lam) * outlier."""
    if mix_op == "mixup":
        return lam * x + (1 - lam) * outliers, lam
    top, bottom, left, right = cutmix_box(x.shape[2], x.shape[3], lam, cy, cx)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = outliers[:, :, top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (x.shape[2] * x.shape[3])


def mixoe_loss(id_logits, mixed_logits, labels, lam: float, weight: float):
    """CE(ID) + weight * soft CE of the mixed images to lam * one-hot(y) + (1 - lam) * uniform (Zhang et al. 2023)."""
    num_classes = id_logits.shape[1]
    targets = lam * F.one_hot(labels, num_classes).float() + (1 - lam) / num_classes
    ce = F.cross_entropy(id_logits.float(), labels)
    mixed = -(targets * mixed_logits.float().log_softmax(1)).sum(1).mean()
    return ce + weight * mixed, {"ce": ce.detach(), "mixoe": mixed.detach()}


@register_recipe("mixoe")
class MixOE(Recipe):
    summary = "cross-entropy + soft CE on ID images mixed with outliers (cutmix/mixup), targets mixed toward uniform " \
              "(Zhang et al., WACV 2023)"
    paper = "Mixture Outlier Exposure: Towards Out-of-Distribution Detection in Fine-Grained Environments (Zhang, " \
            "Inkawhich, Linderman, Chen, Chen & Li, WACV 2023)"
    reference = "openood/trainers/mixoe_trainer.py, configs/pipelines/train/train_mixoe.yml"
    OPTIONS = {
        "outliers": Option(None, "auxiliary outlier dataset spec (as outlier_exposure.outliers)", dataset=True,
                           any_type=True),
        "weight": Option(1.0, "weight of the mixed soft-CE term (train_mixoe.yml lambda_oe)"),
        "alpha": Option(0.1, "lam ~ Beta(alpha, beta) (train_mixoe.yml alpha)"),
        "beta": Option(1.0, "lam ~ Beta(alpha, beta) (train_mixoe.yml beta)"),
        "mix_op": Option("cutmix", "cutmix (an outlier patch pasted into each ID image; train_mixoe.yml) | mixup"),
        "outlier_batch": Option(128, "outlier images per step; the first train.batch_size of them are mixed, one per "
                                     "ID image (OpenOOD mixes equal batches), so it must be >= train.batch_size"),
    }
    uses_outliers = True

    def check(self):
        if not self.options["outliers"]:
            raise OODBenchError("train.recipe=mixoe needs auxiliary outliers: set mixoe.outliers=SPEC (e.g. glyphs, "
                                "noise:uniform or folder:PATH)")
        self._non_negative("weight")
        self._positive("alpha", "beta")
        if self.options["mix_op"] not in ("cutmix", "mixup"):
            raise OODBenchError(f"mixoe.mix_op is cutmix or mixup, got {self.options['mix_op']!r}")
        b = self.options["outlier_batch"]
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise OODBenchError(f"mixoe.outlier_batch must be an integer >= 1, got {b!r}")

    def check_train(self, train: dict) -> None:
        if int(self.options["outlier_batch"]) < int(train.get("batch_size", 1)):
            raise OODBenchError(f"mixoe mixes one outlier into each ID image: mixoe.outlier_batch "
                                f"({self.options['outlier_batch']}) must be >= train.batch_size ({train['batch_size']})")

    def loss(self, model, x, labels):
        n, o = len(labels), self.options
        # drawn from torch's CPU generator, whose state the checkpoints hold (a resumed run draws the same)
        lam = float(torch.distributions.Beta(float(o["alpha"]), float(o["beta"])).sample())
        cy, cx = int(torch.randint(x.shape[2], ())), int(torch.randint(x.shape[3], ()))   # the patch centre
        mixed, lam = mixoe_batch(x[:n], x[n:2 * n], lam, o["mix_op"], cy, cx)
        # one pass over ID and mixed images (OpenOOD makes two: BatchNorm's batch statistics differ; docs/recipes.md)
        _, logits = model(torch.cat([x[:n], mixed]))
        loss, stats = mixoe_loss(logits[:n], logits[n:], labels, lam, float(o["weight"]))
        return loss, {**stats, "lam": lam, "acc": accuracy(logits[:n], labels)}


# -- T2FNorm ----------------------------------------------------------------------------------------------------------
class T2FNormFeatures:
    """Forward hook on the classifier's feature extractor: features -> normalize(features) / tau while training,
    features / tau in eval mode (OpenOOD's T2FNormNet.forward and forward_ood_inference, CIFAR-scale models)."""

    def __init__(self, tau: float):
        self.tau = float(tau)

    def __call__(self, module, inputs, features):
        if module.training:
            features = F.normalize(features, dim=1)
        return features / self.tau


@register_recipe("t2fnorm")
class T2FNorm(Recipe):
    summary = "cross-entropy on L2-normalised penultimate features / tau; features / tau at inference (Regmi 2023)"
    paper = "T2FNorm: Train-time Feature Normalization for OOD Detection in Image Classification (Regmi et al. 2023)"
    reference = ("openood/networks/t2fnorm_net.py, openood/trainers/t2fnorm_trainer.py, "
                 "configs/pipelines/train/train_t2fnorm.yml")
    OPTIONS = {"temperature": Option(0.1, "tau: trained on unit-norm features / tau (train_t2fnorm.yml)")}

    def check(self):
        self._positive("temperature")

    def adapt(self, net):
        net.body.register_forward_hook(T2FNormFeatures(float(self.options["temperature"])))
        return net


# -- ISH --------------------------------------------------------------------------------------------------------------
def ish_kept(width: int, param: float) -> int:
    """Activations kept per sample: OpenOOD's int(width * (1 - param))."""
    return int(width * (1 - param))


def ish_shape(x: torch.Tensor, param: float) -> torch.Tensor:
    """ISH's `minksample_expscale`: keep the top (1 - param) |activations| of each row, zero the rest and multiply
    the kept ones by exp(sum of the row / sum of the kept ones) (SCALE's factor; the ASH-S shaping)."""
    flat = x.reshape(len(x), -1)
    k = ish_kept(flat.shape[1], param)
    values, index = flat.abs().topk(k, dim=1, sorted=False)
    s1, s2 = flat.sum(1), values.sum(1)
    # an all-zero row (s2 = 0) keeps factor 1: its shaped row is zero anyway (OpenOOD would give NaN)
    scale = torch.where(s2 > 0, s1 / s2.clamp_min(torch.finfo(s2.dtype).tiny), torch.zeros_like(s1))
    return torch.zeros_like(flat).scatter_(1, index, values * torch.exp(scale)[:, None]).reshape(x.shape)


class _ISHLinearFunction(torch.autograd.Function):
    """y = x W^T + b; the weight gradient uses the shaped input: dW = g^T ish_shape(x) (dx and db as usual)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x, weight, bias, param):
        ctx.save_for_backward(ish_shape(x.detach(), param), weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        shaped, weight = ctx.saved_tensors
        grad_bias = grad.sum(0) if ctx.has_bias else None
        return grad @ weight, grad.t() @ shaped, grad_bias, None


class ISHLinear(nn.Linear):
    """The classifier's head under ISH: in training mode its weight gradient sees the shaped features; in eval mode
    (scoring) it is a plain linear layer. Same parameters and state_dict keys as nn.Linear."""

    param = 0.85

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            return _ISHLinearFunction.apply(x, self.weight, self.bias, self.param)
        return F.linear(x, self.weight, self.bias)


@register_recipe("ish")
class ISH(Recipe):
    summary = "cross-entropy; the last layer's weight gradient sees ASH-S-shaped features (Xu et al., ICLR 2024)"
    paper = "Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement (Xu et al., ICLR 2024)"
    reference = "openood/trainers/ish_trainer.py, configs/pipelines/train/train_ish.yml"
    OPTIONS = {
        "param": Option(0.85, "fraction of the penultimate activations dropped from the weight gradient; the rest "
                              "scaled by exp(total/kept sum) (train_ish.yml, mode minksample_expscale, layer r1)"),
        "head_weight_decay": Option(0.00005, "weight decay of the last layer (train_ish.yml weight_decay_fc); the "
                                             "rest of the network uses train.weight_decay"),
    }

    def check(self):
        p = self.options["param"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise OODBenchError(f"ish.param must be in [0, 1), got {p!r}")
        wd = self.options["head_weight_decay"]
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0:
            raise OODBenchError(f"ish.head_weight_decay must be a number >= 0, got {wd!r}")

    def adapt(self, net):
        param = float(self.options["param"])
        if ish_kept(net.head.in_features, param) < 1:
            raise OODBenchError(f"ish.param={param} keeps no activation of the {net.head.in_features} features; "
                                f"lower it")
        # the head becomes an ISHLinear in place: same parameters, no new initialisation (no random draws)
        net.head.__class__ = ISHLinear
        net.head.param = param
        return net

    def optimizer_groups(self, model: nn.Module, weight_decay: float) -> list:
        head = {id(p) for p in unwrap(model).net.head.parameters()}
        rest = [p for p in model.parameters() if id(p) not in head]
        return [{"params": rest, "weight_decay": weight_decay},
                {"params": [p for p in model.parameters() if id(p) in head],
                 "weight_decay": float(self.options["head_weight_decay"])}]


# -- RotPred ----------------------------------------------------------------------------------------------------------
def rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the batch rotated by 0, 90, 180 and 270 degrees, stacked in that order; the rotation labels 0..3)."""
    stacked = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    return stacked, torch.arange(4, device=x.device).repeat_interleave(len(x))


@register_recipe("rotpred")
class RotPred(Recipe):
    summary = "cross-entropy + a 4-way rotation-prediction head on the same features (Hendrycks et al. 2019)"
    paper = ("Using Self-Supervised Learning Can Improve Model Robustness and Uncertainty (Hendrycks, Mazeika, "
             "Kadavath & Song, NeurIPS 2019)")
    reference = "openood/trainers/rotpred_trainer.py, openood/networks/rot_net.py"
    OPTIONS = {"weight": Option(1.0, "weight of the rotation cross-entropy (rotpred_trainer.py adds it with 1)")}

    def check(self):
        w = self.options["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise OODBenchError(f"rotpred.weight must be a number >= 0, got {w!r}")

    def adapt(self, net):
        """The 4-way rotation head joins the classifier (`net.rot_head`, on the head's input features, as RotNet's
        rot_fc): it is trained, saved with the run and used by the post-hoc `rotpred_score`."""
        if not hasattr(net, "rot_head"):
            net.rot_head = nn.Linear(net.head.in_features, 4).to(net.head.weight.device)
        return net

    def loss(self, model, x, labels):
        if x.shape[2] != x.shape[3]:
            raise OODBenchError(f"rotpred rotates images by 90 degrees; they must be square, not "
                                f"{x.shape[2]}x{x.shape[3]} (resize the in-distribution set)")
        n = len(labels)
        stacked, rot_labels = rotations(x)
        features, logits = model(stacked)
        rot_logits = unwrap(model).net.rot_head(features)
        ce, rot = F.cross_entropy(logits[:n].float(), labels), F.cross_entropy(rot_logits.float(), rot_labels)
        return ce + float(self.options["weight"]) * rot, {"ce": ce.detach(), "rot": rot.detach(),
                                                          "acc": accuracy(logits[:n], labels)}


# -- VOS --------------------------------------------------------------------------------------------------------------
def weighted_logsumexp(logits: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """log sum_c relu(w_c) exp(z_c), computed stably: VOS's learned energy (the negative of it)."""
    logits = logits.float()
    m = logits.amax(1, keepdim=True)
    return m.squeeze(1) + torch.log((F.relu(class_weights.float()) * torch.exp(logits - m)).sum(1))


def vos_regularizer(id_logits, outlier_logits, class_weights, logistic: nn.Module) -> torch.Tensor:
    """VOS's uncertainty loss: a logistic regression on the weighted logsumexp separates ID (label 1) from virtual
    outliers (label 0), cross-entropy of its two logits (Du et al. 2022, eq. 5, as in the authors' code)."""
    scores = torch.cat([weighted_logsumexp(id_logits, class_weights),
                        weighted_logsumexp(outlier_logits, class_weights)])
    target = torch.cat([torch.ones(len(id_logits)), torch.zeros(len(outlier_logits))]).long().to(scores.device)
    return F.cross_entropy(logistic(scores[:, None]), target)


def virtual_outliers(queue: torch.Tensor, sample_from: int, select: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the `select` lowest-likelihood of `sample_from` draws from each class's Gaussian, (C * select, D), class by
    class; their log-densities). The Gaussians have the per-class means of `queue` (C, S, D) and one shared
    covariance of the class-centred features + 1e-4 I (VOS's class-conditional Gaussians)."""
    queue = queue.float()
    means = queue.mean(1)
    centred = (queue - means[:, None]).reshape(-1, queue.shape[-1])
    cov = centred.t() @ centred / len(centred) + 1e-4 * torch.eye(queue.shape[-1], device=queue.device)
    gauss = torch.distributions.MultivariateNormal(means, covariance_matrix=cov)
    draws = gauss.rsample((sample_from,))                  # (F, C, D)
    log_density = gauss.log_prob(draws)                    # (F, C)
    low, index = (-log_density).topk(select, dim=0)        # (select, C): the least likely draws of each class
    picked = draws.gather(0, index[:, :, None].expand(-1, -1, draws.shape[-1]))
    return picked.transpose(0, 1).reshape(-1, draws.shape[-1]), -low.t().reshape(-1)


def queue_full(queue: torch.Tensor, count: torch.Tensor) -> bool:
    """Whether every class queue (C, S, D) holds its S features."""
    return bool((count == queue.shape[1]).all())


@torch.no_grad()
def push_queue(queue: torch.Tensor, count: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> None:
    """Add a batch's features to the class queues, in batch order: filling them (a full class skips its samples)
    until all are full, then as a first-in-first-out window (the per-sample loop of VOS's and NPOS's code,
    vectorised per class)."""
    features, size, full = features.float(), queue.shape[1], queue_full(queue, count)
    for c in labels.unique().tolist():
        rows = features[labels == c]
        if full:
            queue[c] = torch.cat([queue[c], rows])[-size:]
        else:
            n = int(count[c])
            take = rows[:size - n]
            queue[c, n:n + len(take)] = take
            count[c] += len(take)


class VOSState(nn.Module):
    """VOS's trained extras and state: the energy's class weights, the logistic regression, and a queue of the
    last `sample_number` penultimate features of each class (buffers: they travel in the checkpoints)."""

    def __init__(self, num_classes: int, dim: int, sample_number: int):
        super().__init__()
        # the energy's class weights: the weight of the authors' Linear(num_classes, 1) (its bias is never used)
        self.class_weights = nn.Parameter(torch.empty(1, num_classes).uniform_())
        self.logistic = nn.Linear(1, 2)
        self.register_buffer("queue", torch.zeros(num_classes, sample_number, dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def full(self) -> bool:
        return queue_full(self.queue, self.count)

    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        push_queue(self.queue, self.count, features, labels)


@register_recipe("vos")
class VOS(Recipe):
    summary = ("cross-entropy + an uncertainty loss separating ID energies from virtual outliers sampled in the "
               "low-density region of class-conditional Gaussians of the features (Du et al., ICLR 2022)")
    paper = "VOS: Learning What You Don't Know by Virtual Outlier Synthesis (Du, Wang, Cai & Li, ICLR 2022)"
    reference = "openood/trainers/vos_trainer.py, configs/pipelines/train/train_vos.yml"
    OPTIONS = {
        "weight": Option(0.1, "weight of the uncertainty loss (train_vos.yml loss_weight)"),
        "sample_number": Option(1000, "penultimate features kept per class (train_vos.yml sample_number)"),
        "sample_from": Option(10000, "draws from each class Gaussian per step (train_vos.yml sample_from)"),
        "select": Option(1, "lowest-likelihood draws per class kept as virtual outliers (train_vos.yml select)"),
        "start_epoch": Option(0, "epoch from which virtual outliers are used (train_vos.yml: 0; the paper's "
                                 "CIFAR code: 40 of 100)"),
    }

    steps_per_epoch = 1

    def check(self):
        self._positive("sample_number", "sample_from", "select")
        for k in ("sample_number", "sample_from", "select", "start_epoch"):
            v = self.options[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise OODBenchError(f"vos.{k} must be a whole number >= 0, got {v!r}")
        if self.options["select"] > self.options["sample_from"]:
            raise OODBenchError(f"vos.select ({self.options['select']}) must be at most vos.sample_from "
                                f"({self.options['sample_from']})")
        w = self.options["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise OODBenchError(f"vos.weight must be a number >= 0, got {w!r}")

    def use_images(self, images: torch.Tensor) -> None:
        """Given the uint8 images of the dataset named by option `mixing_set_key`, before training."""

    def set_epoch_length(self, steps: int) -> None:
        self.steps_per_epoch = max(1, int(steps))

    def modules(self, net):
        return {"vos": VOSState(net.head.out_features, net.head.in_features, int(self.options["sample_number"]))}

    def loss(self, model, x, labels):
        features, logits = model(x)
        inner = unwrap(model)
        state = inner.extra["vos"]
        ce = F.cross_entropy(logits.float(), labels)
        ready = state.full()
        state.push(features.detach(), labels)
        start = int(self.options["start_epoch"]) * self.steps_per_epoch
        if ready and int(state.steps) >= start:
            outliers, _ = virtual_outliers(state.queue, int(self.options["sample_from"]), int(self.options["select"]))
            reg = vos_regularizer(logits, inner.net.head(outliers.to(features.dtype)), state.class_weights,
                                  state.logistic)
        else:   # every parameter takes part in each step's graph (DDP expects gradients for all of them)
            reg = sum(p.sum() for p in state.parameters()) * 0.0
        state.steps += 1
        return ce + float(self.options["weight"]) * reg, {"ce": ce.detach(), "vos_reg": reg.detach(),
                                                          "acc": accuracy(logits, labels)}


# -- CIDER ------------------------------------------------------------------------------------------------------------
def cider_dispersion(prototypes: torch.Tensor, temperature: float, base_temperature: float = 0.1) -> torch.Tensor:
    """CIDER's dispersion loss: (T / T_base) * mean over classes of log(mean_{j != i} exp(p_i . p_j / T)) (Ming et
    al. 2023, eq. 5; OpenOOD's DisLoss, base temperature 0.1)."""
    n = len(prototypes)
    logits = prototypes @ prototypes.t() / temperature
    off = 1 - torch.eye(n, device=prototypes.device)
    per_class = torch.log((off * torch.exp(logits)).sum(1) / off.sum(1))
    return (temperature / base_temperature) * per_class[~torch.isnan(per_class)].mean()


def cider_compactness(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
                      temperature: float, base_temperature: float = 0.07) -> torch.Tensor:
    """CIDER's compactness loss: -(T / T_base) * mean log softmax_y(z . normalize(P)^T / T) (eq. 4; OpenOOD's
    CompLoss keeps SupCon's base temperature 0.07)."""
    logits = embeddings @ F.normalize(prototypes, dim=1).t() / temperature
    log_prob = logits.log_softmax(1).gather(1, labels[:, None]).squeeze(1)
    return -(temperature / base_temperature) * log_prob.mean()


def ema_prototypes(prototypes: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor,
                   momentum: float) -> torch.Tensor:
    """The prototypes after each embedding in turn: p_y <- normalize(m p_y + (1 - m) z), sample by sample (the
    authors' loop; the result keeps the embeddings' gradient, as there)."""
    protos = prototypes.clone()
    for j in range(len(embeddings)):
        c = int(labels[j])
        protos[c] = F.normalize(protos[c] * momentum + embeddings[j] * (1 - momentum), dim=0)
    return protos


class CIDERState(nn.Module):
    """CIDER's projection head (penultimate features -> unit-norm embeddings) and class prototypes (a buffer)."""

    def __init__(self, dim: int, num_classes: int, embed_dim: int, head: str):
        super().__init__()
        self.head = (nn.Linear(dim, embed_dim) if head == "linear" else
                     nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, embed_dim)))
        self.register_buffer("prototypes", torch.zeros(num_classes, embed_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(features), dim=1)


@register_recipe("cider")
class CIDER(Recipe):
    summary = ("compactness + dispersion losses on unit-norm embeddings of a projection head, with EMA class "
               "prototypes, on two augmented views (Ming et al., ICLR 2023); scored with knn")
    paper = ("How to Exploit Hyperspherical Embeddings for Out-of-Distribution Detection? (Ming, Sun, Dia & Li, "
             "ICLR 2023)")
    reference = ("openood/trainers/cider_trainer.py, openood/networks/cider_net.py, "
                 "configs/pipelines/train/train_cider.yml, configs/networks/cider_net.yml")
    OPTIONS = {
        "temperature": Option(0.1, "T of both losses (train_cider.yml temp)"),
        "proto_m": Option(0.95, "prototype EMA momentum (train_cider.yml proto_m)"),
        "weight": Option(2.0, "w: loss = w * compactness + dispersion (train_cider.yml w)"),
        "embed_dim": Option(128, "embedding dimension (cider_net.yml feat_dim)"),
        "head": Option("mlp", "projection head: mlp (Linear-ReLU-Linear) | linear (cider_net.yml head)"),
    }
    views = 2
    initialised_from_data = True
    state_key = "cider"      # the name of the recipe's module in RecipeNet.extra

    def check_sphere(self) -> None:
        """The options of the hyperspherical embedding (CIDER's and NPOS's)."""
        self._positive("temperature", "embed_dim")
        m = self.options["proto_m"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise OODBenchError(f"{self.name}.proto_m must be in [0, 1), got {m!r}")
        if self.options["head"] not in ("mlp", "linear"):
            raise OODBenchError(f"{self.name}.head {self.options['head']!r}: use mlp or linear")

    def check(self):
        self.check_sphere()
        self._non_negative("weight")

    def modules(self, net):
        return {"cider": CIDERState(net.head.in_features, net.head.out_features, int(self.options["embed_dim"]),
                                    self.options["head"])}

    @torch.no_grad()
    def initialise(self, model, images, labels, prepare, batch_size: int = 256):
        """Prototypes = the normalised mean embedding of each class (network in eval mode), as OpenOOD's
        init_class_prototypes."""
        state, was = model.extra[self.state_key], model.training
        model.eval()
        sums = torch.zeros_like(state.prototypes)
        for i in range(0, len(images), batch_size):
            features, _ = model(prepare(images[i:i + batch_size]))
            sums.index_add_(0, labels[i:i + batch_size], state(features).float())
        counts = torch.bincount(labels, minlength=len(sums)).clamp_min(1)
        state.prototypes.copy_(F.normalize(sums / counts[:, None], dim=1))
        model.train(was)

    def sphere_losses(self, state: CIDERState, features: torch.Tensor, labels: torch.Tensor):
        """(compactness, dispersion) of the views' embeddings, after the per-sample prototype update (kept in
        `state`): CIDER's losses, which NPOS uses too."""
        embeddings = state(features).float()
        t = float(self.options["temperature"])
        protos = ema_prototypes(state.prototypes, embeddings, labels, float(self.options["proto_m"]))
        with torch.no_grad():
            state.prototypes.copy_(protos)
        return cider_compactness(embeddings, protos.detach(), labels, t), cider_dispersion(protos, t)

    def loss(self, model, x, labels):
        features, logits = model(x)                  # x: the views, one after the other
        labels = labels.repeat(len(x) // len(labels))
        comp, dis = self.sphere_losses(unwrap(model).extra["cider"], features, labels)
        unused = logits.float().sum() * 0.0   # the linear head takes no part (DDP expects a gradient for it)
        return float(self.options["weight"]) * comp + dis + unused, {"comp": comp.detach(), "dis": dis.detach()}


# -- NPOS -------------------------------------------------------------------------------------------------------------
def kth_sq_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Squared L2 distance of each L2-normalised query to its k-th nearest L2-normalised bank row (the bank's own
    rows included, at distance 0 from themselves): faiss's exact IndexFlatL2 when installed and on a CPU (as the
    knn method searches), else 2 - 2 x the k-th largest inner product."""
    queries, bank = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)
    if queries.device.type == "cpu":
        try:
            import faiss
        except ImportError:
            faiss = None
        if faiss is not None:
            index = faiss.IndexFlatL2(bank.shape[1])
            index.add(bank.detach().contiguous().numpy())
            squared, _ = index.search(queries.detach().contiguous().numpy(), k)
            return torch.from_numpy(squared[:, -1].copy())
    return (2 - 2 * chunked_topk(queries, bank, k)[:, -1]).clamp_min(0)


def npos_boundary(queue: torch.Tensor, k: int, select: int) -> torch.Tensor:
    """Indices of the `select` rows of one class queue (S, D) farthest from their k-th nearest neighbour in it
    (normalised): the ID points at the boundary (NPOS's KNN_dis_search_decrease), farthest first."""
    return kth_sq_distance(queue, queue, k).topk(select).indices


def npos_outliers(queue: torch.Tensor, noise: torch.Tensor, picks: torch.Tensor, k: int, select: int, keep: int,
                  cov_mat: float, selection: str = "released") -> torch.Tensor:
    """NPOS's outliers of one class (Tao et al. 2023; the authors' and OpenOOD's generate_outliers): the boundary
    points number `picks` (of the `select` farthest by k-NN distance) each get L = len(noise) candidates
    point + cov_mat * noise (in the unnormalised feature space); of these, `keep` per point with the largest
    k-NN distance to the normalised queue are returned, (len(picks) * keep, D).

    `selection`: `released` ranks the candidates as the released code does (their k-NN distances reshaped to
    (L, P) row-major, so that column p mixes the candidates of several points, and returns the candidates of point
    p at the row indices that ranking gives); `per_point` ranks each point's own L candidates (the paper's text)."""
    boundary = npos_boundary(queue, k, select)[picks]
    points = len(picks)
    candidates = (queue[boundary][:, None] + cov_mat * noise[None]).reshape(points * len(noise), -1)
    distance = kth_sq_distance(candidates, queue, k)
    offsets = torch.arange(points, device=distance.device) * len(noise)
    if selection == "released":
        rows = distance.view(len(noise), points).topk(keep, dim=0).indices           # (keep, P)
        index = (offsets[None] + rows).t().reshape(-1)
    else:
        rows = distance.view(points, len(noise)).topk(keep, dim=1).indices           # (P, keep)
        index = (offsets[:, None] + rows).reshape(-1)
    return candidates[index.to(candidates.device)]


def npos_uncertainty(id_scores: torch.Tensor, outlier_scores: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the MLP's logits: ID features label 1, synthesised outliers label 0."""
    scores = torch.cat([id_scores, outlier_scores]).float().reshape(-1)
    target = torch.cat([torch.ones(len(id_scores)), torch.zeros(len(outlier_scores))]).to(scores.device)
    return F.binary_cross_entropy_with_logits(scores, target)


class NPOSState(CIDERState):
    """CIDER's head and prototypes, the MLP that scores penultimate features as ID (logit > 0) or outlier, and a
    queue of the last `sample_number` penultimate features of each class (buffers: they travel in checkpoints)."""

    def __init__(self, dim: int, num_classes: int, embed_dim: int, head: str, sample_number: int):
        super().__init__(dim, num_classes, embed_dim, head)
        self.mlp = nn.Sequential(nn.Linear(dim, embed_dim), nn.ReLU(inplace=True), nn.Linear(embed_dim, 1))
        self.register_buffer("queue", torch.zeros(num_classes, sample_number, dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


@register_recipe("npos")
class NPOS(CIDER):
    summary = ("CIDER's losses + an uncertainty loss separating penultimate features from outliers synthesised "
               "around boundary ID features found by k-NN distance (Tao et al., ICLR 2023); scored with knn")
    paper = "Non-parametric Outlier Synthesis (Tao, Du, Zhu & Li, ICLR 2023)"
    reference = ("openood/trainers/npos_trainer.py, openood/networks/npos_net.py, "
                 "configs/pipelines/train/train_npos.yml, configs/networks/npos_net.yml")
    OPTIONS = {
        "temperature": Option(0.1, "T of the compactness and dispersion losses (train_npos.yml temp)"),
        "proto_m": Option(0.95, "prototype EMA momentum (train_npos.yml proto_m)"),
        "w_disp": Option(0.5, "weight of the dispersion loss (train_npos.yml w_disp)"),
        "w_comp": Option(1.0, "weight of the compactness loss (train_npos.yml w_comp)"),
        "weight": Option(0.1, "weight of the uncertainty loss (train_npos.yml loss_weight)"),
        "embed_dim": Option(128, "embedding dimension, also the MLP's hidden width (npos_net.yml feat_dim)"),
        "head": Option("mlp", "projection head: mlp (Linear-ReLU-Linear) | linear (npos_net.yml head)"),
        "sample_number": Option(1000, "penultimate features kept per class (train_npos.yml sample_number)"),
        "sample_from": Option(600, "Gaussian candidates around each picked boundary point (train_npos.yml "
                                   "sample_from)"),
        "k": Option(300, "the k of the k-NN distances (train_npos.yml K)"),
        "select": Option(200, "boundary points per class: the farthest by k-NN distance (train_npos.yml select)"),
        "pick_nums": Option(2, "boundary points picked at random per class and step (train_npos.yml pick_nums)"),
        "id_points_num": Option(200, "candidates kept per picked point: the farthest by k-NN distance "
                                     "(train_npos.yml ID_points_num)"),
        "cov_mat": Option(0.1, "scale of the standard Gaussian noise added to a boundary point (train_npos.yml "
                               "cov_mat)"),
        "start_epoch": Option(40, "epoch (counted from 1, as OpenOOD's epoch_idx) from which outliers are "
                                  "synthesised (train_npos.yml start_epoch_KNN)"),
        "mlp_decay_rate": Option(0.1, "the MLP's learning rate is train.lr times this (train_npos.yml "
                                      "mlp_decay_rate)"),
        "selection": Option("released", "how candidates are ranked: released (the released code's reshape, as "
                                        "OpenOOD) | per_point (each point's own candidates, the paper's text)"),
    }
    state_key = "npos"
    steps_per_epoch = 1

    def check(self):
        self.check_sphere()
        self._non_negative("w_disp", "w_comp", "weight", "cov_mat")
        self._positive("mlp_decay_rate")
        o = self.options
        for key in ("sample_number", "sample_from", "k", "select", "pick_nums", "id_points_num", "start_epoch"):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "start_epoch" else 1):
                raise OODBenchError(f"npos.{key} must be a whole number >= {0 if key == 'start_epoch' else 1}, "
                                    f"got {v!r}")
        for small, large in (("k", "sample_number"), ("select", "sample_number"), ("pick_nums", "select"),
                             ("id_points_num", "sample_from")):
            if o[small] > o[large]:
                raise OODBenchError(f"npos.{small} ({o[small]}) must be at most npos.{large} ({o[large]})")
        if o["selection"] not in ("released", "per_point"):
            raise OODBenchError(f"npos.selection {o['selection']!r}: use released or per_point")

    def set_epoch_length(self, steps: int) -> None:
        self.steps_per_epoch = max(1, int(steps))

    def modules(self, net):
        o = self.options
        return {"npos": NPOSState(net.head.in_features, net.head.out_features, int(o["embed_dim"]), o["head"],
                                  int(o["sample_number"]))}

    def optimizer_groups(self, model: nn.Module, weight_decay: float) -> list:
        mlp = {id(p) for p in unwrap(model).extra["npos"].mlp.parameters()}
        return [{"params": [p for p in model.parameters() if id(p) not in mlp], "weight_decay": weight_decay},
                {"params": [p for p in model.parameters() if id(p) in mlp], "weight_decay": weight_decay,
                 "lr_scale": float(self.options["mlp_decay_rate"])}]

    def outliers(self, queue: torch.Tensor) -> torch.Tensor:
        """One step's synthesised outliers of every class: one draw of standard Gaussian noise shared by the
        classes, then per class `pick_nums` of its boundary points at random (torch's generators)."""
        o = self.options
        noise = torch.randn(int(o["sample_from"]), queue.shape[-1], device=queue.device)
        return torch.cat([npos_outliers(queue[c], noise, torch.randperm(int(o["select"]))[:int(o["pick_nums"])],
                                        int(o["k"]), int(o["select"]), int(o["id_points_num"]),
                                        float(o["cov_mat"]), o["selection"]) for c in range(len(queue))])

    def loss(self, model, x, labels):
        features, logits = model(x)                  # x: the two views, one after the other
        state = unwrap(model).extra["npos"]
        labels = labels.repeat(len(x) // len(labels))
        ready = queue_full(state.queue, state.count)
        push_queue(state.queue, state.count, features.detach(), labels)
        epoch = int(state.steps) // self.steps_per_epoch + 1
        if ready and epoch >= int(self.options["start_epoch"]):
            outliers = self.outliers(state.queue).to(features.dtype)
            reg = npos_uncertainty(state.mlp(features), state.mlp(outliers))
        else:   # every parameter takes part in each step's graph (DDP expects gradients for all of them)
            reg = sum(p.sum() for p in state.mlp.parameters()) * 0.0
        state.steps += 1
        comp, dis = self.sphere_losses(state, features, labels)
        o = self.options
        unused = logits.float().sum() * 0.0   # the linear head takes no part (DDP expects a gradient for it)
        loss = float(o["w_disp"]) * dis + float(o["w_comp"]) * comp + float(o["weight"]) * reg + unused
        return loss, {"comp": comp.detach(), "dis": dis.detach(), "npos_reg": reg.detach()}


# -- RegMixup ---------------------------------------------------------------------------------------------------------
def regmixup_batch(x: torch.Tensor, labels: torch.Tensor, lam: float, index: torch.Tensor):
    """(the batch followed by its mixup lam * x + (1 - lam) * x[index]; the targets of the two mixup terms)."""
    mixed = lam * x + (1 - lam) * x[index]
    return torch.cat([x, mixed]), torch.cat([labels, labels]), torch.cat([labels, labels[index]])


def regmixup_loss(logits: torch.Tensor, targets_a: torch.Tensor, targets_b: torch.Tensor, lam: float):
    """lam * CE(logits, targets_a) + (1 - lam) * CE(logits, targets_b), over the clean and the mixed rows together
    (Pinto et al. 2022: cross-entropy on the clean batch plus mixup as a regulariser)."""
    logits = logits.float()
    return lam * F.cross_entropy(logits, targets_a) + (1 - lam) * F.cross_entropy(logits, targets_b)


@register_recipe("regmixup")
class RegMixup(Recipe):
    summary = "cross-entropy on the batch and on its mixup with lam ~ Beta(alpha, alpha) (Pinto et al. 2022)"
    paper = ("Using Mixup as a Regularizer Can Surprisingly Improve Accuracy and Out-of-Distribution Robustness "
             "(Pinto, Yang, Lim, Torr & Dokania, NeurIPS 2022)")
    reference = "openood/trainers/regmixup_trainer.py, configs/pipelines/train/train_regmixup.yml"
    OPTIONS = {"alpha": Option(20.0, "lam ~ Beta(alpha, alpha); alpha 0: lam = 1 (train_regmixup.yml alpha)")}

    def check(self):
        a = self.options["alpha"]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or a < 0:
            raise OODBenchError(f"regmixup.alpha must be a number >= 0, got {a!r}")

    def loss(self, model, x, labels):
        alpha = float(self.options["alpha"])
        # drawn from torch's CPU generator, whose state the checkpoints hold (a resumed run draws the same)
        lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
        index = torch.randperm(len(x)).to(x.device)
        batch, targets_a, targets_b = regmixup_batch(x, labels, lam, index)
        _, logits = model(batch)
        return regmixup_loss(logits, targets_a, targets_b, lam), {"lam": lam,
                                                                  "acc": accuracy(logits[:len(x)], labels)}


# -- AugMix -----------------------------------------------------------------------------------------------------------
def augmix_jsd(logits_clean, logits_aug1, logits_aug2) -> torch.Tensor:
    """AugMix's Jensen-Shannon consistency: mean of KL(p_i || M) over the three views, M their mean clamped to
    [1e-7, 1] (Hendrycks et al. 2020, eq. 1; OpenOOD's augmix_trainer)."""
    ps = [z.float().softmax(1) for z in (logits_clean, logits_aug1, logits_aug2)]
    log_mixture = torch.clamp((ps[0] + ps[1] + ps[2]) / 3.0, 1e-7, 1).log()
    return sum(F.kl_div(log_mixture, p, reduction="batchmean") for p in ps) / 3.0


@register_recipe("augmix")
class AugMix(Recipe):
    summary = ("cross-entropy on the clean batch + lam * Jensen-Shannon consistency with two AugMix views "
               "(Hendrycks et al., ICLR 2020)")
    paper = ("AugMix: A Simple Data Processing Method to Improve Robustness and Uncertainty (Hendrycks, Mu, Cubuk, "
             "Zoph, Gilmer & Lakshminarayanan, ICLR 2020)")
    reference = ("openood/trainers/augmix_trainer.py, openood/preprocessors/augmix_preprocessor.py, "
                 "configs/pipelines/train/train_augmix.yml, configs/preprocessors/augmix_preprocessor.yml")
    OPTIONS = {
        "lam": Option(12.0, "weight of the Jensen-Shannon term (train_augmix.yml lam)"),
        "severity": Option(1, "torchvision AugMix severity (augmix_preprocessor.yml)"),
        "mixture_width": Option(3, "augmentation chains mixed (augmix_preprocessor.yml)"),
        "chain_depth": Option(-1, "operations per chain; -1: 1 to 3 at random (augmix_preprocessor.yml)"),
        "alpha": Option(1.0, "Dirichlet / Beta parameter of the mixing weights (augmix_preprocessor.yml)"),
        "all_ops": Option(True, "include the colour/contrast/brightness/sharpness operations (augmix_preprocessor.yml)"),
        "group": Option(1, "images that share one draw of the chains' operations (1: each image its own, as OpenOOD; "
                           "larger: faster, the mixing weights stay per image)"),
    }
    views = 3

    def check(self):
        self._positive("severity", "mixture_width", "alpha", "group")
        if isinstance(self.options["lam"], bool) or not isinstance(self.options["lam"], (int, float)) \
                or self.options["lam"] < 0:
            raise OODBenchError(f"augmix.lam must be a number >= 0, got {self.options['lam']!r}")
        if not 1 <= int(self.options["severity"]) <= 10:
            raise OODBenchError(f"augmix.severity must be in 1..10, got {self.options['severity']!r}")
        if not isinstance(self.options["chain_depth"], int) or self.options["chain_depth"] == 0 \
                or self.options["chain_depth"] < -1:
            raise OODBenchError(f"augmix.chain_depth must be -1 or >= 1, got {self.options['chain_depth']!r}")

    def transform(self):
        from torchvision.transforms import AugMix as TorchvisionAugMix

        o = self.options
        return TorchvisionAugMix(severity=int(o["severity"]), mixture_width=int(o["mixture_width"]),
                                 chain_depth=int(o["chain_depth"]), alpha=float(o["alpha"]),
                                 all_ops=bool(o["all_ops"]))

    def augmix(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's AugMix (OpenOOD's preprocessor) on uint8 images, `group` images per draw of operations."""
        mix, g = self.transform(), int(self.options["group"])
        return torch.cat([mix(x[i:i + g]) for i in range(0, len(x), g)])

    def views_of(self, x, augment):
        clean = augment(x)
        return [clean, self.augmix(clean), self.augmix(clean)]

    def loss(self, model, x, labels):
        _, logits = model(x)
        clean, aug1, aug2 = logits.split(len(labels))
        ce, jsd = F.cross_entropy(clean.float(), labels), augmix_jsd(clean, aug1, aug2)
        return ce + float(self.options["lam"]) * jsd, {"ce": ce.detach(), "jsd": jsd.detach(),
                                                        "acc": accuracy(clean, labels)}


# -- PixMix -----------------------------------------------------------------------------------------------------------
@register_recipe("pixmix")
class PixMix(Recipe):
    summary = ("cross-entropy on PixMix images: each training image mixed 0..k times with its augmentations and a "
               "picture of the mixing set (Hendrycks et al., CVPR 2022)")
    paper = ("PixMix: Dreamlike Pictures Comprehensively Improve Safety Measures (Hendrycks, Zou, Mazeika, Tang, Li, "
             "Song & Steinhardt, CVPR 2022)")
    reference = ("openood/preprocessors/pixmix_preprocessor.py, configs/preprocessors/pixmix_preprocessor.yml, "
                 "openood/trainers/base_trainer.py")
    OPTIONS = {
        "mixing_set": Option("fractals", "the mixing pictures: any dataset spec (its train split at the ID shape), "
                                         "e.g. folder:PATH of the paper's fractals and feature visualisations; "
                                         "default: the offline stand-in `fractals` (procedural IFS fractals)",
                             dataset=True),
        "k": Option(4, "at most k mixing rounds, 0..k uniformly (pixmix_preprocessor.yml k)"),
        "beta": Option(3.0, "mixing weights from Beta(beta, 1) / Beta(1, beta) (pixmix_preprocessor.yml beta)"),
        "aug_severity": Option(3, "severity of the augmentation operations (pixmix_preprocessor.yml aug_severity)"),
        "all_ops": Option(True, "include colour, contrast, brightness, sharpness (pixmix_preprocessor.yml all_ops; "
                                "the authors' cifar.py: off unless --all-ops)"),
        "mixing_resize": Option(1.125, "a mixing picture is resized to this times the image size, then a random "
                                       "crop of the image size is taken (OpenOOD's CIFAR rule: Resize(36), "
                                       "RandomCrop(32))"),
    }
    mixing_set_key = "mixing_set"
    mixing = None            # uint8 (N, C, H', W'): the mixing set, resized (`use_images`)

    def check(self):
        spec = self.options["mixing_set"]
        if not isinstance(spec, str) or not spec.strip():
            raise OODBenchError(f"train.recipe=pixmix needs a mixing set, got {spec!r}: set pixmix.mixing_set=SPEC "
                                f"(fractals, the offline stand-in, or folder:PATH of fractal pictures)")
        k = self.options["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise OODBenchError(f"pixmix.k must be a whole number >= 0, got {k!r}")
        self._positive("beta")
        s = self.options["aug_severity"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.1 <= s <= 10:
            raise OODBenchError(f"pixmix.aug_severity must be a number in [0.1, 10], got {s!r}")
        if not isinstance(self.options["all_ops"], bool):
            raise OODBenchError(f"pixmix.all_ops must be true or false, got {self.options['all_ops']!r}")
        r = self.options["mixing_resize"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r < 1:
            raise OODBenchError(f"pixmix.mixing_resize must be a number >= 1, got {r!r}")

    def use_images(self, images: torch.Tensor) -> None:
        """Take the mixing set (uint8 (N, C, H, W) at the ID shape) and resize it once by `mixing_resize`."""
        if images is None or len(images) == 0:
            raise OODBenchError(f"pixmix.mixing_set {self.options['mixing_set']!r} has no images; give a set with "
                                f"pictures (fractals or folder:PATH)")
        h, w = images.shape[2:]
        r = float(self.options["mixing_resize"])
        size = (max(h, round(h * r)), max(w, round(w * r)))
        images = images.cpu()
        if size != (h, w):
            images = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
            images = images.round_().clamp_(0, 255).to(torch.uint8)
        self.mixing = images

    def mixing_picture(self, h: int, w: int, draws) -> torch.Tensor:
        """A random mixing picture, randomly cropped to h x w, as float (C, h, w) in [0, 1]."""
        picture = self.mixing[draws.integer(len(self.mixing))]
        top, left = draws.integer(picture.shape[1] - h + 1), draws.integer(picture.shape[2] - w + 1)
        return picture[:, top:top + h, left:left + w].to(torch.float32).div(255)

    def pixmix(self, x: torch.Tensor) -> torch.Tensor:
        """PixMix images (float in [0, 1], on x's device) of the uint8 batch x, one image at a time (OpenOOD's
        per-image preprocessor), every draw from torch's CPU generator."""
        from oodbench.data import pixmix as ops

        if self.mixing is None:
            raise OODBenchError("pixmix: no mixing set was given to the recipe (use_images) before training")
        if self.mixing.shape[1] != x.shape[1]:
            raise OODBenchError(f"pixmix: the mixing set has {self.mixing.shape[1]} channels, the images "
                                f"{x.shape[1]}; load it at the in-distribution shape")
        o, draws, cpu = self.options, ops.TorchDraws(), x.cpu()
        out = torch.empty(x.shape, dtype=torch.float32)
        for i in range(len(cpu)):
            mixing = self.mixing_picture(x.shape[2], x.shape[3], draws)
            out[i] = ops.pixmix(ops.to_pil(cpu[i]), mixing, int(o["k"]), float(o["beta"]), o["aug_severity"],
                                bool(o["all_ops"]), draws)
        return out.to(x.device)

    def views_of(self, x, augment):
        return [self.pixmix(augment(x))]


class RecipeNet(nn.Module):
    """What the engine trains under a recipe: the classifier `net` and the recipe's `extra` modules (and buffers,
    e.g. VOS's feature queues), so that checkpoints and resume hold all of them. `forward(x)` gives
    (penultimate features, logits) from one pass; `optimizer_groups` is the recipe's (the engine asks for it)."""

    def __init__(self, net: nn.Module, recipe: Recipe):
        super().__init__()
        self.net = net
        self.extra = nn.ModuleDict(recipe.modules(net))
        self._recipe = recipe

    def optimizer_groups(self, weight_decay: float):
        return self._recipe.optimizer_groups(self, weight_decay)

    def forward(self, x):
        features = self.net.features(x)
        return features, self.net.head(features)


def recipe_sections() -> dict:
    """{recipe: {option: default}}: the config sections of the recipes that have options."""
    return {name: cls.defaults() for name, cls in RECIPES.items() if cls.OPTIONS}


def recipe_dataset_keys() -> tuple:
    return tuple(f"{name}.{k}" for name, cls in RECIPES.items() for k, o in cls.OPTIONS.items() if o.dataset)


def get_recipe(name) -> type:
    if name not in RECIPES:
        close = difflib.get_close_matches(str(name), RECIPES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OODBenchError(f"unknown train.recipe {name!r}.{hint} Recipes: {', '.join(RECIPES)} "
                            f"(docs/recipes.md)")
    return RECIPES[name]


def recipe_from_config(cfg: dict) -> Recipe:
    """The run's recipe with its options (`cfg[<recipe>]`), checked; incompatible settings are one-line errors."""
    train = cfg.get("train") or {}
    name = train.get("recipe", "plain")
    cls = get_recipe(name)
    recipe = cls(**(cfg.get(name) or {}))
    recipe.check_train(train)
    if name != "plain":
        if train.get("loss", "ce") != "ce":
            raise OODBenchError(f"train.recipe={name} replaces the classification loss; it needs train.loss=ce, "
                                f"not {train.get('loss')!r}")
        if (cfg.get("oe") or {}).get("outliers"):
            raise OODBenchError(f"train.recipe={name} and oe.outliers (energy outlier-exposure fine-tuning) cannot "
                                f"be combined; unset one of them")
    return recipe
