"""Fault injection: bad input is a one-line error (exit 2, no traceback) found before any work or write; corrupt
artifacts are recovered or refused clearly; a crash at any write point leaves the previous good state readable.
The cases and their outcomes are the table in docs/reliability.md."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oodbench import config as configs
from oodbench import workflow as runs
from conftest import fails
from oodbench.cli import main
from oodbench.engine import Engine, TrainSpec
from oodbench.engine import checkpoint as ckpt
from oodbench.errors import OODBenchError

TINY = ["--preset", "quick", "--set", "train.steps=4", "--set", "data.limit=64", "--set", "train.batch_size=16",
        "--set", "model.width=8", "--set", "train.ckpt_every=2", "--device", "cpu"]
REPO = Path(__file__).resolve().parent.parent


def train_args(runs_dir, *extra):
    return ["train", "--method", "msp", "--in", "digits", "--runs-dir", str(runs_dir), *TINY, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny finished classifier run on `digits` (a few seconds); tests copy it before damaging it."""
    d = tmp_path_factory.mktemp("runs")
    assert main(train_args(d)) == 0
    return d / "classifier-digits-s0"


@pytest.fixture
def run_copy(trained, tmp_path):
    dst = tmp_path / "runs" / trained.name
    shutil.copytree(trained, dst)
    return dst


def eval_args(run, *extra):
    return ["eval", "--method", "msp", "--run", str(run), "--out", "noise:gaussian", "--limit", "40",
            "--device", "cpu", *extra]


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("extra, message", [
    (["--set", "train.lr=[1,"], "not a valid YAML value"),
    (["--set", "train.lr=!!python/object/apply:os.system ['echo pwned']"], "YAML tags"),
    (["--device", "gpu0"], "--device gpu0"),
    (["--set", "data.limit=-3"], "data.limit must be a positive"),
    (["--set", "data.limit=0"], "data.limit must be a positive"),
    (["--set", "train.steps=-5"], "train.steps"),
    (["--set", "train.batch_size=0"], "train.batch_size"),
    (["--set", "train.optimizer=lbfgs"], "train.optimizer"),
    (["--set", "oe.outliers=nosuchset"], "oe.outliers: unknown dataset 'nosuchset'"),
])
def test_bad_training_input_is_one_line_and_writes_nothing(extra, message, tmp_path, capsys):
    assert message in fails(capsys, train_args(tmp_path / "runs", *extra))
    assert not (tmp_path / "runs").exists()


def test_unlabelled_folder_as_in_writes_nothing_and_the_fixed_command_runs(tmp_path, capsys):
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    rd = tmp_path / "runs"
    args = ["train", "--method", "msp", "--runs-dir", str(rd), *TINY]
    assert "no labels" in fails(capsys, [*args, "--in", f"folder:{tmp_path}"])
    assert not rd.exists()
    assert "train.steps" in fails(capsys, [*args, "--in", "digits", "--set", "train.steps=-5"])
    assert main([*args, "--in", "digits"]) == 0     # not refused as "a different config"


@pytest.mark.parametrize("extra, message", [
    (["--limit", "-5"], "--limit must be a positive"),
    (["--limit", "0"], "--limit must be a positive"),
    (["--out", ""], "--out ''"),
    (["--out", ","], "--out ','"),
    (["--out", "digits,,noise:uniform"], "none empty"),
    (["--out", "digits,nosuchset"], "unknown dataset 'nosuchset'"),
    (["--out", "folder:/nonexistent/images"], "/nonexistent/images does not exist"),
    (["--out", "resize:bogus:digits"], "unknown resize method"),
    (["--bootstrap", "-1"], "--bootstrap"),
    (["--method", "msp,llr"], "'llr' runs"),
    (["--method", "msp,nosuch"], "unknown method 'nosuch'"),
    (["--set", "train.lr=1"], "training setting"),
    (["--set", "oe.weight=2"], "training setting"),
    (["--set", "energy.temperature=[1,"], "not a valid YAML value"),
    (["--device", "cuda:x"], "--device"),
    (["--tune", "--set", "tune.val_ood=nosuchset"], "tune.val_ood: unknown dataset 'nosuchset'"),
    (["--method", "gradlayer", "--set", "gradlayer.val_ood=resize:bogus:digits"], "gradlayer.val_ood: unknown resize"),
])
def test_bad_eval_input_fails_before_anything_is_scored(trained, extra, message, capsys, monkeypatch):
    scored = []
    real = runs.Run.score
    monkeypatch.setattr(runs.Run, "score", lambda self, scoring, spec, *a, **k: scored.append(spec) or
                        real(self, scoring, spec, *a, **k))
    args = eval_args(trained)
    for flag in ("--out", "--method"):   # a later flag replaces the default one
        if flag in extra:
            i = args.index(flag)
            del args[i:i + 2]
    assert message in fails(capsys, [*args, *extra])
    assert scored == []


