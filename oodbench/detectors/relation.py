"""Relation (Kim et al., NeurIPS 2023, "Neural Relation Graph"), as OpenOOD v1.5's `relation` postprocessor
(`openood/postprocessors/relation_postprocessor.py`, itself from the authors' snu-mllab/Neural-Relation-Graph;
`configs/postprocessors/relation.yml`).

Each image is a node joined to every ID training image j by the edge r_j = max(ĥ·ĥ_j, 0) · (p·p_j): ĥ the
penultimate features over √(‖h‖² + 1e-10), p the softmax of the logits. Edges of |r_j| ≤ `thres` are cut; the score
is −Σ_j r_j^pow (the negative total edge weight; OpenOOD's sign(r)·|r|^pow, r ≥ 0 here). Cost: the shared features-
and-logits pass; the fit keeps the training set's unit features (N × D) and probabilities (N × K) in float32, as
OpenOOD; scoring B images makes B × N edges, in blocks of at most `block` edges.
"""
from __future__ import annotations

import torch

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import PostHoc
from oodbench.errors import OODBenchError


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """Rows over √(‖row‖² + 1e-10) (the relation code's `normalize`)."""
    return features / torch.sqrt((features ** 2).sum(1, keepdim=True) + 1e-10)


@register("relation")
class Relation(PostHoc):
    summary = "negative total weight of the relation-graph edges to the ID training images (Kim et al. 2023)"
    OPTIONS = {
        "pow": Option(1, "power of each edge weight in the sum (relation.yml)", grid=(1, 2, 4, 6, 8)),
        "thres": Option(0.03, "edges of weight at most this are cut (get_relation's default)"),
        "block": Option(2 ** 24, "edges computed at once while scoring (memory, not the score)"),
    }

    def check(self) -> None:
        o = self.options
        if not float(o["pow"]) > 0:
            raise OODBenchError(f"relation.pow must be > 0, got {o['pow']}")
        if not float(o["thres"]) >= 0:
            raise OODBenchError(f"relation.thres must be >= 0, got {o['thres']}")
        if int(o["block"]) < 1:
            raise OODBenchError(f"relation.block must be >= 1, got {o['block']}")

    def reference_pass(self):
        self.check()   # bad options: a one-line error before the pass
        return super().reference_pass()

    def fit_outputs(self, ref):
        self.check()
        return {"features": unit_rows(ref["features"].float()), "probs": ref["logits"].float().softmax(1)}

    def score_outputs(self, out):
        self.check()
        power, thres = float(self.options["pow"]), float(self.options["thres"])
        feat_t, prob_t = self.stats_["features"], self.stats_["probs"]
        feat, prob = unit_rows(out["features"].float()), out["logits"].float().softmax(1)
        step = max(1, int(self.options["block"]) // max(1, len(feat_t)))
        scores = []
        for i in range(0, len(feat), step):
            rel = (feat[i:i + step] @ feat_t.T).clamp_min(0.0) * (prob[i:i + step] @ prob_t.T)
            scores.append(torch.where(rel > thres, rel ** power, torch.zeros_like(rel)).sum(1))
        return -torch.cat(scores) if scores else feat.new_zeros(0)

    def row_notes(self, id_scores: dict) -> dict:
        """Every ID edge cut (a near-uniform softmax over K classes makes p·p_j about 1/K) says so beside the row."""
        scores = id_scores.get(self.name)
        if scores is None or len(scores) == 0 or bool((torch.as_tensor(scores) != 0).any()):
            return {}
        return {self.name: [f"every edge of the ID test images was at most relation.thres = "
                            f"{float(self.options['thres']):g} (all scores 0): lower it, e.g. --set relation.thres=0"]}
