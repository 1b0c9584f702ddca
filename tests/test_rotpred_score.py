"""The `rotpred` score: equal to OpenOOD v1.5's RotPredPostprocessor on a run of the rotpred recipe."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import oodbench
from oodbench import config as configs
from oodbench.cli import main
from oodbench.detectors.classifier import ClassifierTrainer
from oodbench.detectors.recipes import RotPred
from oodbench.detectors.rotation import RotPredScore, rotpred_score
from oodbench.engine import checkpoint
from oodbench.errors import OODBenchError
from oodbench.nets.classifiers import build_classifier

TINY = ["--in", "digits", "--preset", "quick", "--set", "data.limit=64", "--set", "train.batch_size=16",
        "--set", "model.width=8", "--set", "train.ckpt_every=100", "--device", "cpu"]


def openood_kl_div(d1, d2):
    """rotpred_postprocessor.py kl_div: sum over classes of d1 log2(d1 / d2) where d1 != 0."""
    dirty_logs = d1 * torch.log2(d1 / d2)
    return torch.sum(torch.where(d1 != 0, dirty_logs, torch.zeros_like(d1)), dim=1)


def openood_rotpred(net, data):
    """RotPredPostprocessor.postprocess on the normalised batch `data` (RotNet: fc and rot_fc on one feature); its
    score is higher for ID."""
    b = len(data)
    x_rot = torch.cat([data, torch.rot90(data, 1, [2, 3]), torch.rot90(data, 2, [2, 3]), torch.rot90(data, 3, [2, 3])])
    y_rot = torch.cat([torch.zeros(b), torch.ones(b), 2 * torch.ones(b), 3 * torch.ones(b)]).long()
    feature = net.features(x_rot)
    logits, logits_rot = net.head(feature)[:b], net.rot_head(feature)
    uniform = torch.ones_like(logits) / logits.shape[1]
    cls_loss = openood_kl_div(uniform, F.softmax(logits, dim=1))
    one_hot = torch.zeros_like(logits_rot).scatter_(1, y_rot.unsqueeze(1), 1)
    rot_loss = openood_kl_div(one_hot, F.softmax(logits_rot, dim=1))
    return cls_loss - sum(torch.chunk(rot_loss, 4, dim=0)) / 4.0


def rotpred_net(seed=0):
    torch.manual_seed(seed)
    return RotPred().adapt(build_classifier("small_cnn", 1, 5, width=8)).eval()


def test_score_equals_openood_rotpred_postprocessor():
    net = rotpred_net()
    model = oodbench.wrap(net, mean=[0.3], std=[0.2], head="head")
    x = torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8)
    with torch.no_grad():
        expected = -openood_rotpred(net, (x.float() / 255 - 0.3) / 0.2)
    scores = RotPredScore().fit(model).score(x)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_confident_correct_rotations_score_lower_than_uniform_outputs():
    """Defining property: uniform class and rotation outputs give KL 0 and rotation loss log2 4 = 2 (score 2); a
    confident class and correctly predicted rotations give a lower (more ID) score."""
    c = 10
    uniform = rotpred_score(torch.zeros(1, c), torch.zeros(1, 4, 4))
    assert float(uniform) == pytest.approx(2.0, abs=1e-6)
    confident = rotpred_score(torch.eye(c)[:1] * 20, torch.eye(4).unsqueeze(0) * 20)
    assert float(confident) < float(uniform) - 5
    # wrong rotations raise the score, everything else equal
    wrong = rotpred_score(torch.eye(c)[:1] * 20, torch.eye(4).roll(1, 0).unsqueeze(0) * 20)
    assert float(wrong) > float(confident) + 20 * 4 / (4 * math.log(2)) - 1


def test_a_model_without_the_rotation_head_is_a_one_line_error():
    model = oodbench.wrap(build_classifier("small_cnn", 1, 5, width=8), mean=[0.0], std=[1.0])
    with pytest.raises(OODBenchError, match="rotpred recipe"):
        RotPredScore().fit(model)


def test_cli_trains_rotpred_keeps_the_head_and_scores_it(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "--method", "rotpred", "--runs-dir", str(runs), *TINY, "--set", "train.steps=3"]) == 0
    run = runs / "classifier-digits-s0-rotpred"            # the recipe's name trains the recipe, in its own folder
    state = checkpoint.load(run / "detector.pt")
    assert "rot_head.weight" in state["net"] and state["net"]["rot_head.weight"].shape[0] == 4
    # a rotpred run saved before the head was kept still loads (without it)
    old = {**state, "net": {k: v for k, v in state["net"].items() if not k.startswith("rot_head.")}}
    trainer = ClassifierTrainer(configs.read_yaml(run / "config.yaml"), "cpu")
    trainer.load_state_dict(old)
    assert not hasattr(trainer.net, "rot_head")
    capsys.readouterr()
    assert main(["eval", "--method", "rotpred_score,msp", "--runs-dir", str(runs), "--in", "digits", "--run-name", "rotpred",
                 "--out", "noise:uniform", "--limit", "40", "--format", "json", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    rows = rows if isinstance(rows, list) else rows["rows"]
    methods = {r["method"] for r in rows}
    assert {"rotpred_score", "msp"} <= methods and all(0.0 <= r["auroc"] <= 1.0 for r in rows)
    # the plain classifier has no rotation head: a one-line error, exit 2
    assert main(["train", "--method", "msp", "--runs-dir", str(runs), *TINY, "--set", "train.steps=1"]) == 0
    assert main(["eval", "--method", "rotpred_score", "--runs-dir", str(runs), "--in", "digits", "--out", "noise:uniform",
                 "--limit", "20", "--device", "cpu"]) == 2
    assert "rotpred recipe" in capsys.readouterr().err