def test_bad_score_input_fails_before_anything_is_scored(trained, capsys):
    base = ["score", "--run", str(trained), "--device", "cpu", "--method", "msp"]
    assert "--limit" in fails(capsys, [*base, "--data", "digits", "--limit", "-1"])
    assert "unknown dataset" in fails(capsys, [*base, "--data", "digits,nosuchset"])
    assert "none empty" in fails(capsys, [*base, "--data", ","])


def test_every_option_has_one_phase_and_training_options_are_refused_at_eval(tmp_path):
    from oodbench import detectors

    # a kind's own training keys come from its trainers (detectors.is_training), the shared sections from config
    assert detectors.is_training("llr", "llr.reg_weights") and detectors.is_training("classifier", "oe.outliers")
    assert configs.is_training_option("llr.reg_weights", detectors.training_keys("llr"))
    assert not configs.is_training_option("llr.reg_weights")
    assert configs.is_training_option("train.lr") and not detectors.is_training("classifier", "energy.temperature")
    assert not detectors.is_training("classifier", "trainer")
    assert not detectors.is_training("classifier", "gradlayer.val_ood")
    run_dir = tmp_path / "llr-digits-s0"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(configs.dump(configs.load_config("llr")))
    run = runs.Run(run_dir)
    for item in ("llr.reg_weights=[1]", "llr.mutation_rates=[0.5]", "model.num_filters=8"):
        with pytest.raises(OODBenchError, match="training setting"):
            run.scoring_config([item])
    ddpm_dir = tmp_path / "ddpm-digits-s0"
    ddpm_dir.mkdir()
    (ddpm_dir / "config.yaml").write_text(configs.dump(configs.load_config("ddpm")))
    ddpm = runs.Run(ddpm_dir)
    assert ddpm.scoring_config(["ddpm.sampler=ddim"])["ddpm"]["sampler"] == "ddim"
    with pytest.raises(OODBenchError, match="training setting"):
        ddpm.scoring_config(["ddpm.first_n_val=3"])


# ------------------------------------------------------------------------------------------------ run files
def test_config_without_data_and_corrupt_meta_are_one_line_and_train_repairs_meta(run_copy, capsys):
    meta = run_copy / "meta.json"
    good = json.loads(meta.read_text())
    for text in (meta.read_text()[:20], "[1, 2]"):
        meta.write_text(text)
        assert "meta.json is corrupt" in fails(capsys, eval_args(run_copy))
    assert main(train_args(run_copy.parent.parent / "runs")) == 0     # the same command rewrites it
    assert "refitting" in capsys.readouterr().err
    assert json.loads(meta.read_text()) == good
    cfg = run_copy / "config.yaml"
    cfg.write_text("\n".join(line for line in cfg.read_text().splitlines() if not line.startswith("data:")
                             and not line.startswith("  ")) + "\n")
    assert "has no data.in" in fails(capsys, eval_args(run_copy))


