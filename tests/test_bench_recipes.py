"""Bench `recipes:`: each recipe item is its own classifier run scored by the bench's classifier methods; the report
puts recipe × method in one table; bad items are one-line errors when the YAML is read."""
import csv
import json

import pytest

from oodbench import bench, protocols, workflow
from oodbench.bench.plan import run_job
from oodbench.errors import OODBenchError

HEAD = """
name: r
preset: quick
in: [fashion_mnist]
out: {near: [vflip:fashion_mnist], far: [noise:uniform]}
limit: 120
train_overrides: [data.limit=256, train.steps=3, train.batch_size=32]
"""


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + text)
    return path


def test_plan_expands_recipes_into_runs(tmp_path):
    b = bench.load_bench(write(tmp_path, """
recipes: [plain, logitnorm, {recipe: outlier_exposure, overrides: [outlier_exposure.outliers=glyphs]},
          {recipe: logitnorm, label: ln_t1, overrides: [logitnorm.temperature=1.0]}]
methods: [msp, {method: odin, label: odin_t1, overrides: [odin.temperature=1.0]}, amp]
"""))
    assert b.recipes == ["plain", "logitnorm", "outlier_exposure", "ln_t1"]
    assert [e.label for e in b.entries] == ["msp", "odin_t1", "logitnorm:msp", "logitnorm:odin_t1",
                                            "outlier_exposure:msp", "outlier_exposure:odin_t1", "ln_t1:msp",
                                            "ln_t1:odin_t1", "amp"]
    jobs = {e.label: run_job(b, e, "fashion_mnist", 0) for e in b.entries}
    assert jobs["msp"].run_name is None and "train.recipe=plain" not in jobs["msp"].overrides
    assert jobs["logitnorm:msp"].run_name == "logitnorm"
    assert jobs["logitnorm:msp"].overrides[-1] == "train.recipe=logitnorm"
    assert jobs["outlier_exposure:odin_t1"].overrides[-2:] == ("train.recipe=outlier_exposure",
                                                               "outlier_exposure.outliers=glyphs")
    assert jobs["ln_t1:msp"].run_name == "ln_t1" and "logitnorm.temperature=1.0" in jobs["ln_t1:msp"].overrides
    assert jobs["logitnorm:msp"] == jobs["logitnorm:odin_t1"]   # one run per recipe, shared by its methods
    assert len(b.run_jobs({})) == 5                              # 4 classifier runs + amp's
    rename = bench.renamer(next(e for e in b.entries if e.label == "logitnorm:odin_t1"))
    assert rename("odin") == "logitnorm:odin_t1"
    assert bench.renamer(b.entries[0])("msp") == "msp"
    assert b.settings()["recipes"] == b.recipes


def test_named_run_gets_the_recipe_suffix(tmp_path):
    b = bench.load_bench(write(tmp_path, "run_name: mine\nrecipes: [plain, t2fnorm]\nmethods: [msp]\n"))
    assert [run_job(b, e, "fashion_mnist", 0).run_name for e in b.entries] == ["mine", "mine-t2fnorm"]


