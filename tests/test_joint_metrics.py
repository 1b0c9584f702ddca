"""Joint classification + detection metrics (oodbench.joint_metrics) against their references: pytorch-ood 0.4.0
(oscr_score, AUTC), OpenOOD's ccr_fpr (transcribed below), torch-uncertainty's risk-coverage numbers (transcribed
below) and torchmetrics' calibration error (what torch-uncertainty's CalibrationError wraps)."""
import itertools

import numpy as np
import pytest
import torch

from oodbench import metrics
from oodbench.errors import OODBenchError
from oodbench.joint_metrics import (CCR_FPRS, autc, calibration_errors, evaluate_joint, require_predictions)

pytorch_ood = pytest.importorskip("pytorch_ood")
from pytorch_ood.metrics import AUTC, oscr_score  # noqa: E402


# ---- transcriptions of the references ----------------------------------------------------------------------------
def openood_ccr_fpr(conf, fpr, pred, label):
    """OpenOOD openood/evaluators/metrics.py ccr_fpr, transcribed (conf: higher = ID; label -1 = OOD)."""
    ind_conf, ind_pred, ind_label = conf[label != -1], pred[label != -1], label[label != -1]
    ood_conf = conf[label == -1]
    fp_num = int(np.ceil(fpr * len(ood_conf)))
    thresh = np.sort(ood_conf)[-fp_num]
    return np.sum((ind_conf > thresh) * (ind_pred == ind_label)) / len(ind_conf)


def tu_error_rates(errors_in_order):
    """torch-uncertainty's _aurc_rejection_rate_compute, errors already in descending-confidence order."""
    e = np.asarray(errors_in_order, dtype=np.float64)
    return np.cumsum(e) / np.arange(1, len(e) + 1)


def tu_numbers(errors_in_order):
    """torch-uncertainty AURC, AUGRC, RiskAt80Cov, CovAt5Risk from the error rates (its compute methods)."""
    r = tu_error_rates(errors_in_order)
    n = len(r)
    cov = np.arange(1, n + 1) / n
    ok = np.flatnonzero(r <= 0.05)
    return {"aurc": np.trapezoid(r, cov) / (1 - 1 / n), "augrc": np.trapezoid(r * cov, cov) / (1 - 1 / n),
            "risk_at_80cov": r[int(np.ceil(n * 0.8)) - 1],
            "cov_at_5risk": (ok[-1] + 1) / n if ok.size else float("nan")}


def pytorch_ood_refs(id_s, ood_s, pred, labels):
    scores = torch.tensor(np.r_[id_s, ood_s], dtype=torch.float64)
    lab = torch.tensor(np.r_[labels, -np.ones(len(ood_s), dtype=np.int64)])
    pr = torch.tensor(np.r_[pred, np.zeros(len(ood_s), dtype=np.int64)])
    return oscr_score(scores, pr, lab), AUTC().update(scores, lab).compute()["AUTC"]


def make(rng, n_id, n_ood, decimals=None, acc=0.7):
    id_s, ood_s = rng.normal(0, 1, n_id), rng.normal(1, 1, n_ood)
    if decimals is not None:
        id_s, ood_s = np.round(id_s, decimals), np.round(ood_s, decimals)
    labels = rng.integers(0, 5, n_id)
    pred = np.where(rng.random(n_id) < acc, labels, (labels + 1) % 5)
    return id_s, ood_s, pred, labels


CASES = [(300, 200, None), (300, 200, 1), (57, 1000, 0), (1000, 40, 2), (12000, 11000, 1)]


@pytest.mark.parametrize("n_id,n_ood,decimals", CASES)
def test_oscr_autc_ccr_equal_references(n_id, n_ood, decimals):
    rng = np.random.default_rng(n_id + n_ood)
    id_s, ood_s, pred, labels = make(rng, n_id, n_ood, decimals)
    ours = evaluate_joint(id_s, ood_s, pred == labels)
    oscr_ref, autc_ref = pytorch_ood_refs(id_s, ood_s, pred, labels)
    assert ours["oscr"] == pytest.approx(oscr_ref, abs=1e-12)
    assert ours["autc"] == pytest.approx(float(autc_ref), abs=1e-12)
    assert autc(id_s, ood_s) == pytest.approx(float(autc_ref), abs=1e-12)
    conf = -np.r_[id_s, ood_s]
    lab = np.r_[labels, -np.ones(n_ood, dtype=np.int64)]
    pr = np.r_[pred, np.zeros(n_ood, dtype=np.int64)]
    for name, rate in CCR_FPRS.items():
        assert ours[name] == pytest.approx(openood_ccr_fpr(conf, rate, pr, lab), abs=1e-12), name
    detection = metrics.evaluate(id_s, ood_s)   # the same sort gives the detection metrics unchanged
    assert all(ours[k] == detection[k] for k in metrics.METRIC_NAMES)