def garble(path: Path, offset_fraction=0.5, n=4096):
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_fraction)
    data[at:at + n] = np.random.default_rng(0).integers(0, 256, min(n, len(data) - at), dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_garbled_detector_is_refused_and_train_refits_a_truncated_one(run_copy, capsys):
    det = run_copy / "detector.pt"
    good = ckpt.load(det)
    garble(det)
    assert "detector.pt is corrupt or truncated" in fails(capsys, ["score", "--run", str(run_copy), "--data",
                                                                     "digits", "--device", "cpu"])
    assert not (run_copy / "scores").exists()
    det.write_bytes(det.read_bytes()[:1000])
    capsys.readouterr()
    assert main(train_args(run_copy.parent.parent / "runs")) == 0
    assert "refitting the detector" in capsys.readouterr().err
    again = ckpt.load(det)       # rebuilt from the run's final checkpoint: the same weights
    assert all(torch.equal(a, b) for a, b in zip(good["net"].values(), again["net"].values()))


def test_train_reports_success_only_for_a_detector_file_that_loads(tmp_path, capsys, monkeypatch):
    real = ckpt.save_atomic

    def truncating(obj, path):
        real(obj, path)
        if Path(path).name == "detector.pt":
            Path(path).write_bytes(Path(path).read_bytes()[:500])   # e.g. a full disk or a faulty file system

    monkeypatch.setattr(ckpt, "save_atomic", truncating)
    assert "detector.pt is corrupt" in fails(capsys, train_args(tmp_path / "runs")).replace("checkpoint ", "")
    assert "trained:" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "garbled", "keyless"])
def test_unreadable_score_cache_is_recomputed_with_one_warning(run_copy, damage, capsys):
    assert main(["score", "--run", str(run_copy), "--data", "digits", "--method", "energy", "--limit", "40"]) == 0
    path = run_copy / "scores/energy/digits.npz"
    with np.load(path) as f:
        want = f["energy"].copy()
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbled":
        garble(path, 0.3, 16)
    else:
        np.savez(path, energy=want)
    capsys.readouterr()
    assert main(["score", "--run", str(run_copy), "--data", "digits", "--method", "energy", "--limit", "40"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "recomputing" in warnings[0], warnings
    with np.load(path) as f:
        assert np.array_equal(f["energy"], want) and "_cache_key" in f.files


def test_truncated_metrics_file_still_prints_results_and_is_rewritten(run_copy, capsys):
    assert main(eval_args(run_copy, "--format", "json")) == 0
    first = json.loads(capsys.readouterr().out)
    metrics = run_copy / "metrics.json"
    metrics.write_text(metrics.read_text()[:30])
    assert main(eval_args(run_copy, "--format", "json")) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == first and "metrics.json is unreadable" in out.err
    assert json.loads(metrics.read_text()) == first


def test_nan_scores_are_never_saved_or_reported(run_copy, capsys, monkeypatch):
    from oodbench.detectors.classifier import Energy

    monkeypatch.setattr(Energy, "score_logits", lambda self, logits: torch.full((len(logits),), float("nan")))
    line = fails(capsys, ["score", "--run", str(run_copy), "--data", "digits", "--method", "energy", "--limit", "20"])
    assert "NaN" in line and not (run_copy / "scores/energy/digits.npz").exists()


# ------------------------------------------------------------------------------------------------ checkpoints
def toy():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (64, 1, 4, 4), generator=g, dtype=torch.uint8)
    from oodbench.data.imageset import ImageSet

    return ImageSet(x, (x.float().mean((1, 2, 3)) > 127).long(), "toy")


def toy_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x.float().flatten(1) / 255 + 0.05 * torch.randn(len(x), 16)), y)


def toy_model():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


SPEC = dict(steps=12, batch_size=16, ckpt_every=3, log_every=3, lr=0.05, optimizer="sgd", max_to_keep=5)


def interrupted(folder, after=9):
    """Train toy steps 1..`after` then crash (as kill -9 would: no final.pt); returns the checkpoint folder."""
    calls = {"n": 0}

    def crash(model, batch):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt
        return toy_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        Engine(folder, "cpu", seed=2).fit("m", toy_model(), crash, toy(), TrainSpec(**SPEC))
    return folder / "checkpoints" / "m"


