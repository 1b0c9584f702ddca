"""Zero-shot CLIP as a classifier network: image → L2-normalised embedding → linear head of scaled text embeddings.

`ZeroShotCLIP(encoder, names, templates, logit_scale)` is an `nn.Module` whose `head` is an `nn.Linear` (no bias)
with weight `logit_scale * T` (T: the normalised class text embeddings, one row per class), so its output is
`logit_scale * cos(image, class)` and the input of `head` — the normalised image embedding — is the feature every
classifier method reads. Encoders adapt a CLIP implementation to three calls:

    encode_image(x)        (B, 3, H, W) normalised float → (B, D) image embedding
    encode_text(prompts)   list of strings → (N, D) text embedding
    patch_tokens(x)        (B, P, D) projected local (patch) features as GL-MCM's code computes them, or None

`OpenCLIPEncoder` (open_clip), `HFCLIPEncoder` (transformers' CLIPModel) and `CallableEncoder` (your functions).
`build_open_clip` / `build_hf_clip` make the first two from a spec's parts (with CLIP's preprocessing), and
`resolve_templates` reads `clip.templates`. The ClassifierModel around them is `oodbench.models.load_clip`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.errors import OODBenchError

TEXT_BATCH = 500   # prompts per text-encoder forward


class ZeroShotCLIP(nn.Module):
    """`forward(x)` = `head(normalize(encoder.encode_image(x)))`: scaled cosine similarities to the class prompts."""

    def __init__(self, encoder: nn.Module, names: Sequence[str], templates: Sequence[str],
                 logit_scale: Optional[float] = None):
        super().__init__()
        self.encoder = encoder
        self.names, self.templates = list(names), list(templates)
        scale = encoder.logit_scale() if logit_scale is None else float(logit_scale)
        if not scale > 0:
            raise OODBenchError(f"clip.logit_scale must be positive, got {scale}")
        self.logit_scale = scale
        text = class_embeddings(encoder, self.names, self.templates)
        self.head = nn.Linear(text.shape[1], text.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(scale * text)
        self.head.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.encoder.encode_image(x).float(), dim=-1))

    @property
    def text_embeddings(self) -> torch.Tensor:
        """(K, D) normalised class text embeddings (the head's rows divided by the logit scale)."""
        return self.head.weight / self.logit_scale

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, D) normalised text embeddings of `prompts` (batched)."""
        return embed_prompts(self.encoder, list(prompts))

    @torch.no_grad()
    def global_and_local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised image embeddings (B, D), normalised patch features (B, P, D)) of a prepared input; an
        OODBenchError for an encoder without patch tokens."""
        local = self.encoder.patch_tokens(x)
        if local is None:
            raise OODBenchError(f"{type(self.encoder).__name__} gives no patch tokens (GL-MCM needs a ViT CLIP, e.g. "
                                f"open_clip:ViT-B-16:WEIGHTS)")
        pooled = self.encoder.last_pooled
        return F.normalize(pooled.float(), dim=-1), F.normalize(local.float(), dim=-1)

    @property
    def has_patch_tokens(self) -> bool:
        return bool(self.encoder.has_patch_tokens)


@torch.no_grad()
def embed_prompts(encoder, prompts: list) -> torch.Tensor:
    chunks = [F.normalize(encoder.encode_text(prompts[i:i + TEXT_BATCH]).float(), dim=-1)
              for i in range(0, len(prompts), TEXT_BATCH)]
    return torch.cat(chunks)


