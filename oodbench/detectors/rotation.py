"""`rotpred_score`: the rotation-prediction score (Hendrycks et al., NeurIPS 2019) of a classifier trained with the
`rotpred` recipe, as OpenOOD v1.5's `RotPredPostprocessor` (`rotpred`) computes it. Its name differs from
OpenOOD's because `rotpred` is the recipe's (`oodbench train --method rotpred`, options `rotpred.*`).

Each image and its 90°, 180° and 270° rotations go through the network in one pass. With p the class softmax of
the unrotated image (C classes) and q_r the rotation head's softmax of the image rotated r quarter turns,

    score = -( KL(uniform || p) - 1/4 Σ_r -log2 q_r[r] )        (logs base 2, higher = more OOD)

OpenOOD's score is the bracket (higher = ID). We compute it from log-softmax, so a probability that underflows to 0
gives a large finite term where OpenOOD's softmax-then-log gives inf. It needs the rotation head the recipe keeps in
the classifier (`net.rot_head`); any other model is a one-line error naming the fix.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oodbench.detectors.base import register
from oodbench.detectors.posthoc import PostHoc
from oodbench.errors import OODBenchError


def rotpred_score(logits: torch.Tensor, rot_logits: torch.Tensor) -> torch.Tensor:
    """OOD score (B,) from the unrotated images' class logits (B, C) and rotation logits (B, 4, 4): image, its
    rotation by r quarter turns, the head's 4 logits."""
    log2_p = F.log_softmax(logits.float(), dim=1) / math.log(2)
    cls_kl = -math.log2(logits.shape[1]) - log2_p.mean(1)                  # KL(uniform || p), base 2
    log2_q = F.log_softmax(rot_logits.float(), dim=2) / math.log(2)
    rot_loss = -torch.diagonal(log2_q, dim1=1, dim2=2).mean(1)            # mean_r of -log2 q_r[r]
    return -(cls_kl - rot_loss)


@register("rotpred_score")
class RotPredScore(PostHoc):
    summary = "rotation prediction: KL of the class softmax to uniform minus the rotation head's loss over four " \
              "rotations, negated (Hendrycks et al. 2019; a run of the rotpred recipe)"
    fit_on = None
    array_level = False   # one pass over the image and its three rotations (4x the images of one forward)

    def fit(self, model, data=None, val=None, labels=None, **kwargs) -> "RotPredScore":
        """Check that the model has the rotpred recipe's rotation head; nothing is fitted."""
        self.use_model(model)
        self.rotation_head()
        self.fitted_ = True
        return self

    def rotation_head(self) -> torch.nn.Module:
        head = getattr(self.net, "rot_head", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != 4:
            raise OODBenchError(f"rotpred_score needs the 4-way rotation head of a classifier trained by the rotpred "
                                f"recipe; model {self.require_model().name} has none: train one (oodbench train "
                                f"--method rotpred --in SET ...) and score its run (eval --method rotpred_score "
                                f"--run-name rotpred)")
        return head

    @torch.no_grad()
    def outputs(self, x):
        head = self.rotation_head()
        if x.shape[2] != x.shape[3]:
            raise OODBenchError(f"rotpred_score rotates images by 90 degrees; they must be square, not "
                                f"{x.shape[2]}x{x.shape[3]}")
        n = len(x)
        features, logits = self.require_model().features_and_logits(
            torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)]))
        rot_logits = head(features.to(head.weight.dtype)).float()
        return {"logits": logits[:n], "rot_logits": rot_logits.view(4, n, 4).transpose(0, 1)}

    def outputs_key(self):
        return ("rotpred",)

    def score_outputs(self, out):
        return rotpred_score(out["logits"], out["rot_logits"])