@pytest.mark.parametrize("damage", ["empty", "garbled", "truncated"])
def test_resume_skips_a_corrupt_newest_checkpoint_and_ends_where_an_uninterrupted_run_ends(tmp_path, damage,
                                                                                          capsys):
    full = Engine(tmp_path / "a", "cpu", seed=2).fit("m", toy_model(), toy_loss, toy(), TrainSpec(**SPEC))
    folder = interrupted(tmp_path / "b")
    newest = ckpt.step_checkpoints(folder)[-1][1]
    assert newest.name == "step_00000009.pt"
    if damage == "empty":
        newest.write_bytes(b"")
    elif damage == "garbled":
        garble(newest, 0.4, 64)
    else:
        newest.write_bytes(newest.read_bytes()[:-100])
    with pytest.raises(OODBenchError, match="corrupt, truncated"):
        ckpt.load(newest)
    capsys.readouterr()
    resumed = Engine(tmp_path / "b", "cpu", seed=2, resume=True).fit("m", toy_model(), toy_loss, toy(),
                                                                     TrainSpec(**SPEC))
    err = capsys.readouterr().err
    assert "step_00000009.pt is corrupt" in err and "resuming from the one before it" in err
    assert all(torch.equal(p, q) for p, q in zip(full.state_dict().values(), resumed.state_dict().values()))
    log = [json.loads(line) for line in (tmp_path / "b/log.jsonl").read_text().splitlines()]
    assert [r["resumed_from"] for r in log if "resumed_from" in r] == [6]


def test_resume_with_every_checkpoint_corrupt_is_a_clear_error(tmp_path):
    folder = interrupted(tmp_path, after=4)
    for _, p in ckpt.step_checkpoints(folder):
        p.write_bytes(b"\0" * 100)
    with pytest.raises(OODBenchError, match="every checkpoint"):
        Engine(tmp_path, "cpu", seed=2, resume=True).fit("m", toy_model(), toy_loss, toy(), TrainSpec(**SPEC))


def test_random_bytes_in_a_checkpoint_are_detected_and_old_files_still_load(tmp_path):
    path = tmp_path / "c.pt"
    state = {"w": torch.arange(20000, dtype=torch.float32), "step": 3}
    ckpt.save_atomic(state, path)
    assert ckpt.load(path)["step"] == 3
    garble(path, 0.5, 4096)   # inside the tensor data: torch.load itself would not notice
    with pytest.raises(OODBenchError, match="digest mismatch"):
        ckpt.load(path)
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy)  # a checkpoint written before digests: a bare zip
    assert torch.equal(ckpt.load(legacy)["w"], state["w"])
    legacy.write_bytes(b"junk" + legacy.read_bytes())
    with pytest.raises(OODBenchError, match="corrupt"):
        ckpt.load(legacy)


# ------------------------------------------------------------------------------------------------ write points
WRITERS = {
    "checkpoint": lambda path, v: ckpt.save_atomic({"v": torch.tensor(v)}, path),
    "detector": lambda path, v: ckpt.save_atomic({"net": {"w": torch.full((3,), float(v))}}, path),
    "score cache": lambda path, v: runs.save_npz(path, {"s": np.full(3, v), "_cache_key": np.array("k")}),
    "metrics": lambda path, v: runs.write_atomic(path, json.dumps([{"method": "m", "in": "a", "out": "b", "v": v}])),
    "report": lambda path, v: runs.write_atomic(path, f"# report {v}\n"),
}
READERS = {
    "checkpoint": lambda path: int(ckpt.load(path)["v"]),
    "detector": lambda path: int(ckpt.load(path)["net"]["w"][0]),
    "score cache": lambda path: int(runs.read_npz(path, "_cache_key", "k")["s"][0]),
    "metrics": lambda path: runs.read_metrics(path)[0]["v"],
    "report": lambda path: int(path.read_text().split()[-1]),
}
NAMES = {"checkpoint": "step_00000002.pt", "detector": "detector.pt", "score cache": "digits.npz",
         "metrics": "metrics.json", "report": "report.md"}


