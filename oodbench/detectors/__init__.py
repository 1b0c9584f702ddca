"""Detector registry: importing a module here registers its methods (one line per detector module)."""
import difflib

from oodbench.detectors.base import REGISTRY, TRAINERS, Detector, register, trainer_for  # noqa: F401
from oodbench.errors import OODBenchError
from oodbench.detectors import classifier  # noqa: F401,E402  msp, maxlogit, energy, odin
from oodbench.detectors import features  # noqa: F401,E402  mahalanobis, rmds, knn
from oodbench.detectors import logit_scores  # noqa: F401,E402  entropy, gen, tempscale, klm
from oodbench.detectors import feature_space  # noqa: F401,E402  vim, residual, she, nnguide, fdbd, nci
from oodbench.detectors import shaping  # noqa: F401,E402  react, ash_p, ash_b, ash_s, scale, dice
from oodbench.detectors import multilayer  # noqa: F401,E402  gram, mds_ensemble, rankfeat
from oodbench.detectors import openmax  # noqa: F401,E402  openmax
from oodbench.detectors import gradients  # noqa: F401,E402  gradnorm, gradlayer
from oodbench.detectors import msma  # noqa: F401,E402  msma (gmm, knn, flow rows)
from oodbench.detectors import llr  # noqa: F401,E402  llr, likelihood
from oodbench.detectors import amp  # noqa: F401,E402  amp (xent, energy, entropy, msp rows)
from oodbench.detectors import ddpm  # noqa: F401,E402  ddpm (mse, mse+lpips/ssim rows)


def get(name: str) -> type:
    """The detector class registered as `name`, or an error naming the nearest known method."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OODBenchError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(REGISTRY))} "
                            f"(see `oodbench methods`)")
    return REGISTRY[name]
