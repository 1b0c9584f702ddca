"""OpenOOD v1.5's leaderboard for the classifier methods oodbench has, the difference of a result to it, and its CSV.

Numbers: near-/far-OOD AUROC (%) and ID accuracy, "mean ± std" over OpenOOD's three training runs where it gives the
spread, from the leaderboard's results/cifar10.csv, cifar100.csv, imagenet200_ood.csv and imagenet1k_ood.csv in
zjysteven/OpenOOD (the repository behind https://zjysteven.github.io/OpenOOD/) at commit LEADERBOARD_COMMIT; only the
rows trained with plain cross-entropy on the leaderboard's reference network (ResNet-18 for CIFAR and ImageNet-200,
torchvision's ResNet-50 IMAGENET1K_V1 for ImageNet-1K), post-processor names mapped to oodbench's (OPENOOD_NAMES;
OpenOOD's ASH is ASH-B, its ash_net). A row matches only a result of the same protocol (its ID set) and model
(LEADERBOARD_MODELS); a difference above GAP_FLAG points is flagged.

`openood_csv` writes the leaderboard's own schema: Training, Postprocessor, Near-OOD_AUROC, Far-OOD_AUROC,
ID_Accuracy, Outlier_Data, Arch, Additional_Description (values "mean ± std" in %, the std over seeds as numpy's
population std, which OpenOOD's scripts/eval_ood.py uses too).
"""
from __future__ import annotations

import csv
import io
from typing import Optional

LEADERBOARD_REPO = "zjysteven/OpenOOD"
LEADERBOARD_COMMIT = "23c9113a42eb7e3cc0d36cdaa0a7c85261f93ebe"
GAP_FLAG = 1.0
OPENOOD_NAMES = {"openmax": "OpenMax", "msp": "MSP", "tempscale": "TempScale", "odin": "ODIN", "mahalanobis": "MDS",
                 "mds_ensemble": "MDSEns", "rmds": "RMDS", "gram": "Gram", "energy": "EBO", "gradnorm": "GradNorm",
                 "react": "ReAct", "maxlogit": "MLS", "klm": "KLM", "vim": "VIM", "knn": "KNN", "dice": "DICE",
                 "rankfeat": "RankFeat", "ash_b": "ASH", "she": "SHE", "gen": "GEN", "scale": "SCALE", "fdbd": "fDBD",
                 "adascale_a": "AdaSCALE-A", "adascale_l": "AdaSCALE-L", "nci": "NCI", "relation": "Relation",
                 "iodin": "i-ODIN"}
# protocol (ID set) -> (which model specs are the leaderboard's network, its Arch column, its description)
LEADERBOARD_MODELS = {
    "cifar10": (("openood:cifar10_res18", "openood:resnet18_32x32:"), "ResNet18", "100 epochs"),
    "cifar100": (("openood:cifar100_res18", "openood:resnet18_32x32:"), "ResNet18", "100 epochs"),
    "imagenet200": (("openood:imagenet200_res18", "openood:resnet18_224x224:"), "ResNet18", "90 epochs"),
    "imagenet": (("torchvision:resnet50:IMAGENET1K_V1",), "ResNet50", "torchvision ckpt"),
}