@pytest.mark.parametrize("point", list(WRITERS))
def test_a_crash_at_a_write_point_leaves_the_previous_file_readable(point, tmp_path, monkeypatch):
    path = tmp_path / NAMES[point]
    WRITERS[point](path, 1)

    def crash(fd):
        raise KeyboardInterrupt   # interrupted between writing the data and making it durable

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        WRITERS[point](path, 2)
    monkeypatch.undo()
    assert READERS[point](path) == 1 and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_killed_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    path = tmp_path / "step_00000002.pt"
    ckpt.save_atomic({"v": 1}, path)
    script = ("import os, sys; from oodbench.engine import checkpoint as c; os.fsync = lambda fd: os._exit(9); "
              "c.save_atomic({'v': 2}, sys.argv[1])")
    killed = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == 9
    temporaries = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temporaries) == 1 and ckpt.load(path)["v"] == 1
    ckpt.save_atomic({"v": 3}, tmp_path / "step_00000003.pt")
    assert temporaries[0].exists()                        # within the grace period: perhaps a live writer elsewhere
    live = tmp_path / f".other.pt.{ckpt._HOST}-{os.getpid()}.abcd1234.tmp"   # a writer still at work: kept
    live.write_bytes(b"partial")
    for p in (live, temporaries[0]):
        os.utime(p, (p.stat().st_mtime - 2 * ckpt.GRACE_S,) * 2)
    ckpt.save_atomic({"v": 4}, tmp_path / "step_00000004.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, path.name, "step_00000003.pt",
                                                                 "step_00000004.pt"])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        runs.write_atomic(tmp_path / "a.json", "{}")
        ckpt.save_atomic({}, tmp_path / "b.pt")
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.json": mode, "b.pt": mode, "plain": mode}


def test_resumed_training_removes_the_temporaries_of_a_killed_process_throughout_the_run(run_copy, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (run_copy / "detector.pt").unlink()
    (run_copy / "checkpoints/classifier/final.pt").unlink()   # killed before the end of training
    left = [run_copy / f"checkpoints/classifier/.step_00000006.pt.{ckpt._HOST}-{pid}.k9k9k9k9.tmp",
            run_copy / f"scores/msp/.digits.npz.{ckpt._HOST}-{pid}.k9k9k9k9.tmp"]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
        os.utime(p, (p.stat().st_mtime - 2 * ckpt.GRACE_S,) * 2)
    assert main(train_args(run_copy.parent.parent / "runs", "--resume")) == 0
    assert not any(p.exists() for p in left) and ckpt.load(run_copy / "detector.pt")


def test_damaged_bench_cells_and_plot_scores_are_recomputed_not_raised(tmp_path):
    from oodbench import bench

    recorder = bench.Recorder(tmp_path)
    material = {"cell": 1}
    recorder.save(material, {"auroc": 0.5})
    assert recorder.cached(material)["auroc"] == 0.5
    path = tmp_path / "cells" / f"{recorder.key(material)}.json"
    for text in ('{"auroc": 0.', "[1, 2]"):
        path.write_text(text)
        assert recorder.cached(material) is None
    scores = tmp_path / "s.npz"
    runs.save_npz(scores, {"msp": np.arange(3.0)})
    assert list(bench.load_plot_scores(scores)) == ["msp"]
    scores.write_bytes(scores.read_bytes()[:40])
    assert bench.load_plot_scores(scores) == {}


def test_device_strings_are_checked(monkeypatch):
    from oodbench.engine import resolve_device

    for bad, message in (("gpu0", "not a device"), ("meta", "auto, cpu, cuda"), ("cuda", "no CUDA GPU")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(OODBenchError, match=message):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(OODBenchError, match="only 2 CUDA GPU"):
        resolve_device("cuda:2")


def test_a_plot_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import numpy as np

    from oodbench import plots

    path = tmp_path / "hist.png"
    plots.score_histograms(np.arange(50.0), {"ood": np.arange(50.0) + 3}, "t", path)
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.figure

    def broken(self, f, **kw):
        f.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plots.score_histograms(np.arange(50.0), {"ood": np.arange(50.0)}, "t", path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["hist.png"]


def test_log_lines_are_whole_json_lines(tmp_path):
    import json

    from oodbench.engine.loop import Engine

    engine = Engine.__new__(Engine)
    engine.is_main, engine._begin, engine.run_dir = True, None, tmp_path
    for i in range(3):
        engine.log({"step": i, "loss": 0.5})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
