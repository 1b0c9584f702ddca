"""The workflow: runs and their caches, fitting, tuning, scoring, evaluation, training and run lookup. It loads data,
writes files and hands methods what they fit on; the methods themselves (oodbench/detectors) do neither.

    runs.py        Run / ModelRun / RunCache / Scoring: where a model, its ID data and its caches live
    fitting.py     a post-hoc method fitted on a run (cached reference outputs, validation sets)
    tuning.py      --tune: options chosen on validation data
    scoring.py     scores of a method on a set, cached
    evaluation.py  the one evaluation path (eval, Evaluator, bench cells)
    training.py    oodbench train
    lookup.py      which run a command means
    files.py       names, atomic writes, keyed caches, metrics.json
"""
from oodbench.workflow.evaluation import (Outcome, check_evaluation, classifies, csid_label_error,  # noqa: F401
                                          evaluate, evaluate_method, metric_rows, name_every_failure, save_metrics,
                                          set_name)
from oodbench.workflow.files import (check_limit, file_digest, load_npz, read_meta, read_metrics,  # noqa: F401
                                     read_npz, safe_name, save_npz, write_atomic)
from oodbench.workflow.lookup import default_run_dir, find_run, split_model_overrides, train_hint  # noqa: F401
from oodbench.workflow.runs import ModelRun, Run, RunCache, Scoring, runs_root  # noqa: F401
from oodbench.workflow.training import finished, train  # noqa: F401