# (protocol, method): (near-OOD AUROC, far-OOD AUROC, ID accuracy), as the leaderboard's CSV writes them
LEADERBOARD = {
    ("cifar10", "openmax"): ("87.62 ± 0.29", "89.62 ± 0.19", "95.06 ± 0.30"),
    ("cifar10", "msp"): ("88.03 ± 0.25", "90.73 ± 0.43", "95.06 ± 0.30"),
    ("cifar10", "tempscale"): ("88.09 ± 0.31", "90.97 ± 0.52", "95.06 ± 0.30"),
    ("cifar10", "odin"): ("82.87 ± 1.85", "87.96 ± 0.61", "95.06 ± 0.30"),
    ("cifar10", "mahalanobis"): ("84.20 ± 2.40", "89.72 ± 1.36", "95.06 ± 0.30"),
    ("cifar10", "mds_ensemble"): ("60.43 ± 0.26", "73.90 ± 0.27", "95.06 ± 0.30"),
    ("cifar10", "rmds"): ("89.80 ± 0.28", "92.20 ± 0.21", "95.06 ± 0.30"),
    ("cifar10", "gram"): ("58.66 ± 4.83", "71.73 ± 3.20", "95.06 ± 0.30"),
    ("cifar10", "energy"): ("87.58 ± 0.46", "91.21 ± 0.92", "95.06 ± 0.30"),
    ("cifar10", "gradnorm"): ("54.90 ± 0.98", "57.55 ± 3.22", "95.06 ± 0.30"),
    ("cifar10", "react"): ("87.11 ± 0.61", "90.42 ± 1.41", "95.06 ± 0.30"),
    ("cifar10", "maxlogit"): ("87.52 ± 0.47", "91.10 ± 0.89", "95.06 ± 0.30"),
    ("cifar10", "klm"): ("79.19 ± 0.80", "82.68 ± 0.21", "95.06 ± 0.30"),
    ("cifar10", "vim"): ("88.68 ± 0.28", "93.48 ± 0.24", "95.06 ± 0.30"),
    ("cifar10", "knn"): ("90.64 ± 0.20", "92.96 ± 0.14", "95.06 ± 0.30"),
    ("cifar10", "dice"): ("78.34 ± 0.79", "84.23 ± 1.89", "95.06 ± 0.30"),
    ("cifar10", "rankfeat"): ("79.46 ± 2.52", "75.87 ± 5.06", "95.06 ± 0.30"),
    ("cifar10", "ash_b"): ("75.27 ± 1.04", "78.49 ± 2.58", "95.06 ± 0.30"),
    ("cifar10", "she"): ("81.54 ± 0.51", "85.32 ± 1.43", "95.06 ± 0.30"),
    ("cifar10", "gen"): ("88.20 ± 0.30", "91.35 ± 0.69", "95.06 ± 0.30"),
    ("cifar10", "relation"): ("89.77 ± 0.16", "92.21 ± 0.20", "95.06 ± 0.30"),
    ("cifar10", "scale"): ("82.55 ± 0.36", "86.39 ± 1.86", "95.06 ± 0.30"),
    ("cifar10", "fdbd"): ("90.42 ± 0.00", "93.16 ± 0.00", "95.22 ± 0.00"),
    ("cifar10", "iodin"): ("87.92 ± 0.17", "90.99 ± 0.76", "95.06 ± 0.30"),
    ("cifar10", "adascale_a"): ("83.92 ± 0.33", "88.00 ± 1.49", "95.06 ± 0.30"),
    ("cifar10", "adascale_l"): ("74.99 ± 0.74", "79.02 ± 2.63", "95.06 ± 0.30"),
    ("cifar10", "nci"): ("88.86 ± 0.00", "91.27 ± 0.00", "95.22 ± 0.00"),
    ("cifar100", "openmax"): ("76.41 ± 0.25", "79.48 ± 0.41", "77.25 ± 0.10"),
    ("cifar100", "msp"): ("80.27 ± 0.11", "77.76 ± 0.44", "77.25 ± 0.10"),
    ("cifar100", "tempscale"): ("80.90 ± 0.07", "78.74 ± 0.51", "77.25 ± 0.10"),
    ("cifar100", "odin"): ("79.90 ± 0.11", "79.28 ± 0.21", "77.25 ± 0.10"),
    ("cifar100", "mahalanobis"): ("58.69 ± 0.09", "69.39 ± 1.39", "77.25 ± 0.10"),
    ("cifar100", "mds_ensemble"): ("46.31 ± 0.24", "66.00 ± 0.69", "77.25 ± 0.10"),
    ("cifar100", "rmds"): ("80.15 ± 0.11", "82.92 ± 0.42", "77.25 ± 0.10"),
    ("cifar100", "gram"): ("51.66 ± 0.77", "73.36 ± 1.08", "77.25 ± 0.10"),
    ("cifar100", "energy"): ("80.91 ± 0.08", "79.77 ± 0.61", "77.25 ± 0.10"),
    ("cifar100", "gradnorm"): ("70.13 ± 0.47", "69.14 ± 1.05", "77.25 ± 0.10"),
    ("cifar100", "react"): ("80.77 ± 0.05", "80.39 ± 0.49", "77.25 ± 0.10"),
    ("cifar100", "maxlogit"): ("81.05 ± 0.07", "79.67 ± 0.57", "77.25 ± 0.10"),
    ("cifar100", "klm"): ("76.56 ± 0.25", "76.24 ± 0.52", "77.25 ± 0.10"),
    ("cifar100", "vim"): ("74.98 ± 0.13", "81.70 ± 0.62", "77.25 ± 0.10"),
    ("cifar100", "knn"): ("80.18 ± 0.15", "82.40 ± 0.17", "77.25 ± 0.10"),
    ("cifar100", "dice"): ("79.38 ± 0.23", "80.01 ± 0.18", "77.25 ± 0.10"),
    ("cifar100", "rankfeat"): ("61.88 ± 1.28", "67.10 ± 1.42", "77.25 ± 0.10"),
    ("cifar100", "ash_b"): ("78.20 ± 0.15", "80.58 ± 0.66", "77.25 ± 0.10"),
    ("cifar100", "she"): ("78.95 ± 0.18", "76.92 ± 1.16", "77.25 ± 0.10"),
    ("cifar100", "gen"): ("81.31 ± 0.08", "79.68 ± 0.75", "77.25 ± 0.10"),
    ("cifar100", "relation"): ("80.67 ± 0.04", "80.82 ± 0.31", "77.25 ± 0.09"),
    ("cifar100", "scale"): ("80.99 ± 0.12", "81.42 ± 0.43", "77.26 ± 0.09"),
    ("cifar100", "fdbd"): ("81.26 ± 0.00", "79.85 ± 0.00", "77.18 ± 0.00"),
    ("cifar100", "iodin"): ("81.10 ± 0.07", "79.69 ± 0.56", "77.25 ± 0.10"),
    ("cifar100", "adascale_a"): ("81.04 ± 0.11", "81.84 ± 0.36", "77.25 ± 0.10"),
    ("cifar100", "adascale_l"): ("80.54 ± 0.16", "83.38 ± 0.20", "77.25 ± 0.10"),
    ("cifar100", "nci"): ("81.03 ± 0.00", "81.32 ± 0.00", "77.18 ± 0.00"),
    ("imagenet200", "openmax"): ("80.27 ± 0.10", "90.20 ± 0.17", "86.37 ± 0.08"),
    ("imagenet200", "msp"): ("83.34 ± 0.06", "90.13 ± 0.09", "86.37 ± 0.08"),
    ("imagenet200", "tempscale"): ("83.69 ± 0.04", "90.82 ± 0.09", "86.37 ± 0.08"),
    ("imagenet200", "odin"): ("80.27 ± 0.08", "91.71 ± 0.19", "86.37 ± 0.08"),
    ("imagenet200", "mahalanobis"): ("61.93 ± 0.51", "74.72 ± 0.26", "86.37 ± 0.08"),
    ("imagenet200", "mds_ensemble"): ("54.32 ± 0.24", "69.27 ± 0.57", "86.37 ± 0.08"),
    ("imagenet200", "rmds"): ("82.57 ± 0.25", "88.06 ± 0.34", "86.37 ± 0.08"),
    ("imagenet200", "gram"): ("67.67 ± 1.07", "71.19 ± 0.24", "86.37 ± 0.08"),
    ("imagenet200", "energy"): ("82.50 ± 0.05", "90.86 ± 0.21", "86.37 ± 0.08"),
    ("imagenet200", "gradnorm"): ("72.75 ± 0.48", "84.26 ± 0.87", "86.37 ± 0.08"),
    ("imagenet200", "react"): ("81.87 ± 0.98", "92.31 ± 0.56", "86.37 ± 0.08"),
    ("imagenet200", "maxlogit"): ("82.90 ± 0.04", "91.11 ± 0.19", "86.37 ± 0.08"),
    ("imagenet200", "klm"): ("80.76 ± 0.08", "88.53 ± 0.11", "86.37 ± 0.08"),
    ("imagenet200", "vim"): ("78.68 ± 0.24", "91.26 ± 0.19", "86.37 ± 0.08"),
    ("imagenet200", "knn"): ("81.57 ± 0.17", "93.16 ± 0.22", "86.37 ± 0.08"),
    ("imagenet200", "dice"): ("81.78 ± 0.14", "90.80 ± 0.31", "86.37 ± 0.08"),
    ("imagenet200", "rankfeat"): ("56.92 ± 1.59", "38.22 ± 3.85", "86.37 ± 0.08"),
    ("imagenet200", "ash_b"): ("82.38 ± 0.19", "93.90 ± 0.27", "86.37 ± 0.08"),
    ("imagenet200", "she"): ("80.18 ± 0.25", "89.81 ± 0.61", "86.37 ± 0.08"),
    ("imagenet200", "gen"): ("83.68 ± 0.06", "91.36 ± 0.10", "86.37 ± 0.08"),
    ("imagenet200", "scale"): ("84.84 ± 0.28", "93.98 ± 0.25", "86.37 ± 0.08"),
    ("imagenet200", "fdbd"): ("84.27 ± 0.08", "93.45 ± 0.12", "86.37 ± 0.08"),
    ("imagenet200", "iodin"): ("82.99 ± 0.04", "91.16 ± 0.18", "86.37 ± 0.08"),
    ("imagenet200", "adascale_a"): ("85.52 ± 0.27", "94.43 ± 0.21", "86.37 ± 0.08"),
    ("imagenet200", "adascale_l"): ("85.73 ± 0.31", "94.86 ± 0.12", "86.37 ± 0.08"),
    ("imagenet200", "nci"): ("83.50 ± 0.12", "93.71 ± 0.12", "86.37 ± 0.08"),
    ("imagenet", "openmax"): ("74.77", "89.26", "76.18"),
    ("imagenet", "msp"): ("76.02", "85.23", "76.18"),
    ("imagenet", "tempscale"): ("77.14", "87.56", "76.18"),
    ("imagenet", "odin"): ("74.75", "89.47", "76.18"),
    ("imagenet", "mahalanobis"): ("55.44", "74.25", "76.18"),
    ("imagenet", "mds_ensemble"): ("49.67", "67.52", "76.18"),
    ("imagenet", "rmds"): ("76.99", "86.38", "76.18"),
    ("imagenet", "gram"): ("61.70", "79.71", "76.18"),
    ("imagenet", "energy"): ("75.89", "89.47", "76.18"),
    ("imagenet", "gradnorm"): ("72.96", "90.25", "76.18"),
    ("imagenet", "react"): ("77.38", "93.67", "76.18"),
    ("imagenet", "maxlogit"): ("76.46", "89.57", "76.18"),
    ("imagenet", "klm"): ("76.64", "87.60", "76.18"),
    ("imagenet", "vim"): ("72.08", "92.68", "76.18"),
    ("imagenet", "knn"): ("71.10", "90.18", "76.18"),
    ("imagenet", "dice"): ("73.07", "90.95", "76.18"),
    ("imagenet", "rankfeat"): ("50.99", "53.93", "76.18"),
    ("imagenet", "ash_b"): ("78.17", "95.74", "76.18"),
    ("imagenet", "she"): ("73.78", "90.92", "76.18"),
    ("imagenet", "gen"): ("76.85", "89.76", "76.18"),
    ("imagenet", "scale"): ("81.36", "96.53", "76.18"),
    ("imagenet", "fdbd"): ("76.63", "92.77", "76.19"),
    ("imagenet", "iodin"): ("76.53", "89.64", "76.19"),
    ("imagenet", "adascale_a"): ("84.42", "97.27", "76.18"),
    ("imagenet", "adascale_l"): ("84.27", "97.28", "76.18"),
    ("imagenet", "nci"): ("78.69", "95.53", "76.19"),
}


