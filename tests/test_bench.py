"""`oodbench bench`: report numbers equal `workflow.evaluate` on the same runs; failing cells are reported and the rest
completes; missing data is skipped; re-running reuses the cell cache and the runs' score caches."""
import json

import numpy as np
import pytest

from oodbench import bench, protocols
from oodbench import workflow as runs
from oodbench.detectors import REGISTRY, get
from oodbench.errors import OODBenchError
from oodbench.metrics import METRIC_NAMES

SEEDS = (0, 1)
OUTS = ("vflip:fashion_mnist", "noise:uniform")
LIMIT = 120
BOOT = 20
GRID = f"""
name: tiny
preset: quick
seeds: [{SEEDS[0]}, {SEEDS[1]}]
in: [fashion_mnist]
out:
  near: [{OUTS[0]}]
  far: [{OUTS[1]}, folder:/nonexistent/ood_images]
limit: {LIMIT}
bootstrap: {BOOT}
train_overrides: [data.limit=256, train.steps=3, train.batch_size=32]
methods:
  - msp
  - energy
  - boom
  - not_a_method
"""


def boom_class():
    """A registered classifier method whose scoring always raises."""
    msp = get("msp")

    class Boom(msp):
        def score_logits(self, logits):   # post-hoc methods score through score_set -> score_outputs
            raise RuntimeError("boom: scoring exploded")

    Boom.name = "boom"
    return Boom


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    config = folder / "tiny.yaml"
    config.write_text(GRID)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(REGISTRY, "boom", boom_class())
        mp.setenv("OODBENCH_PROGRESS", "0")
        report = bench.run_bench(config, runs_dir=folder / "runs", device="cpu", out=folder / "report")
        yield {"config": config, "runs": folder / "runs", "report": report, "mp": mp, "first": results(report),
               "first_report": (report / "report.md").read_text()}


def results(report):
    return json.loads((report / "results.json").read_text())


def test_report_equals_runs_evaluate(grid):
    res = results(grid["report"])
    per_seed = {(r["method"], r["out"], r["seed"]): r for r in res["per_seed"]}
    summary = {(r["method"], r["out"]): r for r in res["summary"]}
    expected = {}
    for seed in SEEDS:
        run, _ = runs.find_run("msp", "fashion_mnist", seed, grid["runs"])
        for row in runs.evaluate(run, ["msp", "energy"], OUTS, limit=LIMIT, device="cpu", bootstrap=BOOT):
            got = per_seed[(row["method"], row["out"], seed)]
            for key in ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood", "detection_error", "auroc_ci"):
                assert got[key] == pytest.approx(row[key], abs=1e-12), (row["method"], row["out"], seed, key)
            expected.setdefault((row["method"], row["out"]), []).append(row)
    assert set(expected) == {(m, o) for m in ("msp", "energy") for o in OUTS}
    for key, rows in expected.items():
        values = np.array([r["auroc"] for r in rows])
        assert summary[key]["auroc"] == pytest.approx(values.mean(), abs=1e-12)
        assert summary[key]["auroc_std"] == pytest.approx(values.std(), abs=1e-12)
        assert summary[key]["seeds"] == list(SEEDS)
    # group columns are plain means of the per-set metrics (far: only noise:uniform is on disk)
    for method in ("msp", "energy"):
        assert summary[(method, "near")]["auroc"] == pytest.approx(summary[(method, OUTS[0])]["auroc"])
        assert summary[(method, "far")]["fpr95"] == pytest.approx(summary[(method, OUTS[1])]["fpr95"])
        assert summary[(method, "far")]["sets"] == [OUTS[1]]
    text = (grid["report"] / "report.md").read_text()
    msp = summary[("msp", OUTS[0])]
    assert f"{100 * msp['auroc']:.2f} ± {100 * msp['auroc_std']:.2f}" in text


