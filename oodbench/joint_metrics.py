"""Metrics that join classification and detection, from the same one sort as `oodbench.metrics`.

Inputs are the method's OOD scores (higher = more OOD) and, for the ID test images, whether the classifier's
prediction is right (`correct`) and, for calibration, the classifier's top-class softmax probability
(`confidence`). See docs/metrics.md for each definition, its convention and the reference it equals:

- AUTC (pytorch-ood 0.4.0 `metrics.AUTC`): needs scores only.
- OSCR (pytorch-ood `oscr_score`), CCR@FPR (OpenOOD `ccr_fpr` at FPR 1e-1 ... 1e-4): ID ∪ OOD.
- AURC, AUGRC, Risk@80%Cov, Cov@5%Risk (torch-uncertainty's selective-classification numbers, ranked by the
  method's score: the most OOD-looking ID images are rejected first): ID only; ties are averaged over their orders.
- ECE and MCE, 15 equal-width bins (torch-uncertainty's `CalibrationError`, i.e. torchmetrics'): ID only.
"""
from __future__ import annotations

import numpy as np

from oodbench import metrics
from oodbench.errors import OODBenchError

JOINT_TITLES = {"autc": "AUTC", "oscr": "OSCR", "ccr_fpr1e-1": "CCR@FPR1e-1", "ccr_fpr1e-2": "CCR@FPR1e-2",
                "ccr_fpr1e-3": "CCR@FPR1e-3", "ccr_fpr1e-4": "CCR@FPR1e-4", "aurc": "AURC", "augrc": "AUGRC",
                "risk_at_80cov": "Risk@80%Cov", "cov_at_5risk": "Cov@5%Risk", "ece": "ECE", "mce": "MCE"}
PREDICTION_METRICS = tuple(k for k in JOINT_TITLES if k != "autc")   # the ones that need predictions
# Full-spectrum OOD (csID images count as in-distribution): the detection metrics, and with joint the joint ones,
# of ID ∪ csID against each OOD set, under "fs_" names (docs/metrics.md).
FS_TITLES = {f"fs_{k}": f"FS-{t}" for k, t in metrics.METRIC_TITLES.items()}
FS_JOINT_TITLES = {f"fs_{k}": f"FS-{t}" for k, t in JOINT_TITLES.items()}
CCR_FPRS = {"ccr_fpr1e-1": 0.1, "ccr_fpr1e-2": 0.01, "ccr_fpr1e-3": 0.001, "ccr_fpr1e-4": 0.0001}
ECE_BINS = 15          # torch-uncertainty's classification routine default
RISK_COVERAGE = 0.8    # Risk@80%Cov
COVERAGE_RISK = 0.05   # Cov@5%Risk


def evaluate_joint(id_scores, ood_scores, correct=None, confidence=None) -> dict:
    """`metrics.evaluate`'s detection metrics, AUTC and, given `correct` (bool per ID image), the joint and
    selective-classification metrics; with `confidence` (top-class probability per ID image) also ECE and MCE.
    One sort of the pooled scores serves them all."""
    id_scores, ood_scores = metrics._check_pair(id_scores, ood_scores)
    n_id, n_ood = len(id_scores), len(ood_scores)
    order, ends, thresholds = metrics._sorted_groups(id_scores, ood_scores)
    tp = np.cumsum(order >= n_id)[ends].astype(np.float64)
    fp = (ends + 1) - tp
    values = metrics._metrics_from_counts(tp[None], fp[None], float(n_ood), float(n_id))
    out = {name: float(values[name][0]) for name in metrics.METRIC_NAMES}
    out["autc"] = autc_from_range(id_scores, ood_scores, thresholds[-1], thresholds[0])
    if correct is None:
        return out
    correct = _as_flags(correct, n_id, "correct")
    pooled_correct = np.concatenate((correct, np.zeros(n_ood, dtype=bool)))
    cc = np.cumsum(pooled_correct[order])[ends].astype(np.float64)
    out["oscr"] = _oscr(tp, cc, float(n_ood), float(n_id))
    for name, rate in CCR_FPRS.items():
        out[name] = _ccr_at_fpr(tp, cc, n_ood, n_id, rate)
    out.update(_selective(order, ends, correct, n_id))
    if confidence is not None:
        out.update(calibration_errors(confidence, correct))
    return out


def autc(id_scores, ood_scores) -> float:
    """Area under the threshold curve (pytorch-ood's AUTC): mean of the areas under FPR(τ) and FNR(τ) over the
    min-max normalised scores. NaN for constant scores (as pytorch-ood's metric class)."""
    id_scores, ood_scores = metrics._check_pair(id_scores, ood_scores)
    low = min(id_scores.min(), ood_scores.min())
    high = max(id_scores.max(), ood_scores.max())
    return autc_from_range(id_scores, ood_scores, low, high)


def autc_from_range(id_scores, ood_scores, low, high) -> float:
    if high == low:
        return float("nan")
    span = float(high) - float(low)
    return float(((id_scores.mean() - low) / span + (high - ood_scores.mean()) / span) / 2.0)


