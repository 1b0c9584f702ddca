"""--tune: the options chosen are the grid point with the best validation AUROC, found with one pass of the model
over the validation sets, never on test data; recorded by eval and by the bench."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from oodbench import metrics, workflow
from oodbench.data import ImageSet
from oodbench.detectors.posthoc import SET_OUTPUTS, PostHoc
from oodbench.workflow import fitting, tuning
from oodbench.errors import OODBenchError
from oodbench.models import wrap
from test_posthoc import SmallNet, images

FIXTURES = Path(__file__).parent / "fixtures"


class Data:
    """ID train/val splits and a validation OOD set; `load` stands for reading a set's training split."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.train = ImageSet(images(300, 1), torch.randint(0, 5, (300,), generator=g), "train")
        self.val = ImageSet(images(120, 2), torch.randint(0, 5, (120,), generator=g), "val")
        self.ood = ImageSet(255 - images(120, 4), None, "ood")
        self.loaded = []

    def load(self, spec, like):
        self.loaded.append(spec)
        return self.ood


@pytest.fixture
def tuned(monkeypatch):
    """detector(name, *overrides, in_name=...) -> (run, scoring, data): the method prepared on an in-memory run
    whose validation OOD sets come from Data.load."""
    made = []
    monkeypatch.setattr(fitting, "train_split_loader", lambda cfg, device: made[-1].load)

    def detector(name, *overrides, in_name="id", hook=None):
        torch.manual_seed(0)
        SET_OUTPUTS.items.clear()   # the same seeded model in another test would reuse its outputs
        made.append(Data())
        model = wrap(SmallNet(), mean=[0.5] * 3, std=[0.25] * 3)
        run = workflow.ModelRun(model, None, fit=made[-1].train, val=made[-1].val, runs_dir=False,
                                id_test=ImageSet(images(40, 9), None, in_name))
        if hook is not None:   # after the one blank forward that checks the model takes the images
            model.net.register_forward_hook(hook)
        return run, run.prepare(name, ["tune.val_ood=some_val_ood", "tune.val_size=100", *overrides], "cpu"), \
            made[-1]

    return detector


@pytest.mark.parametrize("name", ["react", "gen", "knn", "vim"])
def test_tune_picks_the_best_validation_auroc_with_one_model_pass(tuned, name):
    calls = []
    run, scoring, data = tuned(name, hook=lambda _m, inputs, _out: calls.append(len(inputs[0])))
    det = scoring.det
    chosen = tuning.tune(run, scoring)
    assert data.loaded == ["some_val_ood"]                           # the OOD set's *train* split
    # the fit's pass over the training split, then once over each validation set for every grid point
    assert sum(calls) == 2 * 100 + (0 if det.fit_on is None else len(data.train))
    brute = {}
    for point in __import__("itertools").product(*det.sweep().values()):
        _, other, _ = tuned(name, *[f"{name}.{k}={v}" for k, v in zip(det.sweep(), point)])
        try:
            brute[point] = metrics.evaluate(other.det.score(data.val.images[:100]).numpy(),
                                            other.det.score(data.ood.images[:100]).numpy())["auroc"]
        except OODBenchError:
            continue
    best = max(brute.values())
    first_best = next(p for p, v in brute.items() if v == best)
    assert chosen == {f"{name}.{k}": v for k, v in zip(det.sweep(), first_best)}
    assert all(det.options[k] == v for k, v in zip(det.sweep(), first_best))


def test_tune_without_a_grid_changes_nothing(tuned):
    run, scoring, data = tuned("entropy")
    assert tuning.tune(run, scoring) == {} and data.loaded == []


@pytest.fixture
def run(tmp_path):
    folder = tmp_path / "classifier-fashion_mnist-s0"
    shutil.copytree(FIXTURES / "tiny_run", folder)
    return folder


