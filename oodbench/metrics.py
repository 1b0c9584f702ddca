"""OOD detection metrics from one sort: AUROC, AUPR-In, AUPR-Out, two FPR@95TPR variants, detection error.

Scores follow the package convention: higher = more OOD. OOD is the positive class for AUROC, AUPR-Out and the
ROC points; ID is the positive class (with score -s) for AUPR-In and the classic FPR@95. See docs/metrics.md.

Everything is computed from the cumulative counts at each distinct score (ties grouped), taken in descending score
order: ``tp[g]`` = OOD samples with score >= v_g and ``fp[g]`` = ID samples with score >= v_g. The ID-positive
quantities are read off the same counts from the other end, so one sort serves all metrics. Results equal
scikit-learn's ``roc_auc_score`` / ``average_precision_score`` / ``roc_curve`` to rounding.
"""

import numpy as np

from oodbench.errors import OODBenchError

# The one list of metric names (and their table titles) that evaluation, `eval` output and bench reports use.
METRIC_TITLES = {"auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out", "fpr95": "FPR@95",
                 "fpr95_openood": "FPR@95 (OpenOOD)", "detection_error": "DetErr"}
METRIC_NAMES = tuple(METRIC_TITLES)
TABLE_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "detection_error")   # the columns of result tables

_TPR_LEVEL = 0.95
_BOOT_CHUNK_ELEMENTS = 4_000_000  # bootstrap rows are processed in chunks of about this many sampled indices


def evaluate(id_scores, ood_scores) -> dict:
    """All metrics in ``METRIC_NAMES`` as floats in [0, 1] (fractions, not percents)."""
    id_scores, ood_scores = _check_pair(id_scores, ood_scores)
    tp, fp, _, _ = _grouped_counts(id_scores, ood_scores)
    values = _metrics_from_counts(tp[None], fp[None], float(len(ood_scores)), float(len(id_scores)))
    return {name: float(values[name][0]) for name in METRIC_NAMES}


def roc_points(id_scores, ood_scores, drop_intermediate=False):
    """ROC curve with OOD as positive class: ``(fpr, tpr, thresholds)``, as sklearn's ``roc_curve``.

    Starts at (0, 0) with threshold +inf; one point per distinct score, or only the corners with
    ``drop_intermediate=True`` (same rule as sklearn, for lighter plots; the curve's area is unchanged).
    """
    id_scores, ood_scores = _check_pair(id_scores, ood_scores)
    tp, fp, thresholds, _ = _grouped_counts(id_scores, ood_scores)
    if drop_intermediate and len(tp) > 2:
        corner = np.logical_or(np.diff(fp, 2), np.diff(tp, 2))
        keep = np.flatnonzero(np.concatenate(([True], corner, [True])))
        tp, fp, thresholds = tp[keep], fp[keep], thresholds[keep]
    fpr = np.concatenate(([0.0], fp / fp[-1]))
    tpr = np.concatenate(([0.0], tp / tp[-1]))
    return fpr, tpr, np.concatenate(([np.inf], thresholds))


