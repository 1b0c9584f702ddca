"""Finding the run a command means: `--model SPEC`, `--run DIR`, or the default run of a method's kind for a set
and seed; and the `oodbench train` command that would make a missing one."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterable, Optional

from oodbench import config as configs
from oodbench import detectors as registry
from oodbench.errors import OODBenchError, check_seed
from oodbench.workflow.files import safe_name
from oodbench.workflow.runs import ModelRun, Run, runs_root


def default_run_dir(kind: str, in_spec: str, seed: int, runs_dir=None, name: Optional[str] = None) -> Path:
    return runs_root(runs_dir) / (f"{kind}-{safe_name(in_spec)}-s{seed}" + (f"-{safe_name(name)}" if name else ""))


def split_model_overrides(overrides: Iterable[str]) -> tuple[dict, list]:
    """(`model.mean/std/size/head/layers` values and the `clip.*` options for load_model, the other overrides)."""
    model, rest = {}, []
    for item in overrides:
        keys, value = configs.parse_override(item)
        if keys[0] == "clip":   # a zero-shot CLIP head's class names / templates / scale (docs/clip.md)
            if len(keys) != 2 or keys[1] not in ("names", "templates", "logit_scale"):
                raise OODBenchError(f"--set {item}: the clip options are clip.names, clip.templates and "
                                    f"clip.logit_scale")
            model.setdefault("clip", {})[keys[1]] = value
        elif keys[0] != "model":
            rest.append(item)
        elif len(keys) == 2 and keys[1] in ("mean", "std", "size", "head", "layers"):
            model[keys[1]] = value
        elif keys[1:] == ["ensemble"]:   # --model A,B,C: mean logits (default) or mean softmax
            model["ensemble_mode"] = value
        else:
            raise OODBenchError(f"--set {item}: with --model, the model options are model.mean, model.std, "
                                f"model.size, model.head, model.layers and model.ensemble (for --model A,B,C)")
    return model, rest




def find_run(method: str, in_spec: Optional[str], seed: int = 0, runs_dir=None, run: Optional[str] = None,
             run_name: Optional[str] = None, model: Optional[str] = None, fit_limit: Optional[int] = None,
             overrides: Iterable[str] = (), data_root=None, fit_data: Optional[str] = None) -> tuple[Run, list]:
    """(the run given by --model, --run, or the default run of `method`'s kind for this set and seed; the overrides
    left for scoring)."""
    overrides = list(overrides)
    check_seed(seed)
    if model:
        if run:
            raise OODBenchError("give either --model SPEC or --run RUN_DIR, not both")
        if not in_spec:
            raise OODBenchError("--model needs --in DATASET: the in-distribution set whose training split fits the "
                                "statistics and whose test split is scored")
        from oodbench.models import load_model

        options, overrides = split_model_overrides(overrides)
        return ModelRun(load_model(model, in_dataset=in_spec, data_root=data_root, **options), in_spec, model,
                        fit_limit, runs_dir, data_root, fit_spec=fit_data), overrides
    if fit_limit is not None or fit_data is not None:
        raise OODBenchError("--fit-limit and --fit-data apply to --model; a trained run fits on its own training "
                            "split")
    return _find_trained_run(method, in_spec, seed, runs_dir, run, run_name, data_root), overrides


def _find_trained_run(method, in_spec, seed, runs_dir, run, run_name, data_root=None) -> Run:
    if run:
        return Run(run)
    if not in_spec:
        raise OODBenchError("say which run to use: --run RUN_DIR, or --in DATASET (with --seed/--run-name)")
    kind = registry.get(method).kind
    path = default_run_dir(kind, in_spec, seed, runs_dir, run_name)
    if not (path / "config.yaml").is_file():
        raise OODBenchError(f"no trained run at {path}; train it first: "
                            + train_hint(method, kind, in_spec, seed, runs_dir, run_name, data_root))
    return Run(path)


def train_hint(method, kind, in_spec, seed, runs_dir=None, run_name=None, data_root=None) -> str:
    """The `oodbench train` command that makes the run these options look for: the user's own options echoed back,
    `--preset P` when the run name is a preset's name, else a pointer to the quick preset."""
    presets = configs.read_yaml(configs.config_path(kind)).get("presets") or {}
    options = [("--method", method), ("--in", in_spec), ("--seed", seed or None), ("--run-name", run_name),
               ("--preset", run_name if run_name in presets else None), ("--runs-dir", runs_dir),
               ("--data-root", data_root)]
    command = "oodbench train " + " ".join(f"{k} {shlex.quote(str(v))}" for k, v in options if v is not None)
    if run_name in presets or "quick" not in presets:
        return command
    return command + " (the paper-scale config; add --preset quick for a run of minutes)"
