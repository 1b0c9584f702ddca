"""The one evaluation path: fit → tune → score the ID test set → score each OOD set → metric rows, with the
method's own notes (`row_notes`) and numbers (`extra_metrics`). `oodbench eval`, `oodbench.Evaluator` and the bench
cells all go through `evaluate_method`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np

from oodbench import data, joint_metrics, metrics
from oodbench.engine import distributed, setup_device
from oodbench.errors import OODBenchError
from oodbench.workflow.files import check_limit
from oodbench.workflow.tuning import tune as tune_method


@dataclass
class Outcome:
    """One OOD set's result for one method: its metric rows and scores, or the error that stopped it."""

    out: object
    rows: list = field(default_factory=list)
    scores: Optional[dict] = None
    error: Optional[BaseException] = None


@dataclass
class IdResult:
    """The method's in-distribution side, computed once: scores, notes for the report, numbers for every row."""

    scores: dict
    notes: dict
    extra: dict


def set_name(spec) -> str:
    return spec if isinstance(spec, str) else getattr(spec, "name", type(spec).__name__)


def metric_rows(id_scores: dict, ood_scores: dict, in_name: str, out_name: str, bootstrap: int = 0,
                rename=lambda row: row, joint: bool = False, fs_scores: Optional[dict] = None) -> list:
    """One metrics row per reported score row (keys not starting with "_"), with bootstrap intervals if asked and,
    with `joint`, the joint metrics (joint_metrics.JOINT_TITLES) from the ID set's recorded predictions. With
    `fs_scores` (the ID ∪ csID scores, `pooled_scores`), the full-spectrum metrics (fs_*) of the same row."""
    rows = []
    for row in (k for k in id_scores if not k.startswith("_")):
        result = {"method": rename(row), "in": in_name, "out": out_name,
                  **detection_numbers(id_scores, row, ood_scores[row], joint)}
        if fs_scores is not None:
            fs = detection_numbers(fs_scores, row, ood_scores[row], joint)
            result.update({f"fs_{k}": fs[k] for k in result if k in fs})
        if bootstrap:
            for name, (lo, hi) in metrics.bootstrap_ci(id_scores[row], ood_scores[row], bootstrap).items():
                result[f"{name}_ci"] = [lo, hi]
        rows.append(result)
    return rows


def detection_numbers(id_scores: dict, row: str, ood_row, joint: bool) -> dict:
    """The detection metrics of score row `row` and, with `joint`, the joint ones: one sort of the pooled scores
    either way (evaluate_joint computes the detection metrics from the counts it sorts for the joint ones)."""
    if not joint:
        return metrics.evaluate(id_scores[row], ood_row)
    correct = id_scores["_pred"] == id_scores["_label"]
    values = joint_metrics.evaluate_joint(id_scores[row], ood_row, correct, id_scores.get("_conf"))
    keep = metrics.METRIC_NAMES + tuple(joint_metrics.JOINT_TITLES)
    return {k: values[k] for k in keep if k in values}


def pooled_scores(id_scores: dict, csid_scores: list) -> dict:
    """ID ∪ csID: each array the ID set's followed by each csID set's (score rows, `_pred`, `_conf`, `_label`)."""
    keys = [k for k in id_scores if k != "_cache_key" and all(k in s for s in csid_scores)]
    return {k: np.concatenate([np.asarray(id_scores[k])] + [np.asarray(s[k]) for s in csid_scores]) for k in keys}


def csid_numbers(method: str, id_scores: dict, csid: list, det, run, scoring, limit) -> dict:
    """`csid_accuracy` (pooled over the csID sets) from the recorded predictions, or a classifier's `accuracy`;
    a csID set without the model's class labels is a one-line error when the method classifies."""
    if "_pred" in id_scores:
        unlabelled = [name for name, s in csid if "_label" not in s]
        if unlabelled:
            raise OODBenchError(csid_label_error(method, unlabelled[0]))
        correct = np.concatenate([s["_pred"] == s["_label"] for _, s in csid])
        return {"csid_accuracy": float(correct.mean())}
    if hasattr(det, "accuracy"):
        sets = [run.scored_set(spec, scoring, limit) for spec, _ in csid]
        values = [det.accuracy(s) for s in sets]
        if all(v is not None for v in values):
            return {"csid_accuracy": float(np.average(values, weights=[len(s) for s in sets]))}
    return {}


