"""Detector registry: importing a module here registers its methods (one line per detector module)."""
import difflib

from oodbench.config import dataset_options, is_training_option
from oodbench.detectors.base import REGISTRY, TRAINERS, Detector, Option, register, trainer_for  # noqa: F401
from oodbench.detectors.posthoc import PostHoc
from oodbench.errors import OODBenchError
from oodbench.detectors import classifier  # noqa: F401,E402  msp, maxlogit, energy, odin
from oodbench.detectors import features  # noqa: F401,E402  mahalanobis, rmds, mahalanobis_pp, rmds_pp, knn
from oodbench.detectors import gmm  # noqa: F401,E402  gmm, gmm_class
from oodbench.detectors import logit_scores  # noqa: F401,E402  entropy, gen, tempscale, klm
from oodbench.detectors import feature_space  # noqa: F401,E402  vim, residual, she, nnguide, fdbd, nci
from oodbench.detectors import shaping  # noqa: F401,E402  react, ash_p, ash_b, ash_s, scale, dice
from oodbench.detectors import adascale  # noqa: F401,E402  adascale_a, adascale_l
from oodbench.detectors import nac  # noqa: F401,E402  nac
from oodbench.detectors import vra  # noqa: F401,E402  vra
from oodbench.detectors import relation  # noqa: F401,E402  relation
from oodbench.detectors import iodin  # noqa: F401,E402  iodin
from oodbench.detectors import multilayer  # noqa: F401,E402  gram, mds_ensemble, rankfeat
from oodbench.detectors import openmax  # noqa: F401,E402  openmax
from oodbench.detectors import gradients  # noqa: F401,E402  gradnorm, gradlayer
from oodbench.detectors import logit_scaling  # noqa: F401,E402  lts
from oodbench.detectors import pnml  # noqa: F401,E402  pnml
from oodbench.detectors import uncertainty  # noqa: F401,E402  mcdropout, graduncertainty
from oodbench.detectors import rotation  # noqa: F401,E402  rotpred_score (runs of the rotpred recipe)
from oodbench.detectors import msma  # noqa: F401,E402  msma (gmm, knn, flow rows)
from oodbench.detectors import llr  # noqa: F401,E402  llr, likelihood
from oodbench.detectors import amp  # noqa: F401,E402  amp (xent, energy, entropy, msp rows)
from oodbench.detectors import ddpm  # noqa: F401,E402  ddpm (mse, mse+lpips/ssim rows)
from oodbench.detectors import zeroshot  # noqa: F401,E402  mcm, glmcm, neglabel (zero-shot CLIP)
from oodbench.detectors import combo  # noqa: F401,E402  combo:A+B+C (score ensembles across methods)


def get(name: str) -> type:
    """The detector class registered as `name`, or an error naming the nearest known method."""
    if isinstance(name, str) and name.startswith(combo.PREFIX):
        combo_members(name)
        return REGISTRY["combo"]
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OODBenchError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(REGISTRY))} "
                            f"(see `oodbench methods`)")
    return REGISTRY[name]


def combo_members(name: str) -> list:
    """The member names of `combo:A+B+C`, each a known post-hoc method named once (one-line errors otherwise)."""
    names = name[len(combo.PREFIX):].split("+")
    if not all(n.strip() for n in names):
        raise OODBenchError(f"{name}: write combo:METHOD+METHOD+..., e.g. combo:knn+energy+vim")
    for n in names:
        if n.startswith(combo.PREFIX) or n == "combo":
            raise OODBenchError(f"{name}: a combo's members are single methods, not combos")
        try:
            cls = get(n)
        except OODBenchError as e:
            raise OODBenchError(f"{name}: {e}") from None
        if not issubclass(cls, PostHoc):
            raise OODBenchError(f"{name}: {n} trains its own {cls.kind!r} networks; a combo combines post-hoc "
                                f"classifier methods (msp, energy, knn, vim, ...)")
    if len(set(names)) < len(names):
        raise OODBenchError(f"{name} names a method twice")
    return names


def build(name: str, cfg: dict) -> PostHoc:
    """The post-hoc method `name` with its options from the scoring config `cfg` (its section; a combo's members
    each from their own section, the combo's from `combo`)."""
    if name.startswith(combo.PREFIX):
        members = [get(n)(**(cfg.get(n) or {})) for n in combo_members(name)]
        return combo.Combo(members=members, **(cfg.get("combo") or {}))
    return get(name)(**(cfg.get(name) or {}))


def method(name: str, **options) -> PostHoc:
    """A post-hoc method as a plain object, e.g. `method("knn", k=50)`; options are checked (unknown names get the
    nearest valid one)."""
    if name.startswith(combo.PREFIX):
        return combo.Combo(members=[method(n) for n in combo_members(name)], **options)
    cls = get(name)
    if not issubclass(cls, PostHoc):
        raise OODBenchError(f"{name} trains its own {cls.kind!r} networks: train it with `oodbench train --method "
                            f"{name}`; oodbench.method takes post-hoc methods (msp, energy, knn, ...)")
    return cls(**options)


def kind_classes(kind: str) -> list:
    """Every registered class of `kind`: its methods and its trainer."""
    return [c for c in REGISTRY.values() if c.kind == kind] + [c for k, c in TRAINERS.items() if k == kind]


def option_sections(kind: str) -> dict:
    """{method: {option: default}} of the post-hoc methods of `kind` (their config sections), and the sections its
    trainers declare in code (`config_sections`: the classifier's training recipes)."""
    sections = {c.name: c.defaults() for c in kind_classes(kind) if issubclass(c, PostHoc)}
    for c in kind_classes(kind):
        for name, options in getattr(c, "config_sections", dict)().items():
            if name in sections:
                raise OODBenchError(f"config section {name!r} of {kind} is declared twice (a method and a "
                                    f"recipe of one name); rename one")
            sections[name] = options
    return sections


def training_keys(kind: str) -> tuple:
    """The training options of `kind` beyond config.TRAINING_SECTIONS, as its trainers declare them."""
    return tuple(dict.fromkeys(k for c in kind_classes(kind) for k in getattr(c, "training_keys", ())))


def dataset_keys(kind: str) -> tuple:
    """The dotted keys of `kind` whose values are dataset specs (trainers' `dataset_keys`, post-hoc options declared
    with dataset=True)."""
    keys = [k for c in kind_classes(kind) for k in getattr(c, "dataset_keys", ())]
    keys += [f"{c.name}.{k}" for c in kind_classes(kind) if issubclass(c, PostHoc)
             for k, o in c.OPTIONS.items() if o.dataset]
    return tuple(dict.fromkeys(keys))


def is_training(kind: str, key: str) -> bool:
    """Whether the dotted key is a training option of `kind` (config.is_training_option with its trainers' keys)."""
    return is_training_option(key, training_keys(kind))


def datasets_named(kind: str, cfg: dict) -> dict:
    """{dotted key: dataset spec} of the dataset options `cfg` sets."""
    return dataset_options(cfg, dataset_keys(kind))
