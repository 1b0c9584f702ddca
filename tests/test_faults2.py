"""The second fault battery (issue 29): silent wrong results and lost files, hangs, tracebacks on the newer surfaces
(model specs, the Python API, data files, bench concurrency, a full disk, crafted files). Each test failed before
its fix. The cases and their outcomes are rows of docs/reliability.md."""
import json
import os
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from oodbench import data, locks
from oodbench import workflow
from oodbench.bench import cells as bench_cells
from oodbench.bench.plan import load_bench
from conftest import fails
from oodbench.cli import main
from oodbench.errors import OODBenchError
from oodbench.workflow import files


def png(path: Path, value=128, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)


# ------------------------------------------------------------------ silent wrong results, lost or misplaced files
def test_derived_file_names_are_injective():
    names = ["x y", "x_y", "x:y", "x/y", "noise:gaussian", "noise_gaussian", "..", "."]
    assert len({files.safe_name(n) for n in names}) == len(names)
    assert files.safe_name("fashion_mnist") == "fashion_mnist"            # a safe name stays as it is
    assert all("/" not in files.safe_name(n) and files.safe_name(n) not in (".", "..") for n in names)


def test_seeds_listed_twice_are_refused(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"in": ["digits"], "out": ["noise:gaussian"], "methods": ["msp"], "seeds": [0, 0]}))
    with pytest.raises(OODBenchError, match="twice"):
        load_bench(path)


@pytest.mark.parametrize("name", ["../../../x", "a/b", ".."])
def test_bench_name_cannot_leave_reports(tmp_path, name):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"in": ["digits"], "out": ["noise:gaussian"], "methods": ["msp"], "name": name}))
    with pytest.raises(OODBenchError, match="plain name"):
        load_bench(path)


def test_misspelt_kind_under_train_overrides_is_an_error(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"in": ["digits"], "out": ["noise:gaussian"], "methods": ["msp"],
                                    "train_overrides": {"clasifier": ["train.steps=2"]}}))
    with pytest.raises(OODBenchError, match="classifier"):
        load_bench(path)


def test_empty_runs_dir_is_refused(capsys):
    assert "--runs-dir" in fails(capsys, ["eval", "--method", "msp", "--in", "digits", "--out", "noise:gaussian",
                                          "--runs-dir", ""])


def test_cached_cell_record_changed_on_disk_is_recomputed(tmp_path):
    recorder = bench_cells.Recorder(tmp_path)
    material = {"method": "msp", "out": "x"}
    recorder.save(material, {"status": "ok", "rows": [{"auroc": 0.26}]})
    assert recorder.cached(material)["rows"][0]["auroc"] == 0.26
    path = next((tmp_path / "cells").glob("*.json"))
    path.write_text(path.read_text().replace("0.26", "0.76"))
    assert recorder.cached(material) is None


def test_score_file_changed_on_disk_is_recomputed(tmp_path, capsys):
    path = tmp_path / "s.npz"
    files.save_npz(path, {"key": np.array("k"), "msp": np.arange(4, dtype=np.float32)})
    assert files.read_npz(path, "key", "k")["msp"].tolist() == [0, 1, 2, 3]
    arrays = dict(np.load(path))
    arrays["msp"] = arrays["msp"] + 1            # valid npz, other numbers
    np.savez(path, **arrays)
    assert files.read_npz(path, "key", "k") is None
    assert "recomputing" in capsys.readouterr().err
    assert bench_cells.load_plot_scores(path) == {}      # the plot scores are verified the same way


