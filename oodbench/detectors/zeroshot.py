"""Zero-shot OOD scores of vision-language models (docs/clip.md): MCM, GL-MCM, NegLabel.

They score a zero-shot CLIP `ClassifierModel` (`open_clip:` / `hf-clip:` specs, `oodbench.load_clip`,
`oodbench.wrap_clip`): its features are the normalised image embeddings and its head rows the class text embeddings
times the logit scale, so the cosine similarity to class k is `features @ normalize(W_k)`.

    mcm       -max_k softmax_k(cos(x, t_k) / tau)                                  (Ming et al. 2022), tau = 1
    glmcm     mcm(global) + lambda * -max_{p,k} softmax_k(cos(x_p, t_k) / tau)     (Miyai et al.), patch tokens
    neglabel  -mean_g [sum_k e^{cos(x,t_k)/tau} / (sum_k e^{cos(x,t_k)/tau} + sum_{j in group g} e^{cos(x,n_j)/tau})]
              negative labels n_j mined from a word list (Jiang et al. 2024), tau = 0.01, 100 groups
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import PostHoc
from oodbench.errors import OODBenchError


def cosines(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, K) cosine similarities of features to the head's rows."""
    return F.normalize(features.float(), dim=-1) @ F.normalize(weight.float(), dim=-1).T


def zero_shot_net(method: PostHoc):
    """The model's ZeroShotCLIP network, or a one-line error naming how to get one."""
    from oodbench.nets.clip import ZeroShotCLIP

    net = method.require_model().net
    if not isinstance(net, ZeroShotCLIP):
        raise OODBenchError(f"{method.name} scores a zero-shot CLIP model (--model open_clip:ARCH:WEIGHTS or "
                            f"hf-clip:DIR, oodbench.load_clip / wrap_clip), not a {type(net).__name__}")
    return net


class _CosineScore(PostHoc):
    fit_on = None

    def score_outputs(self, out):
        weight, _ = self.head_weights()
        return self.score_cosines(cosines(out["features"], weight))


@register("mcm")
class MCM(_CosineScore):
    summary = "maximum concept matching: max softmax of image-text cosines / tau, zero-shot CLIP (Ming et al. 2022)"
    OPTIONS = {"temperature": Option(1.0, "tau of softmax(cos / tau) (MCM's code: 1)",
                                     grid=(0.01, 0.05, 0.1, 0.5, 1.0))}

    def score_cosines(self, cos):
        return -(cos / float(self.options["temperature"])).softmax(1).amax(1)


@register("glmcm")
class GLMCM(PostHoc):
    summary = "global + local MCM: MCM plus lambda * the max over patch tokens of their MCM (Miyai et al.), ViT CLIP"
    fit_on = None
    array_level = False
    OPTIONS = {"temperature": Option(1.0, "tau of both softmaxes (GL-MCM's code: 1)", grid=(0.1, 0.5, 1.0)),
               "lambda_local": Option(1.0, "weight of the local term (GL-MCM's code: 1)", grid=(0.5, 1.0, 2.0))}

    def use_model(self, model):
        super().use_model(model)
        net = zero_shot_net(self)
        if not net.has_patch_tokens:
            raise OODBenchError(f"glmcm needs patch tokens: {type(net.encoder).__name__} of {self.model.name} gives "
                                f"none (a ViT CLIP does, e.g. open_clip:ViT-B-16:WEIGHTS; wrap_clip takes "
                                f"patch_encoder=)")
        return self

    @torch.no_grad()
    def outputs(self, x):
        glob, local = zero_shot_net(self).global_and_local(self.prepare(x))
        return {"global": glob, "local": local}

    def outputs_key(self):
        return ("clip-global+local",)

    def score_outputs(self, out):
        text = zero_shot_net(self).text_embeddings.float().to(self.device)
        return glmcm_score(out["global"], out["local"], text, float(self.options["temperature"]),
                           float(self.options["lambda_local"]))


def glmcm_score(glob, local, text, tau: float, lam: float) -> torch.Tensor:
    """-(max_k softmax(g·t/tau)) - lam * max_{p,k} softmax_k(l_p·t/tau) on normalised embeddings."""
    text = F.normalize(text, dim=-1)
    g = (F.normalize(glob.float(), dim=-1) @ text.T / tau).softmax(-1).amax(-1)
    loc = (F.normalize(local.float(), dim=-1) @ text.T / tau).softmax(-1).amax(-1).amax(-1)
    return -(g + lam * loc)


