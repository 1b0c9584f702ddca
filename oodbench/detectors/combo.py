"""Score ensembles across methods: `combo:A+B+C` turns each member's OOD score into a p-value against the member's
scores on the ID validation split and combines the p-values into one detector (Dadalto et al., "Combine and
conquer", 2023; the rules and the p-value of the `detectors` package, edadaltocg/detectors `src/detectors/ensemble.py`).

The p-value is that package's `p_value_fn`, in the ID-score convention it uses (u = −OOD score): the ECDF of the
validation scores u_1..u_N, padded below by min(u)·N (min(u)/N when min(u) > 0) and above by max(u)·N (max(u)/N when
max(u) ≤ 0), linearly interpolated (np.interp: the last of tied values) at (1..N+2)/(N+2), at least 1e-8. Small p =
unlike the ID validation images. The combinations, each signed so that higher = more OOD:

    fisher          −2 Σ log p                      stouffer        −Σ Φ⁻¹(p) / √M
    tippett         −min p                          wilkinson       −max p
    edgington       −Σ p                            pearson         2 Σ log(1 − p + 1e-6)
    simes           −min_k p_(k) · M / k            geometric_mean  −(Π p)^(1/M)

Stouffer: the package replaces an infinite z by the largest finite one of the scored set (which makes a score
depend on the other images); here p is kept at most 1 − 1e-8, as it is kept at least 1e-8, so each image's score is
its own. The members fit as they do alone (their own split) and share their network passes with every other method
scoring the same outputs.
"""
from __future__ import annotations

import math

import torch

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import PostHoc, _as_imageset, _move
from oodbench.errors import OODBenchError

PREFIX = "combo:"
P_FLOOR = 1e-8


def _fisher(p):
    return -2 * p.log().sum(1)


def _stouffer(p):
    return -torch.special.ndtri(p.clamp(max=1 - P_FLOOR)).sum(1) / math.sqrt(p.shape[1])


def _simes(p):
    m = p.shape[1]
    ranks = torch.arange(1, m + 1, dtype=p.dtype, device=p.device)
    return -(p.sort(1).values * m / ranks).amin(1)


COMBINATIONS = {
    "fisher": _fisher,
    "stouffer": _stouffer,
    "tippett": lambda p: -p.amin(1),
    "wilkinson": lambda p: -p.amax(1),
    "edgington": lambda p: -p.sum(1),
    "pearson": lambda p: 2 * (1 - p + 1e-6).log().sum(1),
    "simes": _simes,
    "geometric_mean": lambda p: -p.log().mean(1).exp(),
}


def padded_reference(val_scores: torch.Tensor) -> torch.Tensor:
    """The sorted, padded ID-convention validation scores (N + 2,) of one member (float64), as `p_value_fn` pads
    them."""
    x = (-val_scores.double()).sort().values
    n = len(x)
    lo = x[0] * (1 / n if x[0] > 0 else n)
    hi = x[-1] * (n if x[-1] > 0 else 1 / n)
    return torch.cat([lo.view(1), x, hi.view(1)]).sort().values


