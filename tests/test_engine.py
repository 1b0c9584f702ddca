"""Training engine: exact resume, checkpoint safety, schedules, best-validation weights."""
import json

import pytest
import torch
import torch.nn as nn

from oodbench.data.imageset import ImageSet
from oodbench.engine import Engine, TrainSpec
from oodbench.engine import checkpoint as ckpt
from oodbench.errors import OODBenchError


def toy_set(n=96):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    return ImageSet(x, (x.float().mean((1, 2, 3)) > 127).long(), "toy")


def loss_fn(model, batch):
    x, y = batch
    x = x.float().flatten(1) / 255 + 0.05 * torch.randn(x.shape[0], 16)  # uses the global RNG on purpose
    return nn.functional.cross_entropy(model(x), y)


def new_model():
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))


SPEC = dict(steps=30, batch_size=16, ckpt_every=10, log_every=5, lr=0.05, optimizer="sgd", schedule="multistep",
            milestones=[12, 25], ema=0.9, max_to_keep=5)


def test_interrupted_run_resumed_ends_where_uninterrupted_ends(tmp_path):
    full = Engine(tmp_path / "a", "cpu", seed=3).fit("m", new_model(), loss_fn, toy_set(), TrainSpec(**SPEC))

    # Interrupt after step 20 by training a shorter spec, then drop `final.pt` as a crash would have.
    part = TrainSpec(**{**SPEC, "steps": 30})
    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return loss_fn(model, batch)

    with pytest.raises(KeyboardInterrupt):
        Engine(tmp_path / "b", "cpu", seed=3).fit("m", new_model(), crashing_loss, toy_set(), part)
    assert [s for s, _ in ckpt.step_checkpoints(tmp_path / "b/checkpoints/m")] == [10, 20]
    with pytest.raises(OODBenchError, match="--resume"):
        Engine(tmp_path / "b", "cpu", seed=3).fit("m", new_model(), loss_fn, toy_set(), part)
    resumed = Engine(tmp_path / "b", "cpu", seed=3, resume=True).fit("m", new_model(), loss_fn, toy_set(), part)
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)


def test_finished_network_is_loaded_not_retrained(tmp_path):
    spec = TrainSpec(**SPEC)
    first = Engine(tmp_path, "cpu", seed=0).fit("m", new_model(), loss_fn, toy_set(), spec)

    def never(model, batch):
        raise AssertionError("retrained")

    again = Engine(tmp_path, "cpu", seed=0).fit("m", new_model(), never, toy_set(), spec)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), again.parameters()))


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(tmp_path):
    Engine(tmp_path, "cpu").fit("m", new_model(), loss_fn, toy_set(), TrainSpec(**SPEC))
    final = tmp_path / "checkpoints/m/final.pt"
    data = final.read_bytes()
    final.write_bytes(data[: len(data) // 2])
    with pytest.raises(OODBenchError, match="corrupt, truncated"):
        Engine(tmp_path, "cpu").fit("m", new_model(), loss_fn, toy_set(), TrainSpec(**SPEC))
    final.write_bytes(b"not a checkpoint at all")
    with pytest.raises(OODBenchError, match="corrupt, truncated"):
        ckpt.load(final)


def test_checkpoints_refuse_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": print}, path)  # a function can only come back through unpickling code
    with pytest.raises(OODBenchError):
        ckpt.load(path)


def test_best_validation_weights_are_returned(tmp_path):
    values = iter([3.0, 1.0, 2.0])
    seen = []

    def val_fn(model):
        seen.append([p.detach().clone() for p in model.parameters()])
        return next(values)

    spec = TrainSpec(**{**SPEC, "ema": 0.0, "eval_every": 10})
    out = Engine(tmp_path, "cpu").fit("m", new_model(), loss_fn, toy_set(), spec, val_fn=val_fn)
    assert all(torch.equal(p, q) for p, q in zip(out.parameters(), seen[1]))
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in logged if "val_loss" in r] == [3.0, 1.0, 2.0]


def test_schedules():
    s = TrainSpec(steps=100, lr=1.0, schedule="multistep", milestones=[10, 20], gamma=0.1)
    assert [s.lr_factor(i) for i in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    c = TrainSpec(steps=100, schedule="cosine")
    assert c.lr_factor(0) == pytest.approx(1) and c.lr_factor(50) == pytest.approx(0.5)
    e = TrainSpec(schedule="exponential", gamma=0.5)
    assert e.lr_factor(3) == pytest.approx(0.125)
    with pytest.raises(OODBenchError, match="train.optimizer"):
        TrainSpec.from_cfg({"optimizer": "lbfgs"})


def test_nan_loss_stops_with_advice(tmp_path):
    def nan_loss(model, batch):
        return loss_fn(model, batch) * float("nan")

    with pytest.raises(OODBenchError, match="lower train.lr"):
        Engine(tmp_path, "cpu").fit("m", new_model(), nan_loss, toy_set(), TrainSpec(**SPEC))