def test_failing_cells_are_reported_and_the_rest_completes(grid):
    res = results(grid["report"])
    failed = {(f["method"], f["out"]): f for f in res["failed"]}
    assert set(failed) == {(m, o) for m in ("boom", "not_a_method") for o in OUTS}
    assert "boom: scoring exploded" in failed[("boom", OUTS[0])]["error"]
    assert "unknown method 'not_a_method'" in failed[("not_a_method", OUTS[1])]["error"]
    assert failed[("boom", OUTS[0])]["seeds"] == list(SEEDS)
    assert [s["dataset"] for s in res["skipped"]] == ["folder:/nonexistent/ood_images"]
    assert {r["method"] for r in res["per_seed"]} == {"msp", "energy"}
    assert len(res["per_seed"]) == 2 * len(OUTS) * len(SEEDS)
    text = (grid["report"] / "report.md").read_text()
    assert "| boom | failed [" in text and "scoring exploded" in text
    assert "folder:/nonexistent/ood_images" in text and "skipped" in text
    csv = (grid["report"] / "results.csv").read_text()
    assert "failed,not_a_method" in csv


def test_plots_written(grid):
    names = {p.name for p in (grid["report"] / "plots").glob("*.png")}
    assert "heatmap_auroc_fashion_mnist.png" in names
    assert {f"roc_fashion_mnist_vs_{runs.safe_name(o)}.png" for o in OUTS} <= names
    assert {"hist_fashion_mnist_msp.png", "hist_fashion_mnist_energy.png"} <= names


def test_rerun_reuses_cells_and_score_caches(grid, monkeypatch):
    report = grid["report"]
    before = results(report)
    detector_files = sorted(grid["runs"].glob("*/detector.pt"))
    mtimes = [p.stat().st_mtime_ns for p in detector_files]
    calls = []

    def no_scoring(self, logits):
        calls.append(type(self).__name__)
        raise AssertionError("scored again although the scores are cached")

    for name in ("msp", "energy"):
        monkeypatch.setattr(get(name), "score_logits", no_scoring)
    monkeypatch.setitem(REGISTRY, "boom", boom_class())
    monkeypatch.setenv("OODBENCH_PROGRESS", "0")
    kw = dict(runs_dir=grid["runs"], device="cpu", out=report)
    bench.run_bench(grid["config"], **kw)           # every finished cell comes from <report>/cells
    assert results(report)["summary"] == before["summary"]
    for cell in (report / "cells").glob("*.json"):  # without the cell cache, the runs' score files serve
        cell.unlink()
    bench.run_bench(grid["config"], **kw)
    assert results(report)["summary"] == before["summary"]
    assert not [c for c in calls if c != "Boom"]
    assert [p.stat().st_mtime_ns for p in detector_files] == mtimes  # nothing retrained
    assert len(detector_files) == len(SEEDS)


def test_bench_config_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("in: [fashion_mnist]\nout: [digits]\nmethods: [msp]\nseed: [0]\n")
    with pytest.raises(OODBenchError, match="unknown key 'seed'.*'seeds'"):
        bench.load_bench(path)
    path.write_text("in: [fashion_mnist]\nout: [digits]\nmethods: [msp, {method: msp}]\n")
    with pytest.raises(OODBenchError, match="listed twice"):
        bench.load_bench(path)
    path.write_text("in: [fashion_mnist]\nout: [digits]\nmethods: [{method: odin, label: odin_t1, "
                    "overrides: [odin.temperature=1.0, train.steps=5]}]\n")
    entry = bench.load_bench(path).entries[0]
    assert (entry.score_overrides, entry.train_overrides) == (["odin.temperature=1.0"], ["train.steps=5"])
    assert bench.renamer(entry)("odin") == "odin_t1"


