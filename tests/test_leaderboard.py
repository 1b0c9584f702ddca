"""The OpenOOD v1.5 leaderboard numbers, the report's leaderboard table and the openood.csv export, on recorded
results (no network is run)."""
from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from oodbench import leaderboard
from oodbench.bench.report import leaderboard_lines, openood_rows
from oodbench.detectors import REGISTRY

MIRROR = Path("/work/.mirror/zjysteven+OpenOOD/repo")
FILES = {"cifar10": "cifar10.csv", "cifar100": "cifar100.csv", "imagenet200": "imagenet200_ood.csv",
         "imagenet": "imagenet1k_ood.csv"}


def test_every_leaderboard_method_is_an_oodbench_method():
    assert {m for _, m in leaderboard.LEADERBOARD} <= set(REGISTRY)
    assert set(leaderboard.OPENOOD_NAMES) <= set(REGISTRY)
    assert {b for b, _ in leaderboard.LEADERBOARD} == set(leaderboard.LEADERBOARD_MODELS)


@pytest.mark.skipif(not MIRROR.is_dir(), reason="needs a local clone of zjysteven/OpenOOD")
def test_numbers_are_the_leaderboard_csv_at_the_cited_commit():
    for bench, name in FILES.items():
        text = subprocess.run(["git", "-C", str(MIRROR), "show", f"{leaderboard.LEADERBOARD_COMMIT}:results/{name}"],
                              capture_output=True, text=True, check=True).stdout
        arch = leaderboard.LEADERBOARD_MODELS[bench][1]
        theirs = {}
        for r in csv.DictReader(io.StringIO(text)):
            if r["Training"] == "CrossEntropy" and r["Arch"] == arch:
                theirs.setdefault(r["Postprocessor"], (r["Near-OOD_AUROC"], r["Far-OOD_AUROC"], r["ID_Accuracy"]))
        for (b, method), row in leaderboard.LEADERBOARD.items():
            if b == bench:
                assert theirs[leaderboard.OPENOOD_NAMES[method]] == row, (bench, method)


def recorded(near, far, model):
    """A recorded bench: entries msp (the leaderboard's model) and energy (another model), 3 seeds."""
    bench = SimpleNamespace(entries=[SimpleNamespace(label="msp", model=model),
                                     SimpleNamespace(label="energy", model="torchvision:resnet18:none")],
                            groups={"near": ["cifar100", "tinyimagenet"], "far": ["svhn"]})
    per_seed, summary = [], []
    for label in ("msp", "energy"):
        for group, values in (("near", near), ("far", far)):
            for seed, v in enumerate(values):
                per_seed.append({"entry": label, "method": label, "in": "cifar10", "out": group, "group": True,
                                 "seed": seed, "auroc": v})
            summary.append({"entry": label, "method": label, "in": "cifar10", "out": group, "group": True,
                            "auroc": float(np.mean(values))})
        for seed in range(len(near)):
            per_seed.append({"entry": label, "method": label, "in": "cifar10", "out": "svhn", "group": False,
                             "seed": seed, "auroc": far[seed], "id_accuracy": 0.95 + 0.001 * seed})
    return bench, per_seed, summary


def test_leaderboard_table_gives_differences_and_flags_gaps_above_one_point():
    near, far = [0.880, 0.882, 0.881], [0.800, 0.802, 0.804]      # near within 1 point, far ~10 points below
    bench, _, summary = recorded(near, far, "openood:cifar10_res18_s0")
    lines = leaderboard_lines(bench, "cifar10", summary)
    rows = [line for line in lines if line.startswith("| msp")]
    assert len(rows) == 1 and not any(line.startswith("| energy") for line in lines)   # another model: no row
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    lb_near, lb_far = (float(v.split("±")[0]) for v in leaderboard.LEADERBOARD[("cifar10", "msp")][:2])
    assert float(cells[2]) == lb_near and float(cells[5]) == lb_far
    assert float(cells[3]) == pytest.approx(100 * np.mean(near) - lb_near, abs=0.006)
    assert float(cells[6]) == pytest.approx(100 * np.mean(far) - lb_far, abs=0.006)
    assert cells[7] == "⚠"
    c = leaderboard.compare("cifar10", "msp", "openood:cifar10_res18_s1", lb_near / 100 + 0.009, lb_far / 100)
    assert not c["flagged"] and c["diff_near"] == pytest.approx(0.9)
    assert leaderboard.matches("cifar10", "openood:cifar10_res18")            # the seeded name (s0, s1, s2)
    assert not leaderboard.matches("cifar10", "openood:cifar100_res18")
    assert leaderboard.compare("cifar100", "msp", "openood:cifar10_res18_s1", 0.8, 0.8) is None   # other protocol
    other, _, summary = recorded(near, far, "torchvision:resnet18:none")
    assert leaderboard_lines(other, "cifar10", summary) == []