def bootstrap_ci(id_scores, ood_scores, n_boot=1000, alpha=0.05, seed=0) -> dict:
    """Percentile bootstrap intervals ``{metric: (lo, hi)}`` at level 1 - alpha.

    Each replicate resamples the ID and the OOD set with replacement, keeping their sizes. The scores are sorted
    once; a replicate only changes how many times each distinct score is drawn, so it costs O(n) without a sort.
    Deterministic for a given seed and input.
    """
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 1):
        raise OODBenchError(f"bootstrap needs n_boot >= 1 (an integer), got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise OODBenchError(f"bootstrap alpha must be in (0, 1), got {alpha!r}; use e.g. 0.05 for 95% intervals")
    id_scores, ood_scores = _check_pair(id_scores, ood_scores)
    n_id, n_ood = len(id_scores), len(ood_scores)
    _, _, _, group_of = _grouped_counts(id_scores, ood_scores)
    n_groups = int(group_of.max()) + 1
    id_groups, ood_groups = group_of[:n_id], group_of[n_id:]

    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _BOOT_CHUNK_ELEMENTS // (n_id + n_ood)))
    collected = {name: [] for name in METRIC_NAMES}
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        fp = _resampled_group_counts(rng, id_groups, rows, n_groups).cumsum(axis=1)
        tp = _resampled_group_counts(rng, ood_groups, rows, n_groups).cumsum(axis=1)
        values = _metrics_from_counts(tp, fp, float(n_ood), float(n_id))
        for name in METRIC_NAMES:
            collected[name].append(values[name])
    out = {}
    for name in METRIC_NAMES:
        lo, hi = np.quantile(np.concatenate(collected[name]), [alpha / 2, 1 - alpha / 2])
        out[name] = (float(lo), float(hi))
    return out


# ---------------------------------------------------------------------------------------------------------------
# internals


def _resampled_group_counts(rng, groups, rows, n_groups):
    """(rows, n_groups) float64: how often each distinct-score group is drawn when resampling ``groups``."""
    n = len(groups)
    drawn = groups[rng.integers(0, n, size=(rows, n))]
    drawn += (np.arange(rows, dtype=drawn.dtype) * n_groups)[:, None]
    counts = np.bincount(drawn.ravel(), minlength=rows * n_groups)
    return counts.reshape(rows, n_groups).astype(np.float64)


def _grouped_counts(id_scores, ood_scores):
    """One sort of the pooled scores (descending), ties grouped.

    Returns cumulative OOD counts ``tp`` and ID counts ``fp`` (float64) at each distinct score, the distinct
    scores (descending) and, for each pooled input position (ID first, then OOD), the index of its group.
    """
    n_id = len(id_scores)
    order, ends, thresholds = _sorted_groups(id_scores, ood_scores)
    tp = np.cumsum(order >= n_id)[ends].astype(np.float64)
    fp = (ends + 1) - tp
    group_of = np.empty(len(order), dtype=np.int64)
    group_of[order] = np.repeat(np.arange(len(ends)), np.diff(np.concatenate(([-1], ends))))
    return tp, fp, thresholds, group_of


def _sorted_groups(id_scores, ood_scores):
    """The one sort: pooled positions (ID first, then OOD) in descending score order, the last sorted position of
    each group of equal scores, and the distinct scores (descending). oodbench.joint_metrics shares it."""
    negated = -np.concatenate((id_scores, ood_scores))
    order = np.argsort(negated)
    sorted_neg = negated[order]
    ends = np.append(np.flatnonzero(sorted_neg[1:] != sorted_neg[:-1]), len(order) - 1)
    return order, ends, -sorted_neg[ends]


def _metrics_from_counts(tp, fp, n_pos, n_neg):
    """Metrics for a batch of count tables ``tp``, ``fp`` of shape (B, G); returns {name: (B,) array}.

    ``tp``/``fp`` are cumulative OOD/ID counts at each distinct score in descending order (last column =
    ``n_pos``/``n_neg``). Columns whose counts do not change (empty groups in a bootstrap draw) are harmless.
    """
    zeros = np.zeros((tp.shape[0], 1))
    tp_prev = np.concatenate((zeros, tp[:, :-1]), axis=1)
    fp_prev = np.concatenate((zeros, fp[:, :-1]), axis=1)
    d_tp, d_fp = tp - tp_prev, fp - fp_prev

    # AUROC: trapezoids between consecutive ROC points; integer-valued sums are exact in float64.
    auroc = np.sum(d_fp * (tp + tp_prev), axis=1) / (2.0 * n_pos * n_neg)

    # AUPR-Out: recall steps weighted by precision at that threshold (sklearn's average precision).
    called = tp + fp
    precision_out = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    aupr_out = np.sum(d_tp * precision_out, axis=1) / n_pos

    # AUPR-In: ID positive with score -s, i.e. thresholds from the low end: at group g the accepted set is
    # everything with score <= v_g, holding n_neg - fp_prev ID and n_pos - tp_prev OOD samples.
    id_accepted = n_neg - fp_prev
    accepted = id_accepted + (n_pos - tp_prev)
    precision_in = np.divide(id_accepted, accepted, out=np.zeros_like(tp), where=accepted > 0)
    aupr_in = np.sum(d_fp * precision_in, axis=1) / n_neg

    # Classic FPR@95 (ID positive): ID TPR at group g is (n_neg - fp_prev)/n_neg, non-increasing in g; the
    # first ROC point (walking up in score) with TPR >= 0.95 is the last g that satisfies it.
    rows = np.arange(tp.shape[0])
    last_ok = np.sum(id_accepted / n_neg >= _TPR_LEVEL, axis=1) - 1
    fpr95 = (n_pos - tp_prev[rows, last_ok]) / n_pos

    # OpenOOD v1.5 FPR@95 (OOD positive): first group in descending score with tp/n_pos >= 0.95.
    first_ok = tp.shape[1] - np.sum(tp / n_pos >= _TPR_LEVEL, axis=1)
    fpr95_openood = fp[rows, first_ok] / n_neg

    # Detection error: min over ROC points of 0.5 (1 - TPR) + 0.5 FPR. The (0, 0) start and the (1, 1) end
    # (last column) both give 0.5, so the columns alone cover every point.
    errors = 0.5 * (1.0 - tp / n_pos) + 0.5 * (fp / n_neg)
    detection_error = errors.min(axis=1)

    return {
        "auroc": auroc,
        "aupr_in": aupr_in,
        "aupr_out": aupr_out,
        "fpr95": fpr95,
        "fpr95_openood": fpr95_openood,
        "detection_error": detection_error,
    }


def _check_pair(id_scores, ood_scores):
    return _as_scores(id_scores, "ID"), _as_scores(ood_scores, "OOD")


def _as_scores(scores, which):
    """A 1-D finite float64 numpy array, or an OODBenchError saying what is wrong with this set."""
    if hasattr(scores, "detach"):  # torch tensor on any device, any float dtype
        scores = scores.detach().cpu().double().numpy()
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise OODBenchError(f"{which} scores are not numeric ({exc}); pass a 1-D array of floats") from None
    if array.ndim != 1:
        raise OODBenchError(
            f"{which} scores must be 1-D (one score per sample), got shape {array.shape}; flatten them first"
        )
    if array.size == 0:
        raise OODBenchError(
            f"{which} scores are empty: metrics need at least one ID and one OOD score (one class only); "
            "check that the dataset was found and scored"
        )
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise OODBenchError(
            f"{which} scores contain {bad.size} NaN/inf value(s) of {array.size} (first at indices {shown}); "
            "the detector produced invalid scores, check its inputs, settings and numerical stability"
        )
    return array