@torch.no_grad()
def class_embeddings(encoder, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(K, D): for each class, the mean of its normalised prompt embeddings over the templates, normalised again
    (CLIP's prompt ensembling)."""
    if not names:
        raise OODBenchError("a zero-shot CLIP head needs at least one class name")
    prompts = [t.format(n) for n in names for t in templates]
    emb = embed_prompts(encoder, prompts).view(len(names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


# ---------------------------------------------------------------------------------------------------- encoders
class OpenCLIPEncoder(nn.Module):
    """An open_clip CLIP model. Patch tokens (ViT towers) follow GL-MCM's `clip/model.py`: in the last residual
    block each token attends only to itself — x + out_proj(value(ln_1(x))), then the block's MLP — and the result
    goes through `ln_post` and the visual projection (the class token dropped)."""

    def __init__(self, model: nn.Module, tokenizer: Callable):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        visual = model.visual
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        self.has_patch_tokens = bool(blocks) and getattr(visual, "proj", None) is not None and \
            getattr(visual, "attn_pool", None) is None and isinstance(getattr(blocks[-1], "attn", None),
                                                                   nn.MultiheadAttention)
        self.last_pooled = None

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def encode_image(self, x):
        return self.model.encode_image(x)

    def encode_text(self, prompts):
        tokens = self.tokenizer(prompts).to(next(self.model.parameters()).device)
        return self.model.encode_text(tokens)

    def patch_tokens(self, x):
        if not self.has_patch_tokens:
            return None
        visual = self.model.visual
        block = visual.transformer.resblocks[-1]
        kept = []   # the last block's input, captured during this forward only
        handle = block.register_forward_pre_hook(lambda _module, args: kept.append(args[0]))
        try:
            self.last_pooled = self.model.encode_image(x)
        finally:
            handle.remove()
        h = kept[-1]
        if not getattr(visual.transformer, "batch_first", True):
            h = h.transpose(0, 1)
        attn, width = block.attn, h.shape[-1]
        value = F.linear(block.ln_1(h), attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:]
                         if attn.in_proj_bias is not None else None)
        v = h + block.ls_1(attn.out_proj(value))
        v = v + block.ls_2(block.mlp(block.ln_2(v)))
        prefix = 1 + int(getattr(visual, "num_reg_tokens", 0) or 0) if getattr(visual, "class_embedding", None) \
            is not None else 0
        return visual.ln_post(v)[:, prefix:] @ visual.proj


class HFCLIPEncoder(nn.Module):
    """A transformers `CLIPModel` and its tokenizer; patch tokens as `OpenCLIPEncoder` computes them, on the
    input of the last encoder layer (layer_norm1, v_proj, out_proj, layer_norm2, mlp, post_layernorm,
    visual_projection)."""

    has_patch_tokens = True

    def __init__(self, model: nn.Module, tokenizer: Callable, context_length: int = 77):
        super().__init__()
        self.model, self.tokenizer, self.context_length = model, tokenizer, context_length
        self.last_pooled = None

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def _vision(self, x, hidden=False):
        out = self.model.vision_model(pixel_values=x, output_hidden_states=hidden)
        return out, self.model.visual_projection(out.pooler_output)

    def encode_image(self, x):
        return self._vision(x)[1]

    def encode_text(self, prompts):
        t = self.tokenizer(list(prompts), padding="max_length", max_length=self.context_length, truncation=True,
                           return_tensors="pt")
        device = next(self.model.parameters()).device
        out = self.model.text_model(input_ids=t["input_ids"].to(device),
                                    attention_mask=t["attention_mask"].to(device))
        return self.model.text_projection(out.pooler_output)

    def patch_tokens(self, x):
        vm = self.model.vision_model
        out, self.last_pooled = self._vision(x, hidden=True)
        h = out.hidden_states[-2]                       # the input of the last encoder layer
        layer = vm.encoder.layers[-1]
        v = h + layer.self_attn.out_proj(layer.self_attn.v_proj(layer.layer_norm1(h)))
        v = v + layer.mlp(layer.layer_norm2(v))
        return self.model.visual_projection(vm.post_layernorm(v)[:, 1:])


class CallableEncoder(nn.Module):
    """Your own CLIP-like functions: `image_encoder(x) -> (B, D)`, `text_encoder(tokens) -> (N, D)`,
    `tokenizer(list of str) -> tokens`; `patch_encoder(x) -> (B, P, D)` optional (GL-MCM)."""

    def __init__(self, image_encoder: Callable, text_encoder: Callable, tokenizer: Callable,
                 logit_scale: float = 100.0, patch_encoder: Optional[Callable] = None):
        super().__init__()
        for what, fn in (("image_encoder", image_encoder), ("text_encoder", text_encoder), ("tokenizer", tokenizer)):
            if not callable(fn):
                raise OODBenchError(f"wrap_clip: {what} must be callable, got {type(fn).__name__}")
        self.image_encoder, self.text_encoder, self.tokenizer = image_encoder, text_encoder, tokenizer
        self.patch_encoder, self.scale = patch_encoder, float(logit_scale)
        self.has_patch_tokens = patch_encoder is not None
        self.last_pooled = None

    def logit_scale(self) -> float:
        return self.scale

    def encode_image(self, x):
        return _embedding(self.image_encoder(x), "image_encoder", len(x))

    def encode_text(self, prompts):
        tokens = self.tokenizer(list(prompts))
        device = next((p.device for p in self.parameters()), None)
        if isinstance(tokens, torch.Tensor) and device is not None:
            tokens = tokens.to(device)
        return _embedding(self.text_encoder(tokens), "text_encoder", len(prompts))

    def patch_tokens(self, x):
        if self.patch_encoder is None:
            return None
        self.last_pooled = self.encode_image(x)
        local = self.patch_encoder(x)
        if not isinstance(local, torch.Tensor) or local.dim() != 3 or len(local) != len(x):
            raise OODBenchError(f"wrap_clip: patch_encoder must return (B, P, D), got "
                                f"{getattr(local, 'shape', type(local).__name__)}")
        return local


def _embedding(out, what: str, n: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or len(out) != n:
        raise OODBenchError(f"wrap_clip: {what} must return a (N, D) tensor for N inputs, got "
                            f"{getattr(out, 'shape', type(out).__name__)} for N={n}")
    return out


# ---------------------------------------------------------------------------------------------------- building
# CLIP's preprocessing (open_clip.constants OPENAI_DATASET_MEAN / STD): shorter side to the input size, centre crop.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _open_clip(spec: str):
    try:
        import open_clip
    except ImportError:
        raise OODBenchError(f"{spec}: open_clip is not installed; install the extra: pip install 'oodbench[clip]'") \
            from None
    return open_clip


def build_open_clip(arch: str, weights: str, spec: str, seed: int = 0):
    """(OpenCLIPEncoder, preprocessing {mean, std, size, resize}) of `open_clip:ARCH:WEIGHTS`: WEIGHTS a state-dict
    file (.pt/.bin/.safetensors), an open_clip pretrained tag (downloaded, online only) or `none` (seeded random)."""
    open_clip = _open_clip(spec)
    if open_clip.get_model_config(arch) is None:
        raise OODBenchError(f"{spec}: open_clip has no model config {arch!r}; see open_clip.list_models() "
                            f"(e.g. ViT-B-16)")
    path = Path(weights).expanduser()
    tags = open_clip.list_pretrained_tags_by_model(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            if weights != "none" and not path.is_file() and weights in tags:
                model = open_clip.create_model(arch, pretrained=weights)
            else:   # random or a file loaded below: open_clip's "no pretrained weights" log line is not news
                logging.disable(logging.WARNING)
                try:
                    model = open_clip.create_model(arch, pretrained=None)
                finally:
                    logging.disable(logging.NOTSET)
        except OODBenchError:
            raise
        except Exception as e:   # a download that cannot happen offline, a hub tokenizer config, ...
            raise OODBenchError(f"{spec}: open_clip could not build it ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else 'no message'}); offline, give a local weights "
                                f"file: open_clip:{arch}:PATH") from None
    if weights != "none" and not (weights in tags and not path.is_file()):
        if not path.is_file():
            raise OODBenchError(f"{spec}: {weights!r} is neither a weights file nor an open_clip pretrained tag of "
                                f"{arch} ({', '.join(tags) or 'none'}); or write none for random weights")
        _load_weights(model, path, spec)
    try:
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as e:
        raise OODBenchError(f"{spec}: open_clip could not make {arch}'s tokenizer ({type(e).__name__}); it may need "
                            f"a download (a Hugging Face tokenizer)") from None
    size = getattr(model.visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    prep = {"mean": tuple(cfg.get("mean", CLIP_MEAN)), "std": tuple(cfg.get("std", CLIP_STD)), "size": size,
            "resize": min(size)}
    return OpenCLIPEncoder(model.eval(), tokenizer), prep


def _load_weights(model: nn.Module, path: Path, spec: str) -> None:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            state = load_file(str(path))
        except Exception as e:
            raise OODBenchError(f"{spec}: cannot read {path} as safetensors ({type(e).__name__})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise OODBenchError(f"{spec}: cannot read {path} as a state dict of tensors ({type(e).__name__}); "
                                f"OpenAI's TorchScript .pt archives are not read: use open_clip's own files") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OODBenchError(f"{spec}: {path} does not hold a state dict (a mapping of names to tensors)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} for "
                 f"{tuple(own[shapes[0]].shape)})" if shapes else ""]
        raise OODBenchError(f"{spec}: {path} is not a checkpoint of this architecture: "
                            + "; ".join(p for p in parts if p))
    model.load_state_dict(state)


def build_hf_clip(folder: str, spec: str):
    """(HFCLIPEncoder, preprocessing) of `hf-clip:DIR`: a transformers CLIPModel and its tokenizer saved in DIR
    (`save_pretrained`), read with local_files_only; the preprocessing from DIR's preprocessor_config.json."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise OODBenchError(f"{spec}: {path} is not a saved transformers model (no config.json); save one with "
                            f"CLIPModel.save_pretrained(DIR) and its tokenizer's save_pretrained(DIR)")
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError:
        raise OODBenchError(f"{spec}: transformers is not installed; install the extra: pip install "
                            f"'oodbench[clip]'") from None
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # oodbench shows its own progress
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise OODBenchError(f"{spec}: {path} does not load as a CLIPModel ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise OODBenchError(f"{spec}: {path} has no tokenizer files ({type(e).__name__}); save the CLIP tokenizer "
                            f"there too (tokenizer.save_pretrained(DIR))") from None
    prep_file = path / "preprocessor_config.json"
    cfg = json.loads(prep_file.read_text()) if prep_file.is_file() else {}
    size = int(model.config.vision_config.image_size)
    crop = cfg.get("crop_size", size)
    crop = int(crop.get("height", size)) if isinstance(crop, dict) else int(crop)
    short = cfg.get("size", crop)
    short = int(short.get("shortest_edge", crop)) if isinstance(short, dict) else int(short)
    prep = {"mean": tuple(cfg.get("image_mean", CLIP_MEAN)), "std": tuple(cfg.get("image_std", CLIP_STD)),
            "size": (crop, crop), "resize": short}
    context = int(model.config.text_config.max_position_embeddings)
    return HFCLIPEncoder(model.eval(), tokenizer, context), prep


# ---------------------------------------------------------------------------------------------------- prompts
SIMPLE_TEMPLATES = ("a photo of a {}.",)   # MCM's and GL-MCM's prompt


def resolve_templates(value) -> list:
    """Prompt templates ("{}" where the class name goes): `simple` (MCM's "a photo of a {}."), `imagenet` (CLIP's
    80 published ImageNet templates, as open_clip ships them), a file (one template a line), one template string,
    or a list of them."""
    if value is None or value == "simple":
        return list(SIMPLE_TEMPLATES)
    if value == "imagenet":
        _open_clip("clip.templates=imagenet")   # a clear error when open_clip is missing
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [t("{}") if callable(t) else str(t) for t in OPENAI_IMAGENET_TEMPLATES]
    if isinstance(value, str):
        path = Path(value).expanduser()
        if "{}" not in value and path.is_file():
            value = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(t, str) for t in value):
        raise OODBenchError(f"clip.templates: simple, imagenet, a file of templates or a list of strings with {{}}, "
                            f"got {value!r}")
    bad = [t for t in value if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}")]
    if bad:
        raise OODBenchError(f"clip.templates: each template needs exactly one {{}} (where the class name goes) and "
                            f"no other braces, e.g. 'a photo of a {{}}.'; got {bad[0]!r}")
    return list(value)