def test_changed_scoring_options_of_a_run_make_its_cells_stale(grid, monkeypatch, tmp_path):
    """A cell is reused only while the method's effective options are the same (e.g. a changed config default)."""
    import shutil

    report = tmp_path / "report"
    shutil.copytree(grid["report"], report)
    real_config = runs.Run.scoring_config

    def hotter(self, overrides=()):
        cfg = real_config(self, overrides)
        cfg["energy"]["temperature"] = 3.0
        return cfg

    monkeypatch.setattr(runs.Run, "scoring_config", hotter)
    scored = []
    for name in ("msp", "energy"):
        real_rows = get(name).score_logits
        monkeypatch.setattr(get(name), "score_logits",
                            lambda self, x, f=real_rows: scored.append(self.name) or f(self, x))
    monkeypatch.setitem(REGISTRY, "boom", boom_class())
    monkeypatch.setenv("OODBENCH_PROGRESS", "0")
    bench.run_bench(grid["config"], runs_dir=grid["runs"], device="cpu", out=report)
    assert "energy" in scored and "msp" not in scored


def test_report_says_what_came_from_cache(grid, monkeypatch, tmp_path):
    import shutil

    first = grid["first"]["timing"]
    assert first["runs_trained"] == len(SEEDS) and first["runs_reused"] == 0
    assert first["cells_computed"] == 2 * len(OUTS) * len(SEEDS) and first["cells_cached"] == 0
    assert {"stage: check data", "stage: train", "stage: score", "train: classifier on fashion_mnist, seed 0",
            "score: msp on fashion_mnist, seed 1"} <= set(first["parts"])
    assert "2 run(s) trained, 0 reused; 8 cell(s) computed, 0 from cache" in grid["first_report"]
    report = tmp_path / "report"
    shutil.copytree(grid["report"], report)
    monkeypatch.setitem(REGISTRY, "boom", boom_class())
    bench.run_bench(grid["config"], runs_dir=grid["runs"], device="cpu", out=report)
    again = results(report)["timing"]
    assert (again["runs_trained"], again["runs_reused"], again["cells_computed"]) == (0, len(SEEDS), 0)
    assert again["cells_cached"] == first["cells_computed"]
    assert "(everything from cache" in (report / "report.md").read_text()


def test_shipped_protocols_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = bench.load_bench("quick")
    assert quick.path == protocols.PROTOCOLS / "quick.yaml" and quick.path.is_file() and quick.name == "quick"
    assert {"quick", "cifar10", "cifar100", "classic", "fashion_mnist"} <= set(protocols.names())
    (tmp_path / "quick").mkdir()                          # a folder is not a config: the name still wins
    assert bench.load_bench("quick").path == quick.path
    (tmp_path / "mine.yaml").write_text("in: [fashion_mnist]\nout: [digits]\nmethods: [msp]\n")
    assert bench.load_bench("mine.yaml").name == "mine"   # a path works as before
    with pytest.raises(OODBenchError, match="not a shipped protocol .*quick.*oodbench bench quick"):
        bench.load_bench("quik")
    with pytest.raises(OODBenchError, match="no such file"):
        bench.load_bench("configs/bench/quick.yaml")      # the old in-repository path, from elsewhere