@pytest.mark.parametrize("text, message", [
    ("recipes: [plain, logitnrom]", r"recipe logitnrom: unknown train.recipe 'logitnrom'\. Did you mean 'logitnorm'"),
    ("recipes: [outlier_exposure]", "needs auxiliary outliers: set outlier_exposure.outliers"),
    ("recipes: [{recipe: outlier_exposure, overrides: [outlier_exposure.outliers=nosuchset]}]", "nosuchset"),
    ("recipes: [{recipe: logitnorm, overrides: [logitnorm.temprature=1]}]", "temprature"),
    ("recipes: [{recipe: logitnorm, overrides: [odin.temperature=1]}]", "not a training option"),
    ("recipes: [logitnorm, logitnorm]", "lists logitnorm twice"),
    ("recipes: [{recipe: logitnorm, label: plain}]", "label plain"),
    ("recipes: [{recipe: logitnorm, lable: x}]", "unknown key 'lable'"),
    ("recipes: []", "recipes must be a list"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(OODBenchError, match=message) as info:
        bench.load_bench(write(tmp_path, text + "\nmethods: [msp]\n"))
    assert "\n" not in str(info.value)


def test_recipes_need_a_classifier_method_and_one_way(tmp_path):
    with pytest.raises(OODBenchError, match="needs at least one classifier method"):
        bench.load_bench(write(tmp_path, "recipes: [plain, logitnorm]\nmethods: [amp]\n"))
    with pytest.raises(OODBenchError, match="train.recipe is set in train_overrides"):
        bench.load_bench(write(tmp_path, "recipes: [plain]\nmethods: [{method: msp, overrides: "
                                         "[train.recipe=ish]}]\n"))


def test_shipped_recipes_protocol_plans():
    b = bench.load_bench("recipes")
    assert "recipes" in protocols.names()
    assert b.recipes[0] == "plain" and {"logitnorm", "outlier_exposure", "cider"} <= set(b.recipes)
    assert {e.base_label for e in b.entries} == {"msp", "energy", "knn", "scale"}
    jobs = b.run_jobs({})
    assert len(jobs) == len(b.recipes)
    assert sorted(j.run_name or "plain" for j in jobs) == sorted(b.recipes)
    assert b.outs == bench.load_bench("quick").outs


def test_shipped_recipes_protocol_optional_rows_plan(tmp_path):
    """Its commented rows (the slower offline recipes), uncommented, plan too: one run each."""
    text = protocols.bench_path("recipes").read_text()
    path = tmp_path / "all.yaml"
    path.write_text("\n".join(ln.replace("  # - ", "  - ", 1) if ln.startswith("  # - ") else ln
                              for ln in text.splitlines()) + "\n")
    b = bench.load_bench(path)
    assert {"pixmix", "mixoe", "npos", "vos", "augmix"} <= set(b.recipes)
    assert len(b.run_jobs({})) == len(b.recipes) > len(bench.load_bench("recipes").recipes)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet200"])
def test_gpu_protocols_recipe_rows_plan(tmp_path, name):
    """The commented `recipes:` block of each GPU protocol, uncommented, plans one run per recipe."""
    text = protocols.bench_path(name).read_text()
    assert "# recipes:" in text
    lines = [ln[2:] if ln.startswith(("# recipes:", "#   - ")) else ln for ln in text.splitlines()]
    lines = ["  - " + ln[6:] if ln.startswith("  # - {method:") else ln for ln in lines]
    path, outliers = tmp_path / f"{name}.yaml", tmp_path / "outliers"
    outliers.mkdir()
    text = "\n".join(lines) + "\n"
    assert "outliers=folder:data/" in text   # the user's outlier folder; a stand-in here
    path.write_text(text.replace("folder:data/tin597", f"folder:{outliers}")
                    .replace("folder:data/imagenet_1k_ood", f"folder:{outliers}"))
    b = bench.load_bench(path)
    assert len(b.recipes) >= 8 and "plain" in b.recipes
    kinds = [j for j in b.run_jobs({}) if j.kind == "classifier"]
    assert len(kinds) == len(b.recipes) * len(b.seeds)
    assert bench.load_bench(name).recipes == []   # off by default


def test_report_has_one_row_per_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("OODBENCH_PROGRESS", "0")
    config = write(tmp_path, "bootstrap: 0\nplots: false\nrecipes: [plain, logitnorm]\nmethods: [msp, knn]\n")
    report = bench.run_bench(config, runs_dir=tmp_path / "runs", device="cpu", out=tmp_path / "report")
    res = json.loads((report / "results.json").read_text())
    summary = {(r["method"], r["out"]): r for r in res["summary"]}
    rows = res["recipes"]
    assert [r["recipe"] for r in rows] == ["plain", "logitnorm"]
    for r in rows:
        prefix = "" if r["recipe"] == "plain" else "logitnorm:"
        for method in ("msp", "knn"):
            for col in ("near", "far"):
                assert r[f"{method} {col}"] == summary[(prefix + method, col)]["auroc"]
        assert r["id_accuracy"] == summary[(prefix + "msp", "near")]["id_accuracy"]
    assert (tmp_path / "runs" / "classifier-fashion_mnist-s0-logitnorm" / "detector.pt").is_file()
    # the run is the one `oodbench train --method logitnorm` makes with the same settings: reused, not retrained
    again = workflow.train("logitnorm", "fashion_mnist", "quick", ["data.limit=256", "train.steps=3",
                                                                   "train.batch_size=32"], 0, tmp_path / "runs")
    assert again.reused and again.path.name == "classifier-fashion_mnist-s0-logitnorm"
    with open(report / "recipes.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["recipe"] for t in table] == ["plain", "logitnorm"]
    assert float(table[1]["knn far"]) == pytest.approx(rows[1]["knn far"])
    text = (report / "report.md").read_text()
    assert "### Training recipes: AUROC (%)" in text
    assert "| recipe | ID acc | msp near / far | knn near / far |" in text
    r = rows[1]
    assert (f"| logitnorm | {100 * r['id_accuracy']:.2f} | {100 * r['msp near']:.2f} / {100 * r['msp far']:.2f} | "
            f"{100 * r['knn near']:.2f} / {100 * r['knn far']:.2f} |") in text