def test_openood_csv_has_the_leaderboard_schema_and_mean_std_over_seeds():
    near, far = [0.880, 0.882, 0.884], [0.90, 0.91, 0.92]
    bench, per_seed, _ = recorded(near, far, "openood:cifar10_res18_s0")
    text = leaderboard.openood_csv(openood_rows(bench, per_seed))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["Training", "Postprocessor", "Near-OOD_AUROC", "Far-OOD_AUROC", "ID_Accuracy",
                             "Outlier_Data", "Arch", "Additional_Description"]
    msp = next(r for r in rows if r["Postprocessor"] == "MSP")
    assert msp["Near-OOD_AUROC"] == f"{100 * np.mean(near):.2f} ± {100 * np.std(near):.2f}"
    assert msp["Far-OOD_AUROC"] == f"{100 * np.mean(far):.2f} ± {100 * np.std(far):.2f}"
    assert msp["ID_Accuracy"] == f"{100 * np.mean([0.95, 0.951, 0.952]):.2f} ± {100 * np.std([0.95, 0.951, 0.952]):.2f}"
    assert (msp["Arch"], msp["Additional_Description"]) == ("ResNet18", "100 epochs")
    ebo = next(r for r in rows if r["Postprocessor"] == "EBO")
    assert ebo["Arch"] == "torchvision:resnet18:none"           # not the leaderboard's network: named as it is


def test_bench_export_openood_csv_end_to_end(tmp_path, capsys):
    """A tiny bench with near/far groups writes openood.csv and --export openood-csv prints it."""
    from oodbench.cli import main

    from conftest import fails

    config = tmp_path / "tiny.yaml"
    config.write_text(f"""name: tiny
report: {tmp_path / 'report'}
seeds: [0]
in: [digits]
out:
  near: [vflip:digits]
  far: ["noise:gaussian:64"]
limit: 64
bootstrap: 0
plots: false
methods:
  - {{method: msp, model: "torchvision:resnet18:none", fit_limit: 64}}
""")
    assert main(["bench", str(config), "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--export",
                 "openood-csv"]) == 0
    out = capsys.readouterr().out
    assert "Training,Postprocessor,Near-OOD_AUROC,Far-OOD_AUROC,ID_Accuracy,Outlier_Data,Arch" in out
    row = next(r for r in csv.DictReader(io.StringIO((tmp_path / "report" / "openood.csv").read_text())))
    results = __import__("json").loads((tmp_path / "report" / "results.json").read_text())
    near = next(r for r in results["summary"] if r["out"] == "near")["auroc"]
    assert row["Postprocessor"] == "MSP" and row["Near-OOD_AUROC"] == f"{100 * near:.2f} ± 0.00"
    assert row["Arch"] == "torchvision:resnet18:none"
    assert "Leaderboard" not in (tmp_path / "report" / "report.md").read_text()    # digits: no leaderboard row
    quick = tmp_path / "q.yaml"
    quick.write_text(config.read_text().replace("near: [vflip:digits]", "average: [vflip:digits]")
                     .replace('  far: ["noise:gaussian:64"]\n', "").replace("report'", "report2'")
                     .replace(str(tmp_path / "report"), str(tmp_path / "report2")))
    assert "needs a protocol with near and far groups" in fails(capsys, ["bench", str(quick), "--device", "cpu",
                                                                          "--runs-dir", str(tmp_path / "runs"),
                                                                          "--export", "openood-csv"])
