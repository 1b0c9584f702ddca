"""Progress: plain lines (stage, item, done/total, elapsed, ETA) when stderr is not a terminal, bars or nothing on
request; the training loop and the bench stages report through it."""
import pytest
from tqdm import tqdm

from oodbench import progress


@pytest.fixture
def fake_clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    monkeypatch.delenv("OODBENCH_PROGRESS", raising=False)
    return now


def test_lines_in_a_log_every_interval_with_eta_and_a_final_line(fake_clock, capsys):
    assert progress.mode() == "lines"          # pytest's captured stderr is not a terminal
    bar = progress.bar(total=10, desc="train llr", unit="step", initial=2)
    bar.set_postfix(loss="1.5")
    fake_clock[0] += 10
    bar.update(2)                              # 10 s: no line yet
    assert capsys.readouterr().err == ""
    fake_clock[0] += progress.LINE_EVERY_S
    bar.update(2)                              # 40 s for 4 steps since the start: 4 left take 40 s
    line = capsys.readouterr().err
    assert line == "oodbench: train llr: 6/10 step (60%) [loss=1.5], elapsed 40s, ETA 40s\n"
    fake_clock[0] += 100
    bar.update(4)
    bar.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("elapsed 2m20s, ETA 0s") and err[1].endswith("10/10 step (100%) [loss=1.5], "
                                                                           "elapsed 2m20s, done")
    bar.close()
    assert capsys.readouterr().err == ""


def test_a_short_stage_prints_nothing_and_iterating_counts(fake_clock, capsys):
    seen = []
    for item in progress.bar(["a", "b"], desc="bench: check data", unit="set"):
        seen.append(item)
    assert seen == ["a", "b"] and capsys.readouterr().err == ""
    bar = progress.bar(range(3), desc="bench: train", unit="run")
    assert bar.total == 3
    for _ in bar:
        bar.set_postfix_str("classifier on fashion_mnist, seed 0")
        fake_clock[0] += 31
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("oodbench: bench: train: 1/3 run (33%) [classifier on fashion_mnist, seed 0], elapsed 31s, "
                      "ETA 1m02s")
    assert len(err) == 4 and err[-1].endswith("3/3 run (100%) [classifier on fashion_mnist, seed 0], elapsed "
                                              "1m33s, done")


def test_environment_switch_and_disabled_bars(monkeypatch):
    monkeypatch.setenv("OODBENCH_PROGRESS", "1")
    shown = progress.bar(total=3)
    assert isinstance(shown, tqdm) and not shown.disable
    shown.close()
    monkeypatch.setenv("OODBENCH_PROGRESS", "0")
    assert progress.bar(total=3).disable
    monkeypatch.delenv("OODBENCH_PROGRESS")
    assert progress.bar(total=3, enabled=False).disable     # e.g. non-main ranks
    assert [progress.duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_training_reports_through_progress(fake_clock, capsys, tmp_path):
    import torch

    from oodbench.engine import Engine
    from oodbench.engine.spec import TrainSpec

    net = torch.nn.Linear(2, 1)
    batch = (torch.zeros(4, 2),)

    def loss(model, b):
        fake_clock[0] += 20          # each step "takes" 20 s
        return model(b[0]).pow(2).mean()

    spec = TrainSpec(steps=3, batch_size=4, lr=0.1, log_every=1, ckpt_every=100)
    Engine(tmp_path / "run", "cpu", 0).fit("tiny", net, loss, lambda step: batch, spec)
    err = capsys.readouterr().err
    assert "oodbench: train tiny: 2/3 step (67%)" in err and "ETA 20s" in err and "3/3 step (100%)" in err
