"""The model layer: any classifier as one `ClassifierModel` (network + preprocessing + features/head split).

    run:PATH (or a bare run folder)      a classifier oodbench trained
    torchvision:NAME[:WEIGHTS]           e.g. torchvision:resnet50:IMAGENET1K_V2; WEIGHTS `none` = random (seeded)
    timm:NAME[:pretrained]               needs the optional extra oodbench[timm]
    openood:resnet18_32x32:PATH          OpenOOD v1.5's CIFAR ResNet-18 checkpoints
    openood:NAME                         a published one by name (`oodbench models list`; model_registry.py)
    python:MODULE:CALLABLE[:STATE_DICT]  your own factory (called with no arguments), plus an optional weights file
    torchscript:PATH                     a scripted/traced network (logits only: no features/head split)
    open_clip:ARCH:WEIGHTS               zero-shot CLIP (open_clip; WEIGHTS a file, a pretrained tag, or none)
    hf-clip:DIR                          zero-shot CLIP from a saved transformers CLIPModel (docs/clip.md)

`load_model(spec, mean=, std=, size=, head=, layers=)` overrides the preprocessing, names the head layer or the
intermediate layers. State dicts load with `weights_only=True`. The features are the input of the head `nn.Linear`,
captured by a forward hook, so one forward gives both features and logits and the user's class is not changed.
`feature_maps` returns the outputs of named intermediate modules the same way (forward hooks, one forward).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torchvision.transforms.v2 import functional as TF

from oodbench.config import config_path, read_meta, read_yaml
from oodbench.data import transforms
from oodbench.data.convert import luminance
from oodbench.engine import checkpoint
from oodbench.errors import OODBenchError
from oodbench.nets.classifiers import Classifier, _Block, build_classifier

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# OpenOOD v1.5's normalisation of its CIFAR sets (openood/preprocessors/transform.py, normalization_dict).
OPENOOD_STATS = {10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                 100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
SOURCES = ("run", "torchvision", "timm", "openood", "python", "torchscript", "open_clip", "hf-clip")
CLIP_SOURCES = ("open_clip", "hf-clip")   # zero-shot heads from class names (load_clip)


class ClassifierModel:
    """A classifier with its preprocessing: uint8 (B, C, H, W) → channels → [0, 1] → resize/crop → mean/std.

    - `net`: the network (eval mode); `head`: its final `nn.Linear` (None for torchscript models);
    - `prepare(x)`: the network's float input; `logits(x)`, `features(x)`, `features_and_logits(x)` take uint8 batches;
    - `feature_maps(x, layers=None)`: the outputs of named modules and the logits, from one forward;
    - `digest`: a hash of the weights, the preprocessing and the named layers, for cache keys.
    `size` is the network's input (H, W) (None: images keep their size); `resize` an optional shorter side to resize
    to before a centre crop to `size` (the ImageNet recipe, e.g. 256 then 224). `layers`: the module names of
    `feature_maps` (None or "auto": `auto_layers`).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], size=None, resize=None,
                 channels: Optional[int] = None, head: Optional[nn.Module] = None, name: str = "model",
                 layers: Optional[Sequence[str]] = None):
        self.net = net.eval()
        self.mean, self.std = _stats(mean, "mean", name), _stats(std, "std", name)
        if len(self.mean) == 1 < len(self.std):         # a scalar applies to every channel
            self.mean = self.mean * len(self.std)
        elif len(self.std) == 1 < len(self.mean):
            self.std = self.std * len(self.mean)
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise OODBenchError(f"model {name}: mean and std need the same number of values and std > 0, got "
                                f"mean={self.mean}, std={self.std} (set model.mean / model.std)")
        self.size = _pair(size, "size")
        self.resize = None if resize is None else int(resize)
        self.channels = channels if channels is not None else input_channels(net)
        self.head, self.name = head, name
        self.layers = _layer_list(layers)
        for layer in self.layers or ():
            self.module(layer)
        self._captured: list = []
        self._checked = False
        if head is not None:
            head.register_forward_hook(lambda _m, inputs, _out: self._captured.append(inputs[0]))
        named = {"layers": self.layers} if self.layers else {}   # named layers change gram/mds/rankfeat scores
        self.digest = model_digest(net, {"name": name, "mean": self.mean, "std": self.std, "size": self.size,
                                         "resize": self.resize, "channels": self.channels, **named})

    def to(self, device) -> "ClassifierModel":
        self.net.to(device)
        return self

    @property
    def num_classes(self) -> Optional[int]:
        return self.head.out_features if isinstance(self.head, nn.Linear) else None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch → the network's normalised float input."""
        if self.channels is not None and x.shape[1] != self.channels:
            if (x.shape[1], self.channels) == (1, 3):
                x = x.expand(-1, 3, -1, -1)
            elif (x.shape[1], self.channels) == (3, 1):
                x = luminance(x)
            else:
                raise OODBenchError(f"model {self.name} takes {self.channels}-channel images, got {x.shape[1]}")
        x = transforms.to_unit(x)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:   # at the input size already: as it is
            if self.resize is not None:                                   # (streamed folders are decoded so)
                x = TF.center_crop(TF.resize(x, [self.resize], antialias=True), list(self.size))
            else:
                x = TF.resize(x, list(self.size), antialias=True)
        if len(self.mean) not in (1, x.shape[1]):   # would broadcast 1-channel images to 3 channels silently
            raise OODBenchError(f"model {self.name} normalises {len(self.mean)} channels (mean {self.mean}) but the "
                                f"images have {x.shape[1]}; set model.mean / model.std for them (a number applies to "
                                f"every channel)")
        return transforms.normalize(x, self.mean, self.std)

    def forward_split(self, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, D), logits (B, K)) of a prepared input, from one forward pass."""
        if self.head is None:
            raise OODBenchError(f"model {self.name} has no features/head split (a torchscript model gives logits "
                                f"only); load it as python:MODULE:CALLABLE:WEIGHTS, or use a logit-based method")
        self._captured.clear()
        logits = self._output(self.net(inp))
        if len(self._captured) != 1:
            raise OODBenchError(f"model {self.name}: the head layer ran {len(self._captured)} times in one forward; "
                                f"name the final linear layer with --set model.head=LAYER_NAME")
        features = self._captured.pop().flatten(1)
        if not self._checked:
            self._check_head_is_last(features, logits)
        return features, logits

    def _check_head_is_last(self, features, logits) -> None:
        with torch.no_grad():
            again = self.head(features)
        self._captured.clear()
        if again.shape != logits.shape or not torch.allclose(again.float(), logits.float(), rtol=1e-3, atol=1e-4):
            raise OODBenchError(f"model {self.name}: the output is not head(features) for the layer taken as the "
                                f"head; name the final linear layer with --set model.head=LAYER_NAME")
        self._checked = True

    def _output(self, out) -> torch.Tensor:
        """The network's output, which must be a (B, K) logits tensor."""
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            what = f"a {type(out).__name__}" if not isinstance(out, torch.Tensor) else f"a {out.dim()}-D tensor"
            raise OODBenchError(f"model {self.name} returns {what}; oodbench needs a network whose forward returns "
                                f"(batch, classes) logits: wrap it in a module that returns only the logits")
        return out

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self._output(self.net(self.prepare(x))).float()
        self._captured.clear()   # the head hook's features are not needed here (and would pile up over a set)
        return out

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_split(self.prepare(x))[0].float()

    @torch.no_grad()
    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.forward_split(self.prepare(x))
        return features.float(), logits.float()

    # -- intermediate feature maps ----------------------------------------------------------------------------------
    def module(self, name: str) -> nn.Module:
        """The submodule called `name` (as in `net.named_modules()`)."""
        try:
            return self.net.get_submodule(name)
        except AttributeError:
            top = ", ".join(n for n, _ in self.net.named_children())
            raise OODBenchError(f"model.layers: model {self.name} has no module {name!r}; its top-level modules are "
                                f"{top} (nested names use dots, e.g. layer4.1)") from None

    def layer_names(self) -> list:
        """The layers `feature_maps` returns by default: `model.layers`, else `auto_layers(net)`."""
        if self.layers:
            return list(self.layers)
        names, _ = auto_layers(self.net)
        if not names:
            raise OODBenchError(f"model {self.name}: no automatic choice of intermediate layers for a "
                                f"{type(self.net).__name__}; name them with --set model.layers=[NAME,...]")
        return names

    def forward_maps(self, inp: torch.Tensor, layers: Sequence[str], edit: Optional[dict] = None):
        """({name: output} of the named modules, logits) of a prepared input, from one forward (gradients as the
        caller has them). `edit` {name: fn} replaces that module's output by fn(output): the rest of the network
        runs on the edited map."""
        if self.head is None:
            raise OODBenchError(f"model {self.name} gives logits only (a torchscript model takes no forward hooks); "
                                f"load it as python:MODULE:CALLABLE:WEIGHTS for methods that read feature maps")
        edit = edit or {}
        maps: dict = {}

        def hook(name):
            def capture(_module, _inputs, output):
                if name in maps:
                    raise OODBenchError(f"model {self.name}: layer {name!r} ran more than once in one forward; name "
                                        f"another with --set model.layers=[...]")
                if not isinstance(output, torch.Tensor) or output.dim() < 2:
                    raise OODBenchError(f"model {self.name}: layer {name!r} does not output a (B, C, ...) tensor")
                maps[name] = edit[name](output) if name in edit else output
                return maps[name]
            return capture

        handles = [self.module(n).register_forward_hook(hook(n)) for n in dict.fromkeys([*layers, *edit])]
        try:
            logits = self.net(inp)
        finally:
            for handle in handles:
                handle.remove()
            self._captured.clear()
        missing = [n for n in dict.fromkeys([*layers, *edit]) if n not in maps]
        if missing:
            raise OODBenchError(f"model {self.name}: layer(s) {', '.join(missing)} did not run in the forward pass")
        return {n: maps[n] for n in layers}, logits

    @torch.no_grad()
    def feature_maps(self, x: torch.Tensor, layers: Optional[Sequence[str]] = None) -> tuple[dict, torch.Tensor]:
        """({name: (B, C, H, W) float32 map}, logits (B, K)) of a uint8 batch: the outputs of the named modules
        (default `layer_names()`), from one forward."""
        maps, logits = self.forward_maps(self.prepare(x), list(layers or self.layer_names()))
        return {k: v.float() for k, v in maps.items()}, logits.float()


