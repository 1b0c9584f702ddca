"""End to end through the CLI on a Fashion-MNIST subset: train the quick classifier, score, evaluate, bad input."""
import json
import subprocess
import sys

import pytest
import torch

from oodbench import workflow
from oodbench.cli import main

FAST = ["--preset", "quick", "--set", "train.steps=80", "--set", "data.limit=3000"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    assert main(["train", "--method", "msp", "--in", "fashion_mnist", "--runs-dir", str(d), *FAST]) == 0
    return d


def test_eval_separates_noise_and_writes_json_csv(runs_dir, capsys):
    capsys.readouterr()
    methods = ("msp", "maxlogit", "energy", "odin", "mahalanobis", "knn")
    code = main(["eval", "--method", ",".join(methods), "--in", "fashion_mnist", "--runs-dir",
                 str(runs_dir), "--out", "noise:gaussian,digits", "--limit", "400", "--format", "json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["method"], r["out"]) for r in rows} == {(m, o) for m in methods for o in ("noise:gaussian", "digits")}
    for r in rows:
        assert set(r) >= {"method", "in", "out", "auroc", "aupr_in", "aupr_out", "fpr95", "detection_error"}
    auroc = {(r["method"], r["out"]): r["auroc"] for r in rows}
    # Feature-space baselines separate noise at once; softmax-based scores are famously overconfident on noise.
    assert auroc["knn", "noise:gaussian"] > 0.9 and auroc["mahalanobis", "noise:gaussian"] > 0.9, auroc
    assert auroc["knn", "digits"] > 0.8, auroc
    run = runs_dir / "classifier-fashion_mnist-s0"
    saved = json.loads((run / "metrics.json").read_text())
    assert len(saved) == 12 and (run / "metrics.csv").read_text().startswith("method,in,out,auroc")
    assert (run / "scores/msp" / f"{workflow.safe_name('noise:gaussian')}.npz").is_file()


def test_training_features_are_cached_in_the_run(runs_dir, monkeypatch):
    import numpy as np

    from oodbench import workflow
    from oodbench.detectors.posthoc import PostHoc
    from oodbench.workflow import fitting

    run = workflow.Run(runs_dir / "classifier-fashion_mnist-s0")
    calls = []
    real = PostHoc.outputs
    monkeypatch.setattr(PostHoc, "outputs", lambda self, x: calls.append(len(x)) or real(self, x))
    (run.path / "cache" / "train_outputs.npz").unlink(missing_ok=True)
    scoring = run.prepare("mahalanobis", device="cpu")          # fitting makes the reference pass once
    ref = fitting.reference(run, scoring.det, scoring.cfg)      # ... and the cache gives it back
    n = len(ref["labels"])
    assert sum(calls) == n == len(ref["features"]) == len(ref["logits"]) > 0
    assert (run.path / "cache" / "train_outputs.npz").is_file()
    calls.clear()
    other = workflow.Run(run.path)                                # another method, as a new process would
    vim = other.prepare("vim", device="cpu")
    again = fitting.reference(other, vim.det, vim.cfg)
    assert calls == [] and all(torch.equal(again[k], ref[k]) for k in ref)
    retrained = workflow.Run(run.path)
    assert retrained.cache.load_npz("train_outputs.npz", "not the key") is None
    retrained._tag = "another checkpoint"                         # the cache tag of another detector file
    knn = retrained.prepare("knn", device="cpu")
    assert sum(calls) == n                                                  # stale cache: recomputed
    assert np.isfinite(knn.det.score(retrained.load_set("digits", limit=8).images).numpy()).all()


def test_score_writes_scores_and_cache_is_reused(runs_dir, capsys):
    run = runs_dir / "classifier-fashion_mnist-s0"
    assert main(["score", "--run", str(run), "--data", "digits", "--method", "energy", "--limit", "100"]) == 0
    path = run / "scores/energy/digits.npz"
    stamp = path.stat().st_mtime_ns
    assert main(["score", "--run", str(run), "--data", "digits", "--method", "energy", "--limit", "100"]) == 0
    assert path.stat().st_mtime_ns == stamp  # cached: not rewritten
    assert main(["score", "--run", str(run), "--data", "digits", "--method", "energy", "--limit", "100",
                 "--set", "energy.temperature=2"]) == 0
    assert path.stat().st_mtime_ns != stamp  # scoring options changed: recomputed


def test_retraining_with_another_config_never_overwrites(runs_dir, capsys):
    run = runs_dir / "classifier-fashion_mnist-s0"
    before = (run / "detector.pt").read_bytes()
    code = main(["train", "--method", "msp", "--in", "fashion_mnist", "--runs-dir", str(runs_dir), *FAST,
                 "--set", "train.lr=0.5"])
    assert code == 2 and "different config" in capsys.readouterr().err
    assert (run / "detector.pt").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "mps", "--in", "fashion_mnist"], "Did you mean 'msp'"),
    (["train", "--method", "msp", "--in", "fashion_mnist", "--set", "train.stepz=3"], "Did you mean 'train.steps'"),
    (["eval", "--method", "msp", "--in", "cifar10", "--out", "svhn"], "no trained run"),
    (["train", "--method", "msp", "--in", "cifar10", "--data-root", "/nonexistent"], "/nonexistent/cifar-10"),
    (["train", "--method", "msp", "--in", "npz:/nonexistent.npz"], "nonexistent.npz"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    assert main([*args, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_nan_scores_and_train_settings_at_eval_are_errors(runs_dir, capsys, monkeypatch):
    run = runs_dir / "classifier-fashion_mnist-s0"
    before = (run / "metrics.json").read_bytes() if (run / "metrics.json").exists() else None
    from oodbench.detectors.classifier import MSP

    monkeypatch.setattr(MSP, "score_logits", lambda self, logits: torch.full((len(logits),), float("nan")))
    assert main(["eval", "--method", "msp", "--run", str(run), "--out", "digits", "--limit", "50"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("oodbench: error")]
    assert len(errors) == 1 and "NaN" in errors[0] and "Traceback" not in err
    after = (run / "metrics.json").read_bytes() if (run / "metrics.json").exists() else None
    assert after == before  # a failed evaluation leaves the saved metrics alone
    assert main(["eval", "--method", "msp", "--run", str(run), "--out", "digits", "--set", "train.lr=1"]) == 2
    assert "training setting" in capsys.readouterr().err


def test_module_entry_point_and_help():
    out = subprocess.run([sys.executable, "-m", "oodbench", "eval", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "examples:" in out.stdout and "--format" in out.stdout
    out = subprocess.run([sys.executable, "-m", "oodbench", "methods"], capture_output=True, text=True)
    assert out.returncode == 0 and "odin" in out.stdout and "[classifier]" in out.stdout


def test_data_commands(tmp_path, capsys):
    assert main(["data", "list", "--data-root", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "fashion_mnist" in listing and "cifar10        missing" in listing and "how to get" in listing
    assert main(["data", "make-resize-benchmark", "--src", "digits", "--size", "16", "--out", str(tmp_path / "rz")]) == 0
    assert main(["data", "check", f"folder:{tmp_path / 'rz' / 'lanczos'}"]) == 0
    assert "898 images of shape (1, 16, 16)" in capsys.readouterr().out
    # The output folder is never overwritten.
    assert main(["data", "make-resize-benchmark", "--src", "digits", "--out", str(tmp_path / "rz")]) == 2


def test_train_says_when_it_reused_a_run(runs_dir, capsys):
    capsys.readouterr()
    assert main(["train", "--method", "msp", "--in", "fashion_mnist", "--runs-dir", str(runs_dir), *FAST]) == 0
    assert capsys.readouterr().out.startswith("reused (already trained with this config): ")


def test_eval_names_every_missing_set(runs_dir, capsys):
    code = main(["eval", "--method", "msp", "--in", "fashion_mnist", "--runs-dir", str(runs_dir), "--out",
                 "digits,folder:/nonexistent/a,npz:/nonexistent/b.npz"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("oodbench: error")]
    assert code == 2 and len(errors) == 1
    err = errors[0]
    assert "2 dataset(s) not available" in err and "/nonexistent/a" in err and "/nonexistent/b.npz" in err


@pytest.mark.parametrize("extra, expected", [
    ([], "oodbench train --method msp --in cifar10 --runs-dir {runs} (the paper-scale config; add --preset quick"),
    (["--seed", "3", "--run-name", "quick", "--data-root", "/d"],
     "oodbench train --method msp --in cifar10 --seed 3 --run-name quick --preset quick --runs-dir {runs} "
     "--data-root /d"),
])
def test_missing_run_hint_echoes_the_options(extra, expected, tmp_path, capsys):
    runs = tmp_path / "my runs"
    assert main(["eval", "--method", "energy", "--in", "cifar10", "--out", "svhn", "--runs-dir", str(runs),
                 *extra]) == 2
    err = capsys.readouterr().err.replace("'", "")
    assert expected.format(runs=runs).replace("msp", "energy") in err


def test_data_check_of_a_missing_set_fails_and_list_names_the_root(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OODBENCH_DOWNLOAD", "0")
    assert main(["data", "check", "svhn", "--data-root", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "svhn [test]" in captured.out and f"svhn: the train and test splits are not available (data root " \
                                               f"{tmp_path})" in captured.err
    assert main(["data", "list", "--data-root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"data root: {tmp_path} ")


def subcommands():
    from oodbench.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, sub.choices


def test_every_option_is_described_and_every_example_parses():
    import shlex

    parser, commands = subcommands()
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        examples = (command.epilog or "").replace("\\\n", " ").splitlines()
        for line in (x.split("#")[0].strip() for x in examples if x.strip().startswith("oodbench ")):
            args = parser.parse_args(shlex.split(line)[1:])
            assert args.command == name, line
            for item in getattr(args, "overrides", []):     # eval/score examples set scoring options only
                if name != "train":
                    assert item.split(".")[0] not in ("seed", "data", "model", "train"), line
    for name in ("eval", "score"):
        help_text = commands[name].format_help()
        assert "train.steps=500" not in help_text.replace("as train.steps need", "")
    score_options = {o for a in commands["score"]._actions for o in a.option_strings}
    assert not {"--seed", "--run-name"} & score_options      # they did nothing with --run
    assert "ignored with --run" in commands["eval"].format_help()
    for name in ("bench", "data"):
        assert "OODBENCH_DATA" in commands[name].format_help()
    assert "shipped protocols: cifar10, cifar100, classic, fashion_mnist, imagenet, imagenet200, quick" in commands["bench"].format_help()