def huge_header_npz(path: Path, key="images"):
    """An npz whose array header declares a 730 GiB uint8 array (the file itself is tiny)."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (730 * 2 ** 20, 1024, 1, 1)}
    buf = bytearray(b"\x93NUMPY\x01\x00")
    text = repr(header).encode()
    text += b" " * (63 - (len(buf) + 2 + len(text)) % 64) + b"\n"
    buf += len(text).to_bytes(2, "little") + text + b"\0" * 64
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{key}.npy", bytes(buf))


def test_score_cache_declaring_a_huge_array_is_recomputed(tmp_path, capsys):
    path = tmp_path / "s.npz"
    huge_header_npz(path, "msp")
    assert files.read_npz(path, "key", "k") is None
    assert "recomputing" in capsys.readouterr().err


def test_npz_declaring_a_huge_array_is_an_error(tmp_path, capsys):
    path = tmp_path / "big.npz"
    huge_header_npz(path)
    with pytest.raises(OODBenchError, match="memory"):
        data.load(f"npz:{path}")
    fails(capsys, ["data", "check", f"npz:{path}"])


@pytest.mark.parametrize("spec", ["noise:gaussian:100000000000", "classes:100000000000:digits"])
def test_huge_declared_sizes_are_one_line_errors(capsys, spec):
    fails(capsys, ["data", "check", spec])


def test_concurrent_metrics_merges_keep_every_row(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = type("R", (), {"path": run})()

    def merge(i):
        workflow.Run.update_metrics(holder, [{"method": "msp", "in": "digits", "out": f"set{i}", "auroc": 0.5}])

    threads = [threading.Thread(target=merge, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(json.loads((run / "metrics.json").read_text())) == 6


def test_symlink_loops_list_each_file_once(tmp_path):
    root = tmp_path / "imgs"
    for name in ("a.png", "sub/b.png", "sub/c.png"):
        png(root / name)
    os.symlink(root, root / "sub" / "loop1")
    os.symlink(root / "sub", root / "loop2")
    from oodbench.data import folders

    listed = folders.list_images(root)
    assert len(listed) == 3
    assert len(data.load(f"folder:{root}")) == 3


def test_fifo_in_a_folder_is_skipped_not_opened(tmp_path):
    root = tmp_path / "imgs"
    png(root / "a.png")
    os.mkfifo(root / "pipe.png")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("n", len(data.load(f"folder:{root}"))), daemon=True)
    t.start()
    t.join(20)
    assert result.get("n") == 1


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)).save(root / "a.png")
    images = data.load(f"folder:{root}").images
    assert images.flatten().tolist() == [0, 64, 128, 255]


# ------------------------------------------------------------------ hangs
def test_lock_with_undecodable_content_is_judged_stale(tmp_path):
    path = tmp_path / ".run.lock"
    path.write_bytes(b"\xff\xfe\x00garbage")
    old = time.time() - 2 * 3600
    os.utime(path, (old, old))
    done = threading.Event()

    def take():
        with locks.FileLock(path, poll_s=0.05):
            done.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(10)
    assert done.is_set()


def test_killed_waiters_file_is_removed(tmp_path):
    path = tmp_path / ".run.lock"
    left = tmp_path / f".run.lock.{'0' * 32}"
    dead = 2 ** 22 + 12345
    while locks.alive(dead):
        dead += 1
    left.write_text(f"{socket.gethostname()} {dead} abcd\n")
    old = time.time() - 10
    os.utime(left, (old, old))
    holder = locks.FileLock(path)
    holder.acquire()
    try:
        waiter = threading.Thread(target=lambda: locks.FileLock(path, poll_s=0.05).acquire(), daemon=True)
        waiter.start()
        deadline = time.time() + 10
        while left.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert not left.exists()
    finally:
        holder.release()
        waiter.join(10)


# ------------------------------------------------------------------ user code and what models return
PAIR_MODULE = """
import torch.nn as nn


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return y, y


def pair():
    return Pair()