def _stats(value, what: str, name: str) -> list:
    """model.mean / model.std: a number (every channel) or a list of numbers (one per channel)."""
    number = (int, float)
    if isinstance(value, number) and not isinstance(value, bool):
        return [float(value)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, number) and not isinstance(v, bool)
                                                          for v in value):
        return [float(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() and value.dim() <= 1 and value.is_floating_point():
        return [float(v) for v in value.reshape(-1)]
    raise OODBenchError(f"model {name}: {what} must be a number or a list of numbers (one per channel), e.g. "
                        f"model.{what}=[0.5,0.5,0.5], got {value!r}")


def _layer_list(layers) -> Optional[list]:
    if layers is None or layers == "auto":
        return None
    if isinstance(layers, str) or not isinstance(layers, (list, tuple)) or not layers or \
            not all(isinstance(n, str) and n for n in layers):
        raise OODBenchError(f"model.layers must be auto or a list of module names, e.g. [layer3, layer4], got "
                            f"{layers!r}")
    return list(layers)


def auto_layers(net: nn.Module) -> tuple[Optional[list], bool]:
    """(the default intermediate layers, whether `net` is ResNet-like), or (None, False) for other architectures.

    torchvision/timm ResNets (and OpenOOD's resnet18_32x32, a torchvision ResNet here) give OpenOOD's feature list:
    the stem output (`relu` / `act1`) and layer1..layer4. oodbench's own nets give their stage outputs: the stem
    and each stage's last block (resnet20, wrn40_2; for the pre-activation WRN the last stage's map after its final
    BN-ReLU), or each convolution stage's ReLU (small_cnn, not ResNet-like).
    """
    prefix, body = ("body.", net.body) if isinstance(net, Classifier) else ("", net)
    children = dict(body.named_children())
    stages = [f"layer{i}" for i in range(1, 5)]
    stem = next((n for n in ("relu", "act1") if n in children), None)
    if stem and all(s in children for s in stages):
        return [prefix + n for n in (stem, *stages)], True
    if not (isinstance(net, Classifier) and isinstance(body, nn.Sequential)):
        return None, False
    modules = list(body)
    blocks = [i for i, m in enumerate(modules) if isinstance(m, _Block)]
    relus = [i for i, m in enumerate(modules) if isinstance(m, nn.ReLU)]
    if not blocks:
        return [f"body.{i}" for i in relus] or None, False
    ends = [i for i in blocks if i + 1 not in blocks or modules[i + 1].conv1.stride != (1, 1)]
    last = max([i for i in relus if i > blocks[-1]], default=ends[-1])
    return [f"body.{i}" for i in (blocks[0] - 1, *ends[:-1], last)], True


def wrap(net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD, size=None, head=None, resize=None,
         name: str = "", layers=None) -> ClassifierModel:
    """Your own network as a ClassifierModel. `head`: the final linear layer's name (default: the last nn.Linear);
    `layers`: the intermediate modules of `feature_maps` (default: `auto_layers`)."""
    if not isinstance(net, nn.Module):
        raise OODBenchError(f"wrap needs an nn.Module, got {type(net).__name__}")
    return ClassifierModel(net, mean, std, size, resize, head=find_head(net, head), name=name or type(net).__name__,
                           layers=layers)


def find_head(net: nn.Module, name: Optional[str] = None) -> Optional[nn.Module]:
    """The named layer, or the last nn.Linear of `net` (None for a torchscript module, which takes no hooks)."""
    if isinstance(net, torch.jit.ScriptModule):
        if name:
            raise OODBenchError("model.head cannot be used with a torchscript model (it takes no forward hooks)")
        return None
    modules = dict(net.named_modules())
    if name:
        if name not in modules:
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise OODBenchError(f"model.head={name!r}: no such layer; the linear layers are {', '.join(linears)}")
        if not isinstance(modules[name], nn.Linear):
            raise OODBenchError(f"model.head={name!r} is a {type(modules[name]).__name__}, not an nn.Linear")
        return modules[name]
    linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
    if not linears:
        raise OODBenchError(f"{type(net).__name__} has no nn.Linear layer to use as the head; name one with "
                            f"--set model.head=LAYER_NAME")
    return linears[-1]


def input_channels(net: nn.Module) -> Optional[int]:
    """Input channels of the first 4-D weight (the stem convolution), or None when there is none."""
    for p in net.parameters():
        if p.dim() == 4:
            return int(p.shape[1])
    return None


def model_digest(net: nn.Module, preprocessing: dict) -> str:
    h = hashlib.sha1(json.dumps(preprocessing, sort_keys=True).encode())
    for key, value in net.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
                 if value.numel() else b"")
    return h.hexdigest()[:20]


def _pair(size, what: str):
    if size is None:
        return None
    values = [size, size] if isinstance(size, int) else list(size)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise OODBenchError(f"model.{what} must be a positive integer or [height, width], got {size!r}")
    return tuple(values)


# ---------------------------------------------------------------------------------------------------- loading
def load_model(spec: str, mean=None, std=None, size=None, head: Optional[str] = None, device="cpu",
               seed: int = 0, layers=None, clip: Optional[dict] = None, in_dataset: Optional[str] = None,
               data_root=None, ensemble_mode: Optional[str] = None) -> ClassifierModel:
    """A ClassifierModel from a spec (see the module docstring); mean/std/size/head override what the source says;
    `layers` names the intermediate modules of `feature_maps`. For open_clip:/hf-clip: specs, `clip` holds
    load_clip's names/templates/logit_scale and `in_dataset` names the set whose class names make the head.
    Comma-separated specs `A,B,C` make a deep ensemble (`ensemble`; member i loaded with seed + i, each with the
    mean/std/size/head given here); `ensemble_mode` is its `combine` (logits, the default, or softmax)."""
    if not isinstance(spec, str) or not spec.strip():
        raise OODBenchError(f"model spec must be a non-empty string such as torchvision:resnet18:none, got {spec!r}")
    spec = spec.strip()
    source, _, rest = spec.partition(":")
    if source in CLIP_SOURCES and "," not in spec:   # (an ensemble's CLIP members come through here one by one)
        if head is not None or layers is not None:
            raise OODBenchError(f"{spec}: model.head / model.layers do not apply to a zero-shot CLIP model (its head "
                                f"is the class text embeddings)")
        return load_clip(spec, in_dataset=in_dataset, data_root=data_root, mean=mean, std=std, size=size,
                         device=device, seed=seed, **(clip or {}))
    if clip and "," not in spec:
        raise OODBenchError(f"clip.{next(iter(clip))} applies to open_clip:/hf-clip: models, not {spec}")
    if "," in spec:   # A,B,C: a deep ensemble of the members (each loaded as its own spec, seed + i)
        members = [load_model(part, mean=mean, std=std, size=size, head=head, device=device, seed=seed + i,
                              clip=clip, in_dataset=in_dataset, data_root=data_root)
                   for i, part in enumerate(_ensemble_parts(spec))]
        return ensemble(members, combine=ensemble_mode or "logits", name=spec, layers=layers).to(device)
    if ensemble_mode is not None:
        raise OODBenchError(f"model.ensemble applies to an ensemble of models (--model A,B,C), not {spec}")
    if source not in SOURCES:
        if Path(spec).is_dir():
            source, rest = "run", spec
        else:
            raise OODBenchError(f"unknown model spec {spec!r}; start it with one of {', '.join(SOURCES)} "
                                f"(e.g. torchvision:resnet18:IMAGENET1K_V1) or give a run folder")
    if not rest:
        raise OODBenchError(f"model spec {spec!r} is incomplete; e.g. {EXAMPLES[source]}")
    net, defaults = LOADERS[source](rest, spec, seed)
    settings = {**defaults, **{k: v for k, v in {"mean": mean, "std": std, "size": size}.items() if v is not None}}
    if size is not None:
        settings["resize"] = None
    layer = head or settings.pop("head", None)
    model = ClassifierModel(net, settings["mean"], settings["std"], settings.get("size"), settings.get("resize"),
                            settings.get("channels"), find_head(net, layer), name=spec, layers=layers)
    return model.to(device)


EXAMPLES = {"run": "run:runs/classifier-cifar10-s0", "torchvision": "torchvision:resnet50:IMAGENET1K_V2",
            "timm": "timm:resnet50:pretrained", "openood": "openood:resnet18_32x32:PATH/best.ckpt",
            "python": "python:mypackage.nets:build:weights.pt", "torchscript": "torchscript:model.pt",
            "open_clip": "open_clip:ViT-B-16:PATH/open_clip_pytorch_model.bin", "hf-clip": "hf-clip:DIR"}
CLIP_OPTIONS = ("names", "templates", "logit_scale")   # --set clip.KEY=VALUE


# ---------------------------------------------------------------------------------------------------- deep ensembles
ENSEMBLE_MODES = ("logits", "softmax")


class EnsembleNet(nn.Module):
    """The members' networks as one: images in [0, 1] (the shared channels and size) in, each member's own
    normalisation applied inside (buffers `mean_i` / `std_i`), and

    - `combine="logits"`: the mean of the members' logits (OpenOOD's `ensemble` postprocessor). When every member
      has a linear head, this is one linear layer `head` over the members' concatenated penultimate features
      (weight [W_1 ... W_M] / M, bias the mean of the b_m), so feature methods see the concatenated features;
    - `combine="softmax"`: log of the mean of the members' softmax probabilities (the predictive distribution of
      Lakshminarayanan et al. 2017): softmax of these logits is the mean softmax. Logits only (no head).
    """

    def __init__(self, members: Sequence, combine: str = "logits"):
        super().__init__()
        self.members_ = list(members)           # the ClassifierModels (their forward_split checks each head)
        self.nets = nn.ModuleList(m.net for m in members)
        self.combine = combine
        for i, m in enumerate(members):
            self.register_buffer(f"mean_{i}", torch.tensor(m.mean).view(1, -1, 1, 1))
            self.register_buffer(f"std_{i}", torch.tensor(m.std).view(1, -1, 1, 1))
        self.head = None
        if combine == "logits" and all(isinstance(m.head, nn.Linear) for m in members):
            heads = [m.head for m in members]
            self.head = nn.Linear(sum(h.in_features for h in heads), heads[0].out_features)
            with torch.no_grad():
                self.head.weight.copy_(torch.cat([h.weight.detach().float() for h in heads], 1) / len(heads))
                self.head.bias.copy_(torch.stack([h.bias.detach().float() if h.bias is not None else
                                                  torch.zeros(h.out_features) for h in heads]).mean(0))
            self.head.requires_grad_(False)

    def member_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return (x - getattr(self, f"mean_{i}")) / getattr(self, f"std_{i}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            features = [m.forward_split(self.member_input(i, x))[0] for i, m in enumerate(self.members_)]
            self._check_shapes([f.shape[:1] for f in features])
            return self.head(torch.cat([f.to(self.head.weight.dtype) for f in features], 1))
        logits = [m._output(m.net(self.member_input(i, x))).float() for i, m in enumerate(self.members_)]
        for m in self.members_:
            m._captured.clear()
        self._check_shapes([z.shape for z in logits])
        stacked = torch.stack(logits)
        if self.combine == "logits":
            return stacked.mean(0)
        return torch.logsumexp(stacked.log_softmax(2), 0) - math.log(len(logits))

    def _check_shapes(self, shapes) -> None:
        if len({tuple(s) for s in shapes}) > 1:
            raise OODBenchError(f"the ensemble's members give outputs of different shapes "
                                f"({', '.join(str(tuple(s)) for s in shapes)}); every member must classify the "
                                f"same classes")


def ensemble(models: Sequence, combine: str = "logits", name: Optional[str] = None, layers=None) -> ClassifierModel:
    """A deep ensemble of ClassifierModels (or nn.Modules, wrapped with `wrap`) as one ClassifierModel that every
    classifier method scores: `combine="logits"` the mean logits (OpenOOD's `ensemble`; with the concatenated
    features and one linear head when every member has one), `"softmax"` the log of the mean softmax. The members
    must take the same channels and input size and give the same number of classes (checked here when their heads
    say it, else by the first forward); each keeps its own mean/std."""
    if combine not in ENSEMBLE_MODES:
        raise OODBenchError(f"model.ensemble (the ensemble's combination) is logits or softmax, got {combine!r}")
    if isinstance(models, (str, nn.Module, ClassifierModel)) or not isinstance(models, (list, tuple)):
        raise OODBenchError("ensemble takes a list of models (ClassifierModels or nn.Modules)")
    members = [wrap(m) if isinstance(m, nn.Module) else m for m in models]
    if len(members) < 2 or not all(isinstance(m, ClassifierModel) for m in members):
        raise OODBenchError(f"an ensemble needs at least two models (ClassifierModels or nn.Modules), got "
                            f"{', '.join(type(m).__name__ for m in members) or 'none'}")
    for what in ("size", "resize", "channels", "num_classes"):
        values = [getattr(m, what) for m in members]
        if what == "num_classes" and None in values:
            continue   # logits only: the first forward compares the members' outputs
        if len(set(values)) > 1:
            listed = ", ".join(f"{m.name}: {v}" for m, v in zip(members, values))
            raise OODBenchError(f"the ensemble's members differ in {what.replace('num_classes', 'class count')} "
                                f"({listed}); ensemble models of one input size and one set of classes")
    first = members[0]
    net = EnsembleNet(members, combine)
    channels = first.channels or len(first.mean)
    return ClassifierModel(net, [0.0] * channels, [1.0] * channels, first.size, first.resize, first.channels,
                           net.head, name=name or "ensemble(" + ",".join(m.name for m in members) + ")",
                           layers=layers)


def _ensemble_parts(spec: str) -> list:
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) < 2 or not all(parts):
        raise OODBenchError(f"model spec {spec!r}: an ensemble is comma-separated model specs A,B,C with none empty")
    return parts


# ---------------------------------------------------------------------------------------------------- zero-shot CLIP
def load_clip(spec: str, names=None, templates=None, in_dataset: Optional[str] = None, data_root=None,
              logit_scale: Optional[float] = None, mean=None, std=None, size=None, device="cpu",
              seed: int = 0) -> ClassifierModel:
    """A zero-shot CLIP `ClassifierModel` from `open_clip:ARCH:WEIGHTS` or `hf-clip:DIR` (docs/clip.md): its head
    holds the class prompts' text embeddings. `names`: a list, a names file, or None (the names of `in_dataset`,
    oodbench.data.classnames); `templates`: see nets.clip.resolve_templates (default MCM's "a photo of a {}.");
    `logit_scale`: the head's scale (default the model's own, 100 for OpenAI's CLIP)."""
    from oodbench.nets import clip as nets_clip

    source, _, rest = spec.partition(":")
    if source == "open_clip":
        arch, _, weights = rest.partition(":")
        if not arch or not weights:
            raise OODBenchError(f"{spec}: write open_clip:ARCH:WEIGHTS (a weights file, an open_clip pretrained tag, "
                                f"or none), e.g. {EXAMPLES['open_clip']}")
        encoder, prep = nets_clip.build_open_clip(arch, weights, spec, seed)
    elif source == "hf-clip":
        if not rest:
            raise OODBenchError(f"{spec}: write hf-clip:DIR (a folder saved with CLIPModel.save_pretrained)")
        encoder, prep = nets_clip.build_hf_clip(rest, spec)
    else:
        raise OODBenchError(f"load_clip takes open_clip:ARCH:WEIGHTS or hf-clip:DIR, got {spec!r}")
    names = clip_names(names, in_dataset, data_root)
    encoder.to(device)   # the class prompts are encoded once, here, on the device asked for
    net = nets_clip.ZeroShotCLIP(encoder, names, nets_clip.resolve_templates(templates), logit_scale)
    if size is not None:
        prep = {**prep, "size": size, "resize": None}
    model = ClassifierModel(net, prep["mean"] if mean is None else mean, prep["std"] if std is None else std,
                            prep["size"], prep["resize"], 3, net.head, name=spec)
    return model.to(device)


def wrap_clip(image_encoder, text_encoder, tokenizer, names, templates=None, logit_scale: float = 100.0,
              patch_encoder=None, mean=None, std=None, size=224, resize=None, name: str = "clip") -> ClassifierModel:
    """Your own CLIP-like model as a zero-shot `ClassifierModel`: `image_encoder(x) -> (B, D)` on normalised float
    images, `text_encoder(tokenizer(prompts)) -> (N, D)`, optional `patch_encoder(x) -> (B, P, D)` (GL-MCM);
    `names` a list of class names or a names file. mean/std default to CLIP's."""
    from oodbench.nets import clip as nets_clip

    encoder = nets_clip.CallableEncoder(image_encoder, text_encoder, tokenizer, logit_scale, patch_encoder)
    net = nets_clip.ZeroShotCLIP(encoder, clip_names(names, None, None), nets_clip.resolve_templates(templates))
    return ClassifierModel(net, nets_clip.CLIP_MEAN if mean is None else mean,
                           nets_clip.CLIP_STD if std is None else std, size, resize, 3, net.head, name=name)


def clip_names(names, in_dataset: Optional[str], data_root=None) -> list:
    """The class names of a zero-shot head: a list, a file (checked against `in_dataset`'s class count when its
    names are known), or those of `in_dataset`."""
    from oodbench.data import classnames

    if isinstance(names, (list, tuple)):
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise OODBenchError(f"clip.names: a list of non-empty class names, got {names!r}")
        return [n.strip() for n in names]
    if names is not None:
        count = None
        if in_dataset:
            try:
                count = len(classnames.class_names(in_dataset, data_root))
            except OODBenchError:   # no names known for the set: count its labels
                from oodbench import data

                count = data.load(in_dataset, split="train", root=data_root).num_classes
        return classnames.read_names(names, count)
    if not in_dataset:
        raise OODBenchError("a zero-shot CLIP model needs class names: give the in-distribution set (--in) or "
                            "clip.names=FILE (one name per line)")
    return classnames.class_names(in_dataset, data_root)


CLASSIFIER_STATE = ("shape", "num_classes", "mean", "std", "net")   # ClassifierTrainer.state_dict's keys


def _from_run(rest: str, spec: str, seed: int):
    """The classifier a run trained, read from the run folder's own files (config.yaml, meta.json, detector.pt),
    built as ClassifierTrainer.load_state_dict builds it: the model layer does not import the workflow or the
    detectors."""
    path = Path(rest)
    if not (path / "config.yaml").is_file():
        raise OODBenchError(f"{spec}: {path} is not a trained run folder (no config.yaml); train one with "
                            f"`oodbench train --method msp --in DATASET`")
    try:
        cfg, meta = read_yaml(path / "config.yaml"), read_meta(path / "meta.json")
    except OODBenchError as e:
        raise OODBenchError(f"{spec}: {e}") from e
    kind = meta.get("kind") or path.name.split("-")[0]
    if kind != "classifier":
        raise OODBenchError(f"{spec}: {path} is a {kind!r} run; a model comes from a 'classifier' run (train one "
                            f"with `oodbench train --method msp --in DATASET`)")
    if not (path / "detector.pt").is_file():
        raise OODBenchError(f"{spec}: {path} has no trained classifier yet (training unfinished?); run "
                            f"`oodbench train ... --resume` to finish it")
    try:
        state = checkpoint.load(path / "detector.pt", "cpu")
    except OODBenchError as e:
        raise OODBenchError(f"{spec}: {path / 'detector.pt'} is corrupt or truncated (it does not verify); the "
                            f"`oodbench train` command that made this run refits it from its checkpoints") from e
    if not isinstance(state, dict) or not all(k in state for k in CLASSIFIER_STATE):
        raise OODBenchError(f"{spec}: {path / 'detector.pt'} does not hold a classifier's state (keys "
                            f"{', '.join(CLASSIFIER_STATE)}); is {path} a classifier run?")
    model_cfg = dict(read_yaml(config_path("classifier")).get("model") or {})   # options added since keep defaults
    model_cfg.update(cfg.get("model") or {})
    shape, num_classes = list(state["shape"]), int(state["num_classes"])
    try:
        net = build_classifier(model_cfg["arch"], int(shape[0]), num_classes, dropout=model_cfg["dropout"],
                               width=model_cfg["width"])
    except OODBenchError as e:
        raise OODBenchError(f"{spec}: {path / 'config.yaml'} model section: {e}") from e
    load_state(net, state["net"], spec)
    return net, {"mean": list(state["mean"]), "std": list(state["std"]), "channels": int(shape[0]), "head": "head"}


def _from_torchvision(rest: str, spec: str, seed: int):
    import torchvision

    name, _, weights_name = rest.partition(":")
    if name not in torchvision.models.list_models():
        raise OODBenchError(f"{spec}: torchvision has no model {name!r}; see torchvision.models.list_models()")
    if weights_name.lower() in ("", "none"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = torchvision.models.get_model(name, weights=None)
        prep = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "channels": 3}
        fixed = getattr(net, "image_size", None)          # e.g. ViTs: only this input size is accepted
        if isinstance(fixed, int):
            default = torchvision.models.get_model_weights(name).DEFAULT.transforms()   # metadata, no download
            prep.update(size=[fixed, fixed], resize=max(fixed, int(default.resize_size[0] * fixed /
                                                                   default.crop_size[0])))
        return net, prep
    try:
        weights = torchvision.models.get_model_weights(name)[weights_name]
    except (KeyError, ValueError):
        names = ", ".join(w.name for w in torchvision.models.get_model_weights(name))
        raise OODBenchError(f"{spec}: {name} has no weights {weights_name!r}; choose one of {names}, or none")
    try:
        net = torchvision.models.get_model(name, weights=weights)
    except Exception as e:  # noqa: BLE001 - offline downloads fail with URLError, RuntimeError, ...
        where = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise OODBenchError(f"{spec}: could not download {weights.url} ({type(e).__name__}); put that file at "
                            f"{where}") from e
    t = weights.transforms()
    return net, {"mean": t.mean, "std": t.std, "size": list(t.crop_size), "resize": t.resize_size[0],
                 "channels": 3}


def _from_timm(rest: str, spec: str, seed: int):
    try:
        import timm
    except ImportError:
        raise OODBenchError(f"{spec}: timm is not installed; install the extra: pip install 'oodbench[timm]'")
    name, _, flag = rest.partition(":")
    if flag not in ("", "pretrained", "none"):
        raise OODBenchError(f"{spec}: write timm:NAME or timm:NAME:pretrained")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = timm.create_model(name, pretrained=flag == "pretrained")
    except RuntimeError as e:
        raise OODBenchError(f"{spec}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # noqa: BLE001 - hub downloads fail offline in many ways
        raise OODBenchError(f"{spec}: could not get the pretrained weights ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); put them in the Hugging Face cache "
                            f"(~/.cache/huggingface) or set HF_HUB_OFFLINE=1 with the files cached") from e
    cfg = net.pretrained_cfg
    _, h, w = cfg.get("input_size", (3, 224, 224))
    crop = float(cfg.get("crop_pct", 0.875) or 1.0)
    return net, {"mean": cfg.get("mean", IMAGENET_MEAN), "std": cfg.get("std", IMAGENET_STD), "size": [h, w],
                 "resize": int(h / crop) if flag == "pretrained" else None, "channels": 3}


def _from_openood(rest: str, spec: str, seed: int):
    from oodbench import model_registry

    if ":" not in rest:   # a published checkpoint by name (`oodbench models list`), its digest checked first
        arch, path = model_registry.resolve(model_registry.seeded(rest, seed))
        rest = f"{arch}:{path}"
    arch, _, path = rest.partition(":")
    if arch not in ("resnet18_32x32", "resnet18_224x224"):
        raise OODBenchError(f"{spec}: OpenOOD's resnet18_32x32 (CIFAR) and resnet18_224x224 (ImageNet-200) are "
                            f"supported, e.g. {EXAMPLES['openood']}")
    state = _read_state(path, spec)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k.replace(".shortcut.", ".downsample."): v for k, v in state.items()}
    if "fc.weight" not in state:
        raise OODBenchError(f"{spec}: not an OpenOOD ResNet-18 state dict (no fc.weight); first keys: "
                            f"{', '.join(list(state)[:4])}")
    num_classes = int(state["fc.weight"].shape[0])
    if arch == "resnet18_224x224":   # torchvision's ResNet-18 layout; OpenOOD's test transform: 256, crop 224
        import torchvision

        net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        load_state(net, state, spec)
        return net, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "channels": 3, "head": "fc", "size": 224,
                     "resize": 256}
    net = openood_resnet18_32x32(num_classes)
    load_state(net, state, spec)
    mean, std = OPENOOD_STATS.get(num_classes, OPENOOD_STATS[10])
    return net, {"mean": mean, "std": std, "channels": 3, "head": "fc"}