@register("neglabel")
class NegLabel(PostHoc):
    summary = "NegLabel: ID-label share of softmax over ID and mined negative labels, grouped (Jiang et al. 2024)"
    fit_on = None
    array_level = False   # mining the negative labels needs the model's text encoder
    OPTIONS = {"words": Option("", "word list file (one word a line) the negative labels are mined from; required "
                                   "(the paper's WordNet nouns do not ship offline)"),
               "count": Option(10000, "negative labels kept (the paper's M; its config keeps 15% of the corpus)"),
               "percentile": Option(0.95, "eta: a word's similarity to the ID labels is this quantile of its "
                                          "cosines to them; the least similar words are kept (the code's 0.95)"),
               "temperature": Option(0.01, "tau of the softmax over ID and negative cosines (the code: 100 x cos)"),
               "groups": Option(100, "negative labels split into this many groups, scores averaged (the code's "
                                     "ngroup; 1: no grouping)"),
               "template": Option("", "prompt of the negative labels (default: the model's class templates)"),
               "seed": Option(0, "seed of the grouping's permutation (the authors' code: randperm seeded 0)")}

    def fit(self, model, data=None, val=None, labels=None, **_ignored):
        """Mine the negative labels with the model's text encoder (no images are read)."""
        self.use_model(model)
        net = zero_shot_net(self)
        words = read_words(self.options["words"], net.names)
        template = self.options["template"]
        templates = [template] if template else net.templates
        from oodbench.nets.clip import class_embeddings

        candidates = class_embeddings(net.encoder, words, templates).to(self.device)
        chosen = mine_negatives(net.text_embeddings.float().to(self.device), candidates,
                                int(self.options["count"]), float(self.options["percentile"]))
        self.stats_ = candidates[chosen]
        self.fitted_ = True
        return self

    def score_outputs(self, out):
        if self.stats_ is None:
            raise OODBenchError("neglabel has no negative labels: call .fit(model) (it mines them from "
                                "neglabel.words), or load a fitted state")
        weight, _ = self.head_weights()
        return -neglabel_score(F.normalize(out["features"].float(), dim=-1), F.normalize(weight.float(), dim=-1),
                               self.stats_, float(self.options["temperature"]), int(self.options["groups"]),
                               int(self.options["seed"]))


def read_words(path, exclude=()) -> list:
    if not path:
        raise OODBenchError("neglabel needs a word list to mine negative labels from: --set neglabel.words=FILE (one "
                            "word a line, e.g. WordNet's nouns; none ships offline)")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise OODBenchError(f"neglabel.words: no file {p}")
    skip = {n.lower() for n in exclude}
    words = list(dict.fromkeys(w.strip() for w in p.read_text(encoding="utf-8").splitlines() if w.strip()))
    words = [w for w in words if w.lower() not in skip]   # an ID class name is no negative label
    if not words:
        raise OODBenchError(f"neglabel.words: {p} holds no words other than the ID class names")
    return words


def mine_negatives(pos: torch.Tensor, candidates: torch.Tensor, count: int, percentile: float) -> torch.Tensor:
    """Indices of the `count` candidates least similar to the ID labels: sorted by the `percentile` quantile of
    their cosines to the ID text embeddings, lowest first."""
    if not 0 <= percentile <= 1:
        raise OODBenchError(f"neglabel.percentile must be in [0, 1], got {percentile}")
    if count < 1:
        raise OODBenchError(f"neglabel.count must be at least 1, got {count}")
    sims = torch.cat([torch.quantile(candidates[i:i + 1000] @ pos.T, percentile, dim=-1)
                      for i in range(0, len(candidates), 1000)])
    return torch.argsort(sims, stable=True)[:count]


def neglabel_score(feat, pos, neg, tau: float, groups: int, seed: int = 0) -> torch.Tensor:
    """The NegLabel score (higher = more ID) of normalised image embeddings against ID and negative text embeddings;
    `groups` > 1: the negatives (permuted with `seed`, the remainder dropped) in equal groups, scores averaged."""
    s_pos = feat @ pos.T / tau
    s_neg = feat @ neg.T / tau
    if groups <= 1:
        groups_neg = [s_neg]
    else:
        if len(neg) < groups:
            raise OODBenchError(f"neglabel.groups={groups} but only {len(neg)} negative labels were mined")
        keep = len(neg) - len(neg) % groups
        order = torch.randperm(keep, generator=torch.Generator().manual_seed(seed)).to(feat.device)
        groups_neg = s_neg[:, :keep][:, order].reshape(len(feat), groups, -1).unbind(1)
    scores = [torch.cat([s_pos, g], 1).softmax(1)[:, :s_pos.shape[1]].sum(1) for g in groups_neg]
    return torch.stack(scores, 1).mean(1)