def _mean(text: str) -> float:
    return float(text.split("±")[0])


def matches(in_spec: str, model: Optional[str]) -> bool:
    """Whether a result of `model` on protocol `in_spec` is comparable with the leaderboard's rows."""
    prefixes = LEADERBOARD_MODELS.get(in_spec, ((),))[0]
    return bool(model) and any(model.startswith(p) for p in prefixes)


def compare(in_spec: str, method: str, model: Optional[str], near: Optional[float], far: Optional[float]):
    """{leaderboard near/far (%), our near/far (%), their differences (points), flagged} or None when no row
    matches. near/far: our AUROCs as fractions (None when not computed)."""
    row = LEADERBOARD.get((in_spec, method))
    if row is None or not matches(in_spec, model):
        return None
    out = {"openood": OPENOOD_NAMES[method], "lb_near": _mean(row[0]), "lb_far": _mean(row[1])}
    for key, ours in (("near", near), ("far", far)):
        out[key] = None if ours is None else 100 * ours
        out[f"diff_{key}"] = None if ours is None else 100 * ours - out[f"lb_{key}"]
    out["flagged"] = any(d is not None and abs(d) > GAP_FLAG for d in (out["diff_near"], out["diff_far"]))
    return out


def markdown(in_spec: str, results: list) -> list:
    """The "leaderboard" table lines of one protocol: results are (label, method, model, near, far) tuples; [] when
    none matches."""
    rows = [(label, c) for label, method, model, near, far in results
            if (c := compare(in_spec, method, model, near, far)) is not None]
    if not rows:
        return []
    cite = f"{LEADERBOARD_REPO}@{LEADERBOARD_COMMIT[:10]}"
    lines = [f"### Leaderboard (OpenOOD v1.5, {cite}): AUROC %, ours − leaderboard; ⚠ = gap above {GAP_FLAG:g} "
             f"point", "", "| method | near | leaderboard near | Δ near | far | leaderboard far | Δ far | |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(v, sign=False):
        return "" if v is None else (f"{v:+.2f}" if sign else f"{v:.2f}")

    for label, c in rows:
        lines.append(f"| {label} | {cell(c['near'])} | {c['lb_near']:.2f} | {cell(c['diff_near'], True)} | "
                     f"{cell(c['far'])} | {c['lb_far']:.2f} | {cell(c['diff_far'], True)} | "
                     f"{'⚠' if c['flagged'] else ''} |")
    return lines + [""]


def openood_csv(rows: list) -> str:
    """The leaderboard's CSV for result rows {method, in, model, near: [AUROC per seed], far: [...], acc: [...]}
    (fractions); rows of methods OpenOOD does not name keep oodbench's name."""
    import numpy as np

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Training", "Postprocessor", "Near-OOD_AUROC", "Far-OOD_AUROC", "ID_Accuracy", "Outlier_Data", "Arch",
                "Additional_Description"])

    def stat(values):
        values = [100 * v for v in values or [] if v is not None]
        return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if values else ""

    for r in rows:
        _, arch, desc = LEADERBOARD_MODELS.get(r["in"], ((), "", ""))
        if not matches(r["in"], r.get("model")):
            arch, desc = r.get("model") or "oodbench run", ""
        w.writerow(["CrossEntropy", OPENOOD_NAMES.get(r["method"], r["method"]), stat(r.get("near")),
                    stat(r.get("far")), stat(r.get("acc")), "No", arch, desc])
    return buf.getvalue()