def test_eval_tune_prints_records_and_caches_the_choice(run, capsys, monkeypatch):
    from oodbench.cli import main

    args = ["eval", "--run", str(run), "--method", "react,dice,entropy", "--out", "noise:gaussian", "--limit", "60",
            "--tune", "--set", "tune.val_size=60", "--set", "tune.val_ood=digits"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tuned on validation data: react.percentile=" in out and "dice.p=90" in out
    rows = json.loads((run / "metrics.json").read_text())
    react = next(r for r in rows if r["method"] == "react")
    assert set(react["tuned"]) == {"react.percentile"}
    assert next(r for r in rows if r["method"] == "entropy")["tuned"] == {}      # no grid: nothing chosen
    assert "tuned" in (run / "metrics.csv").read_text().splitlines()[0]
    calls = []
    real = PostHoc.outputs
    monkeypatch.setattr(PostHoc, "outputs", lambda self, x: calls.append(len(x)) or real(self, x))
    assert main(args) == 0                                                 # the choice and the scores are cached
    assert calls == [] and capsys.readouterr().out.count("react.percentile=" + str(react["tuned"]["react.percentile"]))


def test_bench_tune_records_the_choice_in_results_and_report(tmp_path):
    from oodbench import bench

    config = tmp_path / "grid.yaml"
    config.write_text(f"""name: tuned
report: {tmp_path / 'report'}
in: fashion_mnist
out: [noise:gaussian]
limit: 60
plots: false
methods:
  - {{method: react, model: "torchvision:resnet18:none", fit_limit: 100, tune: true,
     overrides: [tune.val_size=40, tune.val_ood=digits]}}
  - {{method: energy, model: "torchvision:resnet18:none", fit_limit: 100}}
""")
    folder = bench.run_bench(config, runs_dir=tmp_path / "runs", device="cpu")
    results = json.loads((folder / "results.json").read_text())
    react = next(r for r in results["summary"] if r["entry"] == "react")
    assert set(react["tuned"]) == {"react.percentile"} and react["tuned"]["react.percentile"] in (85, 90, 95, 99)
    assert "tuned" not in next(r for r in results["summary"] if r["entry"] == "energy")
    assert f"react.percentile={react['tuned']['react.percentile']}" in (folder / "report.md").read_text()
    assert "tuned" in (folder / "results.csv").read_text().splitlines()[0]
    with pytest.raises(OODBenchError, match="tune must be true or false"):
        config.write_text(config.read_text().replace("tune: true", "tune: 3"))
        bench.load_bench(config)


def test_tune_grid_replaces_the_shipped_values_and_is_checked(tuned):
    run, scoring, _ = tuned("react", "tune.grid={react.percentile: [50, 99], gen.gamma: [3]}")
    assert tuning.tune(run, scoring)["react.percentile"] in (50, 99)
    run, scoring, _ = tuned("react", "tune.grid={react.percentile: 90}")
    with pytest.raises(OODBenchError, match="non-empty list"):
        tuning.tune(run, scoring)


def test_tune_grid_from_the_command_line_in_either_form(tuned):
    for item in ("tune.grid={react.percentile: [50, 99]}", "tune.grid.react.percentile=[50,99]"):
        run, scoring, _ = tuned("react", item)
        assert tuning.tune(run, scoring)["react.percentile"] in (50, 99)


def test_a_validation_ood_set_derived_from_the_in_distribution_set_comes_from_its_validation_split(tuned):
    run, scoring, data = tuned("react", "tune.val_ood=vflip:fashion_mnist", in_name="fashion_mnist")
    chosen = tuning.tune(run, scoring)
    assert data.loaded == [] and set(chosen) == {"react.percentile"}    # built from the val split, nothing loaded
    run, scoring, data = tuned("react", "tune.val_ood=classes:0,1:fashion_mnist", in_name="fashion_mnist")
    with pytest.raises(OODBenchError, match="test split is never used for selection"):
        tuning.tune(run, scoring)