def openood_resnet18_32x32(num_classes: int) -> nn.Module:
    """OpenOOD's ResNet18_32x32 as torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool."""
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


def _from_python(rest: str, spec: str, seed: int):
    module_name, _, tail = rest.partition(":")
    factory_name, _, weights = tail.partition(":")
    if not module_name or not factory_name:
        raise OODBenchError(f"{spec}: write python:MODULE:CALLABLE[:STATE_DICT], e.g. {EXAMPLES['python']}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise OODBenchError(f"{spec}: cannot import {module_name!r} ({e}); is it on PYTHONPATH?") from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise OODBenchError(f"{spec}: {module_name} has no callable {factory_name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = call_user(factory, f"{spec}: {factory_name}()")
    if not isinstance(net, nn.Module):
        raise OODBenchError(f"{spec}: {factory_name}() returned a {type(net).__name__}, not an nn.Module")
    if weights:
        load_state(net, _read_state(weights, spec), spec)
    return net, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def call_user(fn, what: str, *args, **kwargs):
    """Call user code (a model factory): whatever it raises, `SystemExit` and `KeyboardInterrupt` included, becomes
    one OODBenchError naming it, so user code can neither end oodbench silently nor print a traceback."""
    try:
        return fn(*args, **kwargs)
    except OODBenchError:
        raise
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # noqa: BLE001 - user code may raise anything
        if isinstance(e, SystemExit):
            reason = f"called sys.exit({e.code!r})"
        elif isinstance(e, KeyboardInterrupt):
            reason = "raised KeyboardInterrupt"
        else:
            text = (str(e).strip().splitlines() or [""])[0][:200]
            reason = f"raised {type(e).__name__}" + (f": {text}" if text else "")
        raise OODBenchError(f"{what} {reason}; a model factory is called with no arguments and must return an "
                            f"nn.Module") from None


def _from_torchscript(rest: str, spec: str, seed: int):
    if not Path(rest).is_file():
        raise OODBenchError(f"{spec}: no file {rest}")
    try:
        with warnings.catch_warnings():   # torch's deprecation notice is not the user's to act on
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(rest, map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise OODBenchError(f"{spec}: {rest} is not a TorchScript file ({str(e).splitlines()[0]})") from e
    return net, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def _read_state(path: str, spec: str) -> dict:
    if not path or not Path(path).is_file():
        raise OODBenchError(f"{spec}: no weights file {path or '(none given)'}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated files, pickles with code, ...
        raise OODBenchError(f"{spec}: cannot read {path} as a state dict of tensors ({checkpoint.load_failure(e)}); save "
                            f"the weights with torch.save(net.state_dict(), path)") from None
    for key in ("state_dict", "model", "net"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OODBenchError(f"{spec}: {path} does not hold a state dict (a mapping of names to tensors)")
    return state


def load_state(net: nn.Module, state: dict, spec: str) -> None:
    """Strict load; a wrong key layout is one line naming the first mismatching keys."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"missing {', '.join(missing[:3])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                 f"shape mismatch {', '.join(shapes[:2])}" if shapes else ""]
        raise OODBenchError(f"{spec}: the weights do not fit the network: " + "; ".join(p for p in parts if p))
    net.load_state_dict(state)


LOADERS = {"run": _from_run, "torchvision": _from_torchvision, "timm": _from_timm, "openood": _from_openood,
           "python": _from_python, "torchscript": _from_torchscript}