def test_configs_are_package_data():
    """Every YAML under oodbench/configs is matched by pyproject's package-data (so a wheel has it)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import oodbench

    root = Path(oodbench.__file__).parent
    project = tomllib.loads((root.parent / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["oodbench"]
    files = [p.relative_to(root).as_posix() for p in (root / "configs").rglob("*") if p.is_file()]
    assert "configs/bench/quick.yaml" in files and "configs/classifier.yaml" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []


def cell(method, out, auroc, notes=None):
    row = {"method": method, "in": "fashion_mnist", "out": out, **{m: auroc for m in METRIC_NAMES}}
    return {"status": "ok", "rows": [row], "notes": notes or {}}


def test_caveats_are_noted_beside_their_rows(tmp_path):
    path = tmp_path / "notes.yaml"
    path.write_text("in: [fashion_mnist]\nout: [vflip:fashion_mnist, noise:uniform]\nmethods: [gradlayer, llr]\n")
    b = bench.load_bench(path)
    layer = {"gradlayer": ["layer body.8 (chosen on validation vs glyphs)"]}
    cells = {("gradlayer", "fashion_mnist", 0, "vflip:fashion_mnist"): cell("gradlayer", "vflip:fashion_mnist", 0.8,
                                                                          layer),
             ("gradlayer", "fashion_mnist", 0, "noise:uniform"): cell("gradlayer", "noise:uniform", 0.9, layer),
             ("llr", "fashion_mnist", 0, "vflip:fashion_mnist"): cell("llr", "vflip:fashion_mnist", 0.6),
             ("llr", "fashion_mnist", 0, "noise:uniform"): cell("llr", "noise:uniform", 0.026)}
    summary = bench.summarise(b, cells)["summary"]
    notes = bench.report_notes(b, cells, summary)
    assert sorted(notes, key=lambda n: n["method"]) == [
        {"method": "gradlayer", "in": "fashion_mnist", "note": "layer body.8 (chosen on validation vs glyphs)"},
        {"method": "llr", "in": "fashion_mnist", "note": "below chance on noise:uniform 2.6"}]
    took = {"seconds": 60, "runs_trained": 1, "runs_reused": 0, "cells_computed": 4, "cells_cached": 0}
    text = bench.markdown_report(b, summary, [], [], "none", took, "cpu", tmp_path, notes)
    assert "| method | vflip:fashion_mnist | noise:uniform | note |" in text
    assert "| gradlayer | 80.00 | 90.00 | layer body.8 (chosen on validation vs glyphs) |" in text
    assert "| llr | 60.00 | 2.60 | below chance on noise:uniform 2.6 |" in text
    assert "- A note `below chance on SET AUROC` marks a row that ranks that OOD set as more in-distribution" in text


def test_row_notes_name_the_gradlayer_layer_and_ddpm_without_lpips():
    from oodbench.config import load_config
    from oodbench.detectors import get

    gradlayer = get("gradlayer")(val_ood="glyphs")
    gradlayer.layer_ = "fc"
    assert gradlayer.row_notes({}) == {"gradlayer": ["layer fc (chosen on validation vs glyphs)"]}
    named = get("gradlayer")(layer="fc")
    named.layer_ = "fc"
    assert named.row_notes({}) == {"gradlayer": ["layer fc (gradlayer.layer)"]}
    a = np.arange(4.0)
    mse_only = {"ddpm-mse": a, "_mse": a, "_t": a}

    def ddpm(**options):
        cfg = load_config("ddpm")
        cfg["ddpm"].update(options)
        return get("ddpm")(cfg, "cpu")

    assert list(ddpm(metrics="auto").row_notes(mse_only)) == ["ddpm-mse"]
    assert "LPIPS" in ddpm().row_notes(mse_only)["ddpm-mse"][0]
    assert ddpm().row_notes({**mse_only, "ddpm-mse+lpips": a, "_lpips": a}) == {}
    assert ddpm(metrics=["mse"]).row_notes(mse_only) == {}   # asked for MSE only: no caveat


def test_plots_tell_curves_apart_and_show_the_full_auroc_range(tmp_path, monkeypatch):
    from oodbench import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    rng = np.random.default_rng(0)
    curves = {f"m{i}": (rng.normal(size=50), rng.normal(1, size=50)) for i in range(22)}
    plots.roc_curves(curves, "roc", tmp_path / "roc.png")
    lines = [ln for ln in figures[0].axes[0].get_lines() if not ln.get_label().startswith("_")]   # not the diagonal
    assert len(lines) == len({(tuple(ln.get_color()), ln.get_linestyle()) for ln in lines}) == 22
    plots.auroc_heatmap([[19.0, 50.0], [90.0, np.nan]], ["a", "b"], ["x", "y"], "heat", tmp_path / "h.png")
    image = figures[1].axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == (0, 100)
    cmap = image.get_cmap()
    assert np.allclose(cmap(image.norm(50.0))[:3], cmap(0.5)[:3]) and cmap(image.norm(19.0)) != cmap(image.norm(50.0))