def p_values(reference: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """p (B,) of OOD `scores` against one member's `padded_reference`: np.interp of the padded ECDF, floor 1e-8."""
    u = -scores.double()
    n = len(reference)
    fp = torch.arange(1, n + 1, dtype=torch.float64, device=u.device) / n
    j = torch.searchsorted(reference, u.contiguous(), right=True) - 1
    jc = j.clamp(0, n - 2)
    x0, x1 = reference[jc], reference[jc + 1]
    inside = fp[jc] + (fp[jc + 1] - fp[jc]) * (u - x0) / (x1 - x0)
    p = torch.where(j < 0, fp[0], torch.where(j >= n - 1, fp[-1], inside))
    return p.clamp_min(P_FLOOR)


@register("combo")
class Combo(PostHoc):
    summary = ("several methods as one: each score's p-value against the ID validation split, combined (Fisher, "
               "Stouffer, ...; Dadalto et al. 2023): --method combo:knn+energy+vim")
    OPTIONS = {"combine": Option("fisher", "how the members' p-values combine: " + ", ".join(COMBINATIONS))}
    fit_on = "val"

    def __init__(self, members=(), **options):
        super().__init__(**options)
        if self.options["combine"] not in COMBINATIONS:
            raise OODBenchError(f"combo.combine is one of {', '.join(COMBINATIONS)}, got {self.options['combine']!r}")
        members = list(members)
        if not members or not all(isinstance(m, PostHoc) for m in members):
            raise OODBenchError("combo needs member methods: --method combo:knn+energy+vim, or "
                                "oodbench.method('combo:knn+energy+vim') / Combo(members=[method objects])")
        for m in members:
            if isinstance(m, Combo):
                raise OODBenchError(f"combo members are single methods; {m.name} is itself a combo")
        names = [m.name for m in members]
        if len(set(names)) < len(names):
            raise OODBenchError(f"combo:{'+'.join(names)} names a method twice")
        self.members = members
        self.name = PREFIX + "+".join(names)
        self.array_level = all(m.array_level for m in members)

    # -- options and the model --------------------------------------------------------------------------------------
    def get_params(self) -> dict:
        return {**self.options, "members": {m.name: m.get_params() for m in self.members}}

    def fit_datasets(self) -> dict:
        return {f"{m.name}.{k}": v for m in self.members for k, v in m.fit_datasets().items()}

    def use_model(self, model) -> "Combo":
        super().use_model(model)
        for m in self.members:
            m.use_model(self.model)
        return self

    def to(self, device) -> "Combo":
        super().to(device)
        for m in getattr(self, "members", ()):
            m.to(device)
        return self

    # -- fitting ----------------------------------------------------------------------------------------------------
    def fit(self, model, data=None, val=None, labels=None, *, val_labels=None, outputs=None, **sets) -> "Combo":
        """Fit every member as it fits alone, then keep each member's scores on the ID validation split `val`."""
        self.use_model(model)
        if val is None:
            raise OODBenchError(f"{self.name} computes p-values against the ID validation split: pass val= "
                                f"(fit(model, data, val=...))")
        shared = {k: v for k, v in sets.items() if "." not in k}   # e.g. the run's seed
        for m in self.members:
            own = {k.split(".", 1)[1]: v for k, v in sets.items() if k.startswith(m.name + ".")}
            m.fit(model, data, val, labels, val_labels=val_labels, outputs=outputs, **shared, **own)
        valset = _as_imageset(val, val_labels, self.device, f"{self.name} validation data")
        if len(valset) == 0:
            raise OODBenchError(f"{self.name}: the ID validation split is empty; p-values need validation images "
                                f"(data.val_fraction > 0, or val=...)")
        self.stats_ = torch.stack([padded_reference(self._member_scores(m, m.score_set(valset, outputs=outputs)))
                                   for m in self.members])
        self.fitted_ = True
        return self

    @staticmethod
    def _member_scores(member, rows: dict) -> torch.Tensor:
        if member.name not in rows:
            raise OODBenchError(f"combo: {member.name} reports the rows {', '.join(rows)}; a combo member gives "
                                f"one score")
        return torch.as_tensor(rows[member.name]).flatten()

    # -- scoring ----------------------------------------------------------------------------------------------------
    def combine(self, member_scores: list) -> torch.Tensor:
        """The combined OOD score (B,) of the members' OOD scores (each (B,))."""
        p = torch.stack([p_values(self.stats_[i], s.to(self.stats_.device)) for i, s in enumerate(member_scores)], 1)
        return COMBINATIONS[self.options["combine"]](p).float()

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> dict:
        return {f"{i}:{k}": v for i, m in enumerate(self.members) for k, v in m.outputs(x).items()}

    def outputs_key(self) -> tuple:
        return ("combo", *(m.outputs_key() for m in self.members))

    def score_outputs(self, out: dict) -> torch.Tensor:
        scores = []
        for i, m in enumerate(self.members):
            own = {k.split(":", 1)[1]: v for k, v in out.items() if k.startswith(f"{i}:")}
            scores.append(m.score_outputs(own or out))   # unprefixed: score_features's features and logits
        return self.combine(scores)

    def score_set(self, imageset, batch_size: int = 500, outputs=None) -> dict:
        """Each member over the set through its own shared outputs (one network pass for members reading the same
        outputs, and none again for methods already scored), then combined."""
        self.require_fitted()
        scores = [self._member_scores(m, m.score_set(imageset, batch_size, outputs)).to(self.device)
                  for m in self.members]
        return {self.name: self.combine(scores)}

    # -- fitted state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "members": [m.state_dict() for m in self.members]}

    def load_state_dict(self, state: dict) -> "Combo":
        super().load_state_dict(state)
        saved = state.get("members") or []
        if len(saved) != len(self.members):
            raise OODBenchError(f"this state holds {len(saved)} combo members, {self.name} has {len(self.members)}")
        for m, s in zip(self.members, saved):
            m.load_state_dict(s)
        self.stats_ = _move(self.stats_, self.device)
        return self
