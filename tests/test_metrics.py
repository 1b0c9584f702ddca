"""Metrics core: equality with scikit-learn, hand-computed FPR@95 cases, bad input, bootstrap."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from oodbench.errors import OODBenchError
from oodbench.metrics import METRIC_NAMES, bootstrap_ci, evaluate, roc_points
from references import sklearn_reference

TOL = 1e-12


def assert_matches_sklearn(id_scores, ood_scores):
    ours = evaluate(id_scores, ood_scores)
    ref = sklearn_reference(np.asarray(id_scores, float), np.asarray(ood_scores, float))
    assert tuple(ours) == METRIC_NAMES
    for name in METRIC_NAMES:
        assert isinstance(ours[name], float)
        assert abs(ours[name] - ref[name]) <= TOL, (name, ours[name], ref[name])


def _random_cases():
    rng = np.random.default_rng(0)
    for n_id, n_ood, shift in [(500, 300, 1.0), (57, 1000, 0.3), (2000, 40, -0.5), (20, 20, 3.0)]:
        yield rng.normal(size=n_id), rng.normal(shift, size=n_ood)


@pytest.mark.parametrize("case", range(4))
def test_random_scores_match_sklearn(case):
    id_scores, ood_scores = list(_random_cases())[case]
    assert_matches_sklearn(id_scores, ood_scores)


@pytest.mark.parametrize("seed", range(6))
def test_heavy_ties_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(1, 400, size=2)
    assert_matches_sklearn(rng.integers(0, 4, n_id).astype(float), rng.integers(0, 4, n_ood).astype(float))


def test_ties_across_sets_with_float_scores():
    rng = np.random.default_rng(3)
    pool = rng.normal(size=7)
    assert_matches_sklearn(rng.choice(pool, 300), rng.choice(pool, 250) + 0.0)


@pytest.mark.parametrize("n_id,n_ood", [(1, 1), (5, 3), (100, 1), (1, 100)])
def test_all_equal_scores(n_id, n_ood):
    assert_matches_sklearn(np.full(n_id, 0.7), np.full(n_ood, 0.7))
    result = evaluate(np.full(n_id, 0.7), np.full(n_ood, 0.7))
    assert result["auroc"] == 0.5 and result["detection_error"] == 0.5
    assert result["fpr95"] == 1.0 and result["fpr95_openood"] == 1.0


@pytest.mark.parametrize(
    "id_scores,ood_scores",
    [([0.0], [1.0]), ([1.0], [0.0]), ([1.0], [1.0]), ([0.5], [0.0, 1.0]), ([0.0, 1.0], [0.5]), ([2.0], [2.0, 1.0])],
)
def test_tiny_sets_match_sklearn(id_scores, ood_scores):
    assert_matches_sklearn(id_scores, ood_scores)


def test_perfect_and_inverted_separation():
    perfect = evaluate([0.0, 0.1, 0.2], [1.0, 2.0])
    assert perfect == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0, "fpr95_openood": 0.0,
                       "detection_error": 0.0}
    inverted = evaluate([1.0, 2.0], [0.0, 0.1, 0.2])
    assert inverted["auroc"] == 0.0 and inverted["fpr95"] == 1.0 and inverted["fpr95_openood"] == 1.0


def test_fpr95_classic_hand_computed():
    # 20 ID scores 0..19 and 10 OOD scores 10.5..19.5 (step 1) plus two OOD at -1.
    # Accepting 95% of ID (19 of 20) means threshold 18: ID 0..18 are accepted.
    # OOD accepted (<= 18): -1, -1, 10.5..17.5 -> 2 + 8 = 10 of 12.
    id_scores = np.arange(20.0)
    ood_scores = np.r_[np.arange(10.5, 20.0), -1.0, -1.0]
    assert evaluate(id_scores, ood_scores)["fpr95"] == pytest.approx(10 / 12, abs=0)


def test_fpr95_classic_ties_at_threshold():
    # ID: 0 x10, 1 x10; OOD: 1 x4, 2 x6. No threshold accepts exactly 95% of ID: accepting 0 takes 50%,
    # accepting <= 1 takes 100%, so the threshold is 1 and OOD accepted = the four 1s -> 0.4.
    id_scores = np.r_[np.zeros(10), np.ones(10)]
    ood_scores = np.r_[np.ones(4), np.full(6, 2.0)]
    assert evaluate(id_scores, ood_scores)["fpr95"] == 0.4


def test_fpr95_openood_hand_computed():
    # OOD: 20 scores 10..29; ID: 0..9 and 25. Catching 95% of OOD (19 of 20) needs threshold 11:
    # ID flagged (>= 11): only 25 -> 1 of 11.
    id_scores = np.r_[np.arange(10.0), 25.0]
    ood_scores = np.arange(10.0, 30.0)
    result = evaluate(id_scores, ood_scores)
    assert result["fpr95_openood"] == 1 / 11
    # Classic, same data: accept 95% of ID (>= 10.45 of 11 -> all 11) -> threshold 25; OOD <= 25: 10..25 = 16/20.
    assert result["fpr95"] == 16 / 20


def test_the_two_fpr95_definitions_differ():
    # Same data, different questions: classic looks at the low tail of ID, OpenOOD at the low tail of OOD.
    id_scores = np.r_[np.zeros(95), np.full(5, 10.0)]   # 5% of ID score high
    ood_scores = np.r_[np.full(94, 5.0), np.full(6, -1.0)]  # 6% of OOD score low
    result = evaluate(id_scores, ood_scores)
    assert result["fpr95"] == 0.06          # threshold 0 accepts 95 ID and only the 6 low OOD
    assert result["fpr95_openood"] == 1.0   # threshold 5 catches only 94% of OOD; -1 is needed: all ID flagged


def test_detection_error_hand_computed():
    # Threshold between 1 and 2: TPR = 2/3, FPR = 0 -> 0.5 * 1/3 = 1/6, the best achievable.
    assert evaluate([0.0, 1.0], [2.0, 3.0, 0.5])["detection_error"] == pytest.approx(1 / 6, abs=1e-15)


def test_torch_and_list_inputs_agree_with_numpy():
    rng = np.random.default_rng(5)
    id_scores, ood_scores = rng.normal(size=50), rng.normal(1, size=60)
    ref = evaluate(id_scores, ood_scores)
    as_torch = evaluate(torch.tensor(id_scores, dtype=torch.float64), torch.tensor(ood_scores, requires_grad=True))
    assert as_torch == ref
    assert evaluate(list(id_scores), list(ood_scores)) == ref


def test_roc_points_match_sklearn():
    rng = np.random.default_rng(7)
    id_scores, ood_scores = rng.integers(0, 30, 200).astype(float), rng.integers(10, 40, 150).astype(float)
    is_ood = np.r_[np.zeros(200), np.ones(150)]
    scores = np.r_[id_scores, ood_scores]
    for drop in (False, True):
        ours = roc_points(id_scores, ood_scores, drop_intermediate=drop)
        ref = roc_curve(is_ood, scores, drop_intermediate=drop)
        for got, want in zip(ours, ref):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "id_scores,ood_scores,message",
    [
        ([0.0, np.nan, 1.0, np.nan], [1.0], "ID scores contain 2 NaN/inf value(s) of 4 (first at indices 1, 3)"),
        ([0.0], [np.inf, 1.0], "OOD scores contain 1 NaN/inf value(s) of 2 (first at indices 0)"),
        ([], [1.0], "ID scores are empty"),
        ([1.0], np.array([]), "OOD scores are empty"),
        (np.zeros((3, 2)), [1.0], "ID scores must be 1-D"),
        ([1.0], np.float64(2.0), "OOD scores must be 1-D"),
        (["a"], [1.0], "ID scores are not numeric"),
    ],
)
def test_bad_input_is_a_one_line_error(id_scores, ood_scores, message):
    for call in (evaluate, roc_points, bootstrap_ci):
        with pytest.raises(OODBenchError) as info:
            call(id_scores, ood_scores)
        assert message in str(info.value)
        assert "\n" not in str(info.value)


def test_many_nonfinite_values_are_counted_and_truncated():
    scores = np.full(100, np.nan)
    with pytest.raises(OODBenchError, match=r"100 NaN/inf value\(s\) of 100 \(first at indices 0, 1, 2, 3, 4, \.\.\.\)"):
        evaluate([0.0], scores)


def test_bootstrap_equals_metrics_of_explicit_resamples():
    # A replicate must be exactly the metrics of the resampled sets (same draws as bootstrap_ci makes).
    rng = np.random.default_rng(11)
    id_scores, ood_scores = rng.integers(0, 6, 40).astype(float), rng.integers(2, 9, 30).astype(float)
    n_boot, alpha, seed = 50, 0.1, 3
    draws = np.random.default_rng(seed)
    id_idx = draws.integers(0, 40, size=(n_boot, 40))
    ood_idx = draws.integers(0, 30, size=(n_boot, 30))
    replicates = [evaluate(id_scores[i], ood_scores[j]) for i, j in zip(id_idx, ood_idx)]
    ci = bootstrap_ci(id_scores, ood_scores, n_boot=n_boot, alpha=alpha, seed=seed)
    for name in METRIC_NAMES:
        values = [r[name] for r in replicates]
        want = np.quantile(values, [alpha / 2, 1 - alpha / 2])
        assert ci[name] == pytest.approx(tuple(want), abs=1e-12), name


def test_bootstrap_contains_point_estimate_and_is_deterministic():
    rng = np.random.default_rng(2)
    id_scores, ood_scores = rng.normal(size=400), rng.normal(0.8, size=300)
    point = evaluate(id_scores, ood_scores)
    ci = bootstrap_ci(id_scores, ood_scores, n_boot=300, seed=1)
    assert set(ci) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        lo, hi = ci[name]
        assert 0.0 <= lo < point[name] < hi <= 1.0, (name, lo, point[name], hi)
    assert bootstrap_ci(id_scores, ood_scores, n_boot=300, seed=1) == ci
    assert bootstrap_ci(id_scores, ood_scores, n_boot=300, seed=2) != ci


def test_bootstrap_rejects_bad_settings():
    with pytest.raises(OODBenchError, match="n_boot"):
        bootstrap_ci([0.0], [1.0], n_boot=0)
    with pytest.raises(OODBenchError, match="alpha"):
        bootstrap_ci([0.0], [1.0], alpha=1.5)