def csid_label_error(method: str, spec: str) -> str:
    return (f"csID set {spec} has no class labels of the model's classes, so {method}'s csID accuracy (and the "
            f"FS-OOD joint metrics) cannot be computed; a csID set is the ID classes under covariate shift, e.g. "
            f"corrupt:gaussian_noise:3:<ID set> or OpenOOD's image lists")


def classifies(method) -> bool:
    """Whether a method (a name or a post-hoc method object) gives class predictions or an accuracy."""
    from oodbench import detectors as registry
    from oodbench.detectors.posthoc import PostHoc

    if isinstance(method, PostHoc):
        return True
    cls = registry.get(method)
    return issubclass(cls, PostHoc) or hasattr(registry.trainer_for(cls), "accuracy")


def check_csid(run, cfg: dict, device, csid: list, methods: list) -> None:
    """Before any fitting: every csID set has labels when a method classifies (post-hoc methods, classifiers)."""
    asking = [m if isinstance(m, str) else type(m).__name__ for m in methods if classifies(m)]
    for spec in csid:
        labels = run.scored_set(spec, cfg, device=device).labels if isinstance(spec, str) else spec.labels
        if asking and labels is None:
            raise OODBenchError(csid_label_error(asking[0], set_name(spec)))


def check_joint(method: str, det) -> None:
    """Joint metrics asked of a method without class predictions: the one-line error, before any scoring."""
    from oodbench.detectors.posthoc import PostHoc

    joint_metrics.require_predictions(method, isinstance(det, PostHoc) and det.model is not None, True)


def evaluate_method(run, scoring, outs: Iterable, limit: Optional[int] = None, bootstrap: int = 0,
                    tune: bool = False, rename=lambda row: row, accuracies: Optional[dict] = None,
                    on_id=None, joint: bool = False, csid: Iterable = ()) -> Iterator[Outcome]:
    """Outcomes of one prepared method on each OOD set of `outs`. Errors while scoring the ID set raise; an error on
    one OOD set is yielded as that set's outcome, so a caller may record it and go on (bench) or raise (eval).
    `on_id(IdResult)` is called once the ID side is scored. `csid`: covariate-shifted ID sets, scored after the ID
    set (errors raise): every row gets csid_accuracy and the full-spectrum metrics of ID ∪ csID (fs_*)."""
    det, in_name = scoring.det, run.id_name()
    extra = {}
    if tune:   # {} for a method without a grid: the rows say it was asked and nothing was chosen
        extra["tuned"] = tune_method(run, scoring)
    if joint:
        check_joint(scoring.name, det)
    id_scores = run.score(scoring, run.in_distribution(), limit)
    if joint:
        joint_metrics.require_predictions(scoring.name, "_pred" in id_scores, "_label" in id_scores)
    if hasattr(det, "accuracy"):   # classifiers report their ID test accuracy beside the rows (once per model)
        accuracies = {} if accuracies is None else accuracies
        if scoring.tag not in accuracies:
            accuracies[scoring.tag] = det.accuracy(run.scored_set(run.in_distribution(), scoring, limit))
        if accuracies[scoring.tag] is not None:
            extra["id_accuracy"] = accuracies[scoring.tag]
    fs_scores = None
    if csid:
        scored = [(set_name(spec), run.score(scoring, spec, limit)) for spec in csid]
        extra.update(csid_numbers(scoring.name, id_scores, scored, det, run, scoring, limit))
        fs_scores = pooled_scores(id_scores, [s for _, s in scored])
    if run.overlap:
        extra["fit_overlap"] = run.overlap
    notes = {rename(row): texts for row, texts in det.row_notes(id_scores).items()}
    if on_id is not None:
        on_id(IdResult(id_scores, notes, extra))
    for out in outs:
        try:
            ood_scores = run.score(scoring, out, limit)
            numbers = {**extra, **det.extra_metrics(id_scores, ood_scores)}
            rows = [{**r, **numbers} for r in
                    metric_rows(id_scores, ood_scores, in_name, set_name(out), bootstrap, rename, joint, fs_scores)]
        except Exception as e:  # noqa: BLE001 - handed to the caller, which raises or records it
            yield Outcome(out, error=e)
        else:
            yield Outcome(out, rows, ood_scores)