@pytest.mark.parametrize("n_id,n_ood,decimals", CASES)
def test_selective_numbers_equal_torch_uncertainty_without_ties(n_id, n_ood, decimals):
    rng = np.random.default_rng(7 + n_id)
    id_s, ood_s, pred, labels = make(rng, n_id, n_ood, None)
    id_s = rng.permutation(n_id).astype(np.float64)  # distinct scores: the reference's order is well defined
    ours = evaluate_joint(id_s, ood_s, pred == labels)
    ref = tu_numbers((pred != labels)[np.argsort(id_s)])   # lowest OOD score = most confident first
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-12, nan_ok=True), k


def test_selective_numbers_with_ties_are_the_mean_over_tie_orders():
    """With tied scores the reference's order is arbitrary; ours is its exact mean over every order of each tie
    (for the numbers that are linear in the risk curve: AURC, AUGRC, Risk@80%Cov)."""
    id_s = np.array([0.1, 0.1, 0.1, 0.5, 0.5, 0.9, 0.9, 0.9, 0.2])
    correct = np.array([1, 0, 1, 0, 1, 1, 0, 0, 1], dtype=bool)
    ours = evaluate_joint(id_s, np.array([0.3, 1.0]), correct)
    groups = [np.flatnonzero(id_s == v) for v in np.unique(id_s)]   # ascending score
    sums, count = {"aurc": 0.0, "augrc": 0.0, "risk_at_80cov": 0.0}, 0
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        ref = tu_numbers(~correct[np.concatenate(perms)])
        for k in sums:
            sums[k] += ref[k]
        count += 1
    for k in sums:
        assert ours[k] == pytest.approx(sums[k] / count, abs=1e-12), k
    # ties within which every image is right or wrong: the order does not matter, every number is exact
    correct_h = np.array([1, 1, 1, 0, 0, 1, 1, 1, 0], dtype=bool)
    ref = tu_numbers(~correct_h[np.argsort(id_s, kind="stable")])
    ours_h = evaluate_joint(id_s, np.array([0.3]), correct_h)
    for k, v in ref.items():
        assert ours_h[k] == pytest.approx(v, abs=1e-12, nan_ok=True), k


def test_ece_mce_equal_torchmetrics():
    tm = pytest.importorskip("torchmetrics")
    from torchmetrics.classification import MulticlassCalibrationError

    rng = np.random.default_rng(3)
    logits = torch.tensor(rng.normal(0, 2, (5000, 10)), dtype=torch.float32)
    target = torch.tensor(rng.integers(0, 10, 5000))
    probs = logits.softmax(1)
    probs[:7] = torch.eye(10)[:7]               # confidence exactly 1: torchmetrics' extra last bin
    conf, pred = probs.max(1)
    ours = calibration_errors(conf.double().numpy(), (pred == target).numpy())
    for norm, key in (("l1", "ece"), ("max", "mce")):
        ref = MulticlassCalibrationError(num_classes=10, n_bins=15, norm=norm)(probs, target)
        assert ours[key] == pytest.approx(float(ref), abs=1e-6), key
    assert tm is not None


def test_defining_properties():
    rng = np.random.default_rng(0)
    id_s, ood_s, pred, labels = make(rng, 500, 400)
    correct = pred == labels
    perfect = evaluate_joint(id_s - 100, ood_s, correct)    # every OOD image above every ID image
    assert perfect["oscr"] == pytest.approx(correct.mean()) and perfect["autc"] < 0.05
    constant = evaluate_joint(np.zeros(500), np.zeros(400), correct)
    assert constant["oscr"] == pytest.approx(correct.mean() / 2) and np.isnan(constant["autc"])
    right_first = np.where(correct, 0.0, 1.0) + rng.random(500) * 0.1   # wrong predictions score higher
    sel = evaluate_joint(right_first, ood_s, correct)
    assert sel["risk_at_80cov"] <= 1 - correct.mean() and sel["aurc"] < evaluate_joint(-right_first, ood_s,
                                                                                         correct)["aurc"]
    calibrated = calibration_errors(np.full(1000, 0.7), rng.random(1000) < 0.7)
    assert calibrated["ece"] < 0.05


def test_bad_input_is_one_line():
    with pytest.raises(OODBenchError, match="one entry per ID image"):
        evaluate_joint(np.zeros(3), np.ones(2), np.ones(4, dtype=bool))
    with pytest.raises(OODBenchError, match="no class predictions"):
        require_predictions("msma", False, True)
    with pytest.raises(OODBenchError, match="labels"):
        require_predictions("msp", True, False)