"""


@pytest.mark.parametrize("spec, reason", [("python:sys:exit", "called sys.exit"),
                                          ("python:os:system", "raised TypeError")])
def test_a_factory_that_exits_or_raises_is_a_one_line_error(capsys, tmp_path, spec, reason):
    line = fails(capsys, ["eval", "--model", spec, "--in", "digits", "--out", "noise:gaussian", "--method", "msp",
                          "--limit", "20", "--runs-dir", str(tmp_path / "runs")])
    assert reason in line and not (tmp_path / "runs").exists()


def test_a_model_that_returns_a_tuple_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    import oodbench

    (tmp_path / "pairmod.py").write_text(PAIR_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    line = fails(capsys, ["eval", "--model", "python:pairmod:pair", "--in", "digits", "--out", "noise:gaussian",
                          "--method", "msp", "--limit", "20", "--runs-dir", str(tmp_path / "runs"),
                          "--set", "model.mean=0.5", "--set", "model.std=0.5"])
    assert "returns a tuple" in line
    import pairmod
    with pytest.raises(OODBenchError, match="returns a tuple"):
        oodbench.wrap(pairmod.pair(), mean=0.5, std=0.5).logits(torch_zeros())


def torch_zeros():
    import torch
    return torch.zeros(2, 1, 8, 8, dtype=torch.uint8)


def test_scalar_mean_is_every_channel_and_a_bad_mean_is_an_error():
    import oodbench
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    model = oodbench.wrap(net, mean=0.5, std=[0.2, 0.3, 0.4])
    assert model.mean == [0.5, 0.5, 0.5] and model.std == [0.2, 0.3, 0.4]
    with pytest.raises(OODBenchError, match="mean must be a number or a list of numbers"):
        oodbench.wrap(net, mean="abc", std=0.5)


def test_torchscript_models_score_logit_methods(tmp_path, capsys):
    import torch

    path = tmp_path / "net.pt"
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    torch.jit.trace(net, torch.zeros(1, 1, 8, 8)).save(str(path))
    assert main(["eval", "--model", f"torchscript:{path}", "--in", "digits", "--out", "noise:gaussian", "--method",
                 "msp,maxlogit", "--limit", "30", "--runs-dir", str(tmp_path / "runs"), "--format", "json",
                 "--set", "model.mean=0.5", "--set", "model.std=0.5"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows} == {"msp", "maxlogit"}


def test_a_weights_file_with_code_is_refused_without_torchs_advice(tmp_path, capsys):
    import torch

    path = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": Path("x")}, path)     # a pickled object beyond tensors
    line = fails(capsys, ["eval", "--model", f"python:torchvision.models:resnet18:{path}", "--in", "digits",
                          "--out", "noise:gaussian", "--method", "msp", "--runs-dir", str(tmp_path / "runs")])
    assert "weights_only=False" not in line and "never unpickles" in line



def test_bench_out_of_the_users_own_files_is_refused(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("report.md", "results.csv", "errors.log"):
        (out / name).write_text("the user's own\n")
    line = fails(capsys, ["bench", "quick", "--out", str(out)])
    assert "not an oodbench report folder" in line
    assert all((out / n).read_text() == "the user's own\n" for n in ("report.md", "results.csv", "errors.log"))
    (tmp_path / "file").write_text("x")
    assert "is a file" in fails(capsys, ["bench", "quick", "--out", str(tmp_path / "file")])


# ------------------------------------------------------------------ the CLI's own errors, OS errors, links, warnings
TINY_TRAIN = ["train", "--method", "msp", "--in", "digits", "--preset", "quick", "--set", "train.steps=4",
              "--set", "data.limit=64", "--set", "train.batch_size=16", "--set", "model.width=8",
              "--set", "train.ckpt_every=2", "--device", "cpu"]


@pytest.mark.parametrize("args, message", [(["methods", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
                                           (["train", "--seed", "abc"], "invalid int value: 'abc'"),
                                           (["nosuchcommand"], "invalid choice: 'nosuchcommand'")])
def test_argparse_errors_are_one_line(capsys, args, message):
    line = fails(capsys, args)
    assert message in line and "--help" in line
    assert main(["--help"]) == 0


def test_a_huge_seed_is_a_one_line_error(capsys, tmp_path):
    line = fails(capsys, [*TINY_TRAIN, "--seed", "100000000000000000000", "--runs-dir", str(tmp_path / "runs")])
    assert "--seed must be a whole number from 0 to 2147483647" in line and not (tmp_path / "runs").exists()
    line = fails(capsys, ["eval", "--method", "msp", "--in", "digits", "--out", "noise:gaussian",
                          "--seed", str(2 ** 40), "--runs-dir", str(tmp_path / "runs")])
    assert "--seed must be" in line


def test_a_huge_seed_in_a_bench_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({"name": "b", "in": ["digits"], "out": ["noise:gaussian"], "seeds": [0, 2 ** 40],
                                   "methods": ["msp"]}))
    with pytest.raises(OODBenchError, match="seeds must be a whole number"):
        load_bench(cfg)


def test_a_full_disk_while_checkpointing_is_one_line_and_resume_finishes(capsys, tmp_path, monkeypatch):
    import errno

    import torch

    from oodbench.engine import checkpoint

    runs = tmp_path / "runs"
    real_save = torch.save
    calls = []

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:      # the first checkpoint is written, the second finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_fill_the_disk)
    line = fails(capsys, [*TINY_TRAIN, "--runs-dir", str(runs)])
    assert "no space left on the device" in line and "--resume" in line
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main([*TINY_TRAIN, "--runs-dir", str(runs), "--resume"]) == 0


def test_a_read_only_runs_folder_still_prints_cached_results(capsys, tmp_path, monkeypatch):
    import errno

    from oodbench.workflow import runs as run_folders

    args = ["eval", "--model", "torchvision:resnet18:none", "--in", "digits", "--out", "noise:gaussian", "--method",
            "msp", "--limit", "20", "--fit-limit", "40", "--runs-dir", str(tmp_path / "runs"), "--format", "json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "runs"))

    monkeypatch.setattr(run_folders, "merge_metrics", read_only)
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == first
    assert captured.err.strip().splitlines() == [
        f"oodbench: warning: results not saved: cannot write ({tmp_path / 'runs'}): Read-only file system; choose a "
        f"folder you can write to (--runs-dir, --out) or fix its permissions"]


def test_a_log_that_links_out_of_the_run_is_never_appended_to(capsys, tmp_path):
    runs = tmp_path / "runs"
    assert main([*TINY_TRAIN, "--runs-dir", str(runs)]) == 0
    outside = tmp_path / "outside.txt"
    outside.write_text("mine\n")
    log = runs / "classifier-digits-s0" / "log.jsonl"
    log.unlink()
    log.symlink_to(outside)
    line = fails(capsys, [*TINY_TRAIN, "--runs-dir", str(runs), "--resume", "--set", "train.steps=6"])
    assert "is a symbolic link" in line and outside.read_text() == "mine\n"


def test_a_one_channel_set_on_a_model_normalising_three_channels_is_an_error(capsys, tmp_path):
    import torch

    path = tmp_path / "net.pt"
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    torch.jit.trace(net, torch.zeros(1, 1, 8, 8)).save(str(path))
    line = fails(capsys, ["eval", "--model", f"torchscript:{path}", "--in", "digits", "--out", "noise:gaussian",
                          "--method", "msp", "--runs-dir", str(tmp_path / "runs")])
    assert "normalises 3 channels" in line and "model.mean" in line


@pytest.mark.parametrize("value", ["abc", "[1, x]"])
def test_a_bad_model_mean_on_the_cli_is_one_line(capsys, tmp_path, value):
    line = fails(capsys, ["eval", "--model", "torchvision:resnet18:none", "--in", "digits", "--out", "noise:gaussian",
                          "--method", "msp", "--runs-dir", str(tmp_path / "runs"), "--set", f"model.mean={value}"])
    assert "mean must be a number or a list of numbers" in line


def test_an_evaluator_without_in_distribution_data_says_what_to_give():
    import oodbench
    import torch

    ev = oodbench.Evaluator(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), in_dataset=None)
    with pytest.raises(OODBenchError, match="give the in-distribution test images"):
        ev.evaluate("noise:gaussian")


@pytest.mark.parametrize("flag", ["--out", "--runs-dir"])
def test_out_or_runs_dir_naming_an_existing_file_is_one_line(capsys, tmp_path, flag):
    existing = tmp_path / "file.txt"
    existing.write_text("mine\n")
    args = {"--out": ["data", "make-resize-benchmark", "--src", "digits", "--out", str(existing)],
            "--runs-dir": ["eval", "--model", "torchvision:resnet18:none", "--in", "digits", "--out",
                           "noise:gaussian", "--method", "msp", "--runs-dir", str(existing)]}[flag]
    line = fails(capsys, args)
    assert "is a file" in line and existing.read_text() == "mine\n"


def test_a_bench_from_python_refuses_a_folder_of_the_users_files(tmp_path):
    from oodbench import bench

    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("the user's own\n")
    with pytest.raises(OODBenchError, match="not an oodbench report folder"):
        bench.run_bench("quick", out=out)
    assert (out / "report.md").read_text() == "the user's own\n"


def test_python_warnings_are_one_line(capsys):
    import warnings

    from oodbench import cli

    cli._one_line_warning(UserWarning("first line\nsecond line"), UserWarning, "x.py", 1)
    assert capsys.readouterr().err == "oodbench: warning: first line\n"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["methods"]) == 0      # the CLI's handler leaves the caller's warning settings as they were
    assert warnings.showwarning is not cli._one_line_warning


def test_lpips_weights_with_code_are_refused_without_torchs_advice(tmp_path):
    import torch

    from oodbench.detectors.ddpm import load_lpips

    path = tmp_path / "lin.pth"
    torch.save({"lin0.model.1.weight": torch.zeros(1), "extra": Path("x")}, path)
    with pytest.raises(OODBenchError, match="never unpickles") as e:
        load_lpips({"alexnet_weights": str(path), "lpips_weights": str(path)})
    assert "weights_only=False" not in str(e.value)