def evaluate(run, methods: Iterable, out_specs: Iterable, limit: Optional[int] = None, overrides: Iterable[str] = (),
             device="auto", bootstrap: int = 0, tune: bool = False, joint: bool = False, save: bool = True,
             csid: Iterable = ()) -> list:
    """Metrics rows (one per reported row × OOD set) for methods of one run; also saved in the run (unless not
    `save`: the caller then calls `save_metrics`, e.g. after printing them). With `tune`,
    each method's options are first chosen on validation data and recorded in its rows; with `joint`, the joint
    metrics (OSCR, CCR@FPR, AUTC, AURC, ECE, ...) join every row; with `csid` (covariate-shifted ID sets), the
    full-spectrum metrics (fs_*: ID ∪ csID against each OOD set) and csid_accuracy. Every method, option,
    dataset and setting is checked, and the fit/test overlap refused, before the first image is scored."""
    methods, out_specs, csid = list(methods), list(out_specs), list(csid)
    check_evaluation(methods, out_specs, limit, bootstrap, csid)
    device = setup_device(device)
    cfg = run.scoring_config(overrides)
    check_run(run, cfg, device, [run.in_distribution(), *out_specs, *csid])
    check_csid(run, cfg, device, csid, methods)
    prepared = [run.prepare(m, overrides, device) for m in methods]
    if joint:
        for scoring in prepared:
            check_joint(scoring.name, scoring.det)
    rows, accuracies = [], {}
    for scoring in prepared:
        for outcome in evaluate_method(run, scoring, out_specs, limit, bootstrap, tune, accuracies=accuracies,
                                       joint=joint, csid=csid):
            if outcome.error is not None:
                raise outcome.error
            rows += outcome.rows
    if save:
        save_metrics(run, rows)
    return rows


def save_metrics(run, rows: list) -> None:
    """Merge `rows` into the run's metrics.json / metrics.csv (main process only)."""
    if distributed.is_main():
        run.update_metrics(rows)


def check_run(run, cfg: dict, device, specs: list) -> None:
    """Before anything is fitted, scored or written: the scoring settings, every set (loaded as the methods will
    score it), and no fit/test overlap."""
    check_dataset_options(run.kind, cfg)
    data.decoder_for(data.decode_choice(cfg["data"].get("decode")), device)   # decode=gpu needs a usable GPU
    name_every_failure([s for s in specs if isinstance(s, str)], lambda spec: run.scored_set(spec, cfg, device=device))
    run.check_overlap(cfg, device)


def check_evaluation(methods: list, out_specs: list, limit, bootstrap, csid: list = ()) -> None:
    if not methods:
        raise OODBenchError("name at least one method, e.g. --method msp,energy")
    if not out_specs:
        raise OODBenchError("name at least one OOD dataset, e.g. --out digits,noise:gaussian")
    name_every_failure([s for s in [*out_specs, *csid] if isinstance(s, str)], data.check_spec)
    clash = [s for s in csid if s in out_specs]
    if clash:
        raise OODBenchError(f"{set_name(clash[0])} is named both as an OOD set and as a csID set (in-distribution "
                            f"under covariate shift); name it once")
    check_limit(limit)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise OODBenchError(f"--bootstrap must be a number of resamples >= 0 (0 = no intervals), got {bootstrap!r}")


def check_dataset_options(kind: str, cfg: dict) -> None:
    """The dataset specs named by options, checked as --out specs are; data.stream and data.decode."""
    from oodbench import detectors

    data.stream_choice((cfg.get("data") or {}).get("stream"))
    data.decode_choice((cfg.get("data") or {}).get("decode"))
    for key, spec in detectors.datasets_named(kind, cfg).items():
        try:
            data.check_spec(spec)
        except OODBenchError as e:
            raise OODBenchError(f"{key}: {e}") from None


def name_every_failure(specs, check) -> None:
    """Run `check(spec)` on every spec; one error naming each spec that failed, with its reason."""
    failed = []
    for spec in dict.fromkeys(specs):
        try:
            check(spec)
        except OODBenchError as e:
            failed.append(f"{spec}: {e}")
    if failed:
        raise OODBenchError(f"{len(failed)} dataset(s) not available; " + " | ".join(failed))