def calibration_errors(confidence, correct, n_bins: int = ECE_BINS) -> dict:
    """ECE (bin-size weighted mean |accuracy - confidence|) and MCE (largest gap) over `n_bins` equal-width bins of
    [0, 1], each bin [b_i, b_i+1) and a last one for confidence exactly 1, as torchmetrics bins them."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = _as_flags(correct, len(confidence), "correct")
    if confidence.size == 0 or not np.all(np.isfinite(confidence)) or confidence.min() < 0 or confidence.max() > 1:
        raise OODBenchError("calibration needs one top-class probability in [0, 1] per image")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges, confidence, side="right") - 1
    count = np.bincount(index, minlength=n_bins + 1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.nan_to_num(np.bincount(index, confidence, minlength=n_bins + 1) / count)
        acc = np.nan_to_num(np.bincount(index, correct.astype(np.float64), minlength=n_bins + 1) / count)
    gaps = np.abs(acc - conf)
    return {"ece": float(np.sum(gaps * count / count.sum())), "mce": float(gaps.max())}


def require_predictions(method: str, has_predictions: bool, labelled: bool) -> None:
    """The one-line error for joint metrics asked of a method (or an ID set) that cannot give them."""
    if not has_predictions:
        raise OODBenchError(f"{method} gives no class predictions, so the joint metrics (OSCR, CCR@FPR, AURC, ECE) "
                            f"cannot be computed for it; drop --joint or use a classifier-based method (msp, energy, "
                            f"knn, ...)")
    if not labelled:
        raise OODBenchError(f"the joint metrics need class labels of the ID test set (matching the model's classes); "
                            f"this one has none: drop --joint or use a labelled ID set")


# ---------------------------------------------------------------------------------------------------------------
def _oscr(tp, cc, n_ood, n_id):
    """Trapezoidal area under (FPR, CCR), threshold τ accepting s <= τ, one point per distinct score plus (0, 0).
    In descending groups g, the points are F_g = (n_ood - tp[g-1]) / n_ood, C_g = (n_c - cc[g-1]) / n_id."""
    n_c = cc[-1]
    tp_prev = np.concatenate(([0.0], tp[:-1]))
    cc_prev = np.concatenate(([0.0], cc[:-1]))
    return float(np.sum((tp - tp_prev) * (2.0 * n_c - cc - cc_prev)) / (2.0 * n_ood * n_id))


def _ccr_at_fpr(tp, cc, n_ood, n_id, rate):
    """OpenOOD's rule: the threshold is the k-th lowest OOD score, k = ceil(rate * n_ood); CCR counts the correctly
    classified ID images scored strictly below it."""
    k = int(np.ceil(rate * n_ood))
    accepted_ood = n_ood - np.concatenate(([0.0], tp[:-1]))     # OOD with score <= v_g, non-increasing in g
    g = int(np.sum(accepted_ood >= k)) - 1                        # the group holding the k-th lowest OOD score
    return float((cc[-1] - cc[g]) / n_id)


def _selective(order, ends, correct, n_id) -> dict:
    """Risk-coverage numbers of the ID images answered from the lowest score up (torch-uncertainty's AURC, AUGRC,
    Risk@80%Cov, Cov@5%Risk). Tied ID scores: the cumulative errors are averaged over the orders of the tie."""
    pooled_group = np.repeat(np.arange(len(ends)), np.diff(np.concatenate(([-1], ends))))
    is_id = order < n_id
    id_groups = pooled_group[is_id][::-1]                 # ascending score order
    errors = ~correct[order[is_id][::-1]]
    starts = np.flatnonzero(np.concatenate(([True], id_groups[1:] != id_groups[:-1])))
    sizes = np.diff(np.append(starts, n_id))
    group_errors = np.add.reduceat(errors.astype(np.float64), starts)
    before = np.concatenate(([0.0], np.cumsum(group_errors)[:-1]))
    k = np.arange(1, n_id + 1, dtype=np.float64)
    start_of = np.repeat(starts, sizes).astype(np.float64)
    cum_errors = np.repeat(before, sizes) + (k - start_of) * np.repeat(group_errors / sizes, sizes)
    risk = cum_errors / k
    out = {"risk_at_80cov": float(risk[int(np.ceil(n_id * RISK_COVERAGE)) - 1])}
    ok = np.flatnonzero(risk <= COVERAGE_RISK)
    out["cov_at_5risk"] = float((ok[-1] + 1) / n_id) if ok.size else float("nan")
    if n_id < 2:
        out["aurc"] = out["augrc"] = float("nan")
        return out
    coverage = k / n_id
    trapezoid = lambda y: float(np.sum((y[1:] + y[:-1]) / 2.0) / n_id)   # noqa: E731 - step 1/N
    out["aurc"] = trapezoid(risk) / (1.0 - 1.0 / n_id)
    out["augrc"] = trapezoid(risk * coverage) / (1.0 - 1.0 / n_id)
    return out


def _as_flags(values, n, what):
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values).ravel()
    if array.shape != (n,):
        raise OODBenchError(f"{what} must have one entry per ID image ({n}), got shape {array.shape}")
    return array.astype(bool)
