"""The report folder: results.json, results.csv, results_per_seed.csv, report.md, errors.log and plots/."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from oodbench import leaderboard, plots, progress, report, workflow
from oodbench.bench.aggregate import BELOW_CHANCE, collapse, describe_timing, failures, report_notes
from oodbench.bench.cells import MARKER, load_plot_scores, mark_report_folder, plot_scores_path
from oodbench.bench.plan import Bench, renamer
from oodbench.errors import OODBenchError
from oodbench.joint_metrics import JOINT_TITLES
from oodbench.metrics import METRIC_TITLES, TABLE_METRICS


def check_report_folder(folder) -> Path:
    """The report folder, refused (before anything is written) when it is a file or a folder of the user's own
    files: a bench writes and deletes report.md, results.csv, errors.log and plots/*.png there."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OODBenchError(f"--out {folder} is a file; name a new folder (or an oodbench report folder)")
    if folder.is_dir() and not (folder / MARKER).is_file():
        entries = sorted(p.name for p in folder.iterdir())
        older_report = (folder / "results.json").is_file() and (folder / "cells").is_dir()   # before the marker
        # a bench stopped before its first cell record leaves only its own folders (no file it would replace)
        started = all(name in ("cells", "scores", "plots", "slurm") and (folder / name).is_dir() for name in entries)
        if entries and not older_report and not started:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise OODBenchError(f"--out {folder} is not an oodbench report folder (it holds {shown}); a bench would "
                                f"overwrite or delete files there: name a new or empty folder")
    return folder


def write_report(bench, folder, recorder, summary, missing, plot_note, took: dict, device) -> dict:
    """Write every report file; returns the results (what results.json holds)."""
    mark_report_folder(folder)
    failed = failures(bench, recorder.cells)
    skipped = [{"dataset": spec, "reason": why} for spec, why in missing.items()]
    public = [{k: v for k, v in r.items() if k != "group"} | {"kind": "group" if r["group"] else "set"}
              for r in summary["summary"]]
    per_seed = [{k: v for k, v in r.items() if k not in ("group",)} for r in summary["per_seed"] if not r["group"]]
    notes = report_notes(bench, recorder.cells, summary["summary"])
    results = {"settings": bench.settings(), "timing": {**took, "device": str(device)}, "summary": public,
               "per_seed": per_seed, "notes": notes, "failed": failed, "skipped": skipped}
    table = recipe_table(bench, summary["summary"], skipped)
    if table:
        results["recipes"] = table
        workflow.write_atomic(folder / "recipes.csv", report.csv_rows(table))
    elif (folder / "recipes.csv").is_file():
        (folder / "recipes.csv").unlink()
    workflow.write_atomic(folder / "results.json", json.dumps(results, indent=2) + "\n")
    workflow.write_atomic(folder / "results.csv", report.csv_rows(csv_ready(public, failed)))
    workflow.write_atomic(folder / "results_per_seed.csv", report.csv_rows(csv_ready(per_seed, [])))
    if {"near", "far"} & set(bench.groups):   # OpenOOD's near/far groups: its leaderboard's CSV schema too
        workflow.write_atomic(folder / "openood.csv", leaderboard.openood_csv(openood_rows(bench, summary["per_seed"])))
    if recorder.errors:
        workflow.write_atomic(folder / "errors.log", "\n\n".join(recorder.errors) + "\n")
    elif (folder / "errors.log").is_file():
        (folder / "errors.log").unlink()
    text = markdown_report(bench, summary["summary"], failed, skipped, plot_note, took, device, folder, notes)
    workflow.write_atomic(folder / "report.md", text)
    return results


def csv_ready(rows: list, failed: list) -> list:
    """Flat rows for CSV: intervals split into _lo/_hi, failed cells as rows with status failed and the error."""
    flat = []
    for r in rows:
        row = {"status": "ok"}
        for k, v in r.items():
            if k.endswith("_ci"):
                row[f"{k}_lo"], row[f"{k}_hi"] = v
            elif isinstance(v, list):
                row[k] = " ".join(map(str, v))
            else:
                row[k] = v
        flat.append(row)
    for f in failed:
        flat.append({"status": "failed", "method": f["method"], "in": f["in"], "out": f["out"],
                     "seeds": " ".join(map(str, f["seeds"])), "error": f["error"]})
    return flat


def pct(row: dict, metric: str, n_seeds: int) -> str:
    value = f"{100 * row[metric]:.2f}"
    return value + (f" ± {100 * row[metric + '_std']:.2f}" if n_seeds > 1 else "")


def footnotes(failed: list) -> tuple:
    """(the failures merged per note, {(method, in, out): [note numbers]} for the table cells)."""
    merged = collapse(failed)
    foot: dict = {}
    for i, f in enumerate(merged):
        for out in f["outs"]:
            foot.setdefault((f["method"], f["in"], out), []).append(str(i + 1))
    return merged, foot


def markdown_report(bench, summary, failed, skipped, plot_note, took, device, folder, caveats=()) -> str:
    n_seeds = len(bench.seeds)
    lines = [f"# Benchmark report: {bench.name}", "",
             f"Config `{bench.path}`; {len(bench.entries)} method entries × {len(bench.ins)} in-distribution "
             f"set(s) × {len(bench.outs)} OOD set(s) × seeds {bench.seeds}; preset `{bench.preset}`; "
             f"test-set limit {bench.limit or 'none'}; device {device}; {describe_timing(took)}.", "",
             "Metrics in percent (higher = better, except FPR@95 and DetErr). OOD is the positive class; "
             "FPR@95 is the classic definition (OOD accepted at 95% ID TPR); see docs/metrics.md."
             + (f" Values are mean ± std over {n_seeds} seeds (numpy std, ddof=0)." if n_seeds > 1 else "")
             + (f" 95% CI: percentile bootstrap over the test sets ({bench.bootstrap} resamples)"
                + (", averaged over seeds." if n_seeds > 1 else ".") if bench.bootstrap else ""),
             ""]
    notes = []
    for s in skipped:
        notes.append(f"- **skipped** `{s['dataset']}` (not available): {s['reason']}")
    notes_failed, foot = footnotes(failed)
    if failed:
        notes.append(f"- **{len(failed)} failed cell(s)** (method × OOD set), listed under Failures below; the rest "
                     f"completed; tracebacks of errors, if any, are in errors.log.")
    gone = {s["dataset"] for s in skipped}
    for group, specs in bench.groups.items():
        lost = [s for s in specs if s in gone]
        notes.append(f"- Group `{group}` = plain mean of the per-set metrics of {', '.join(specs)}"
                     + (f" (not available, left out: {', '.join(lost)})" if lost else "") + ".")
    tuned = {(r["entry"], json.dumps(r["tuned"])): r["tuned"] for r in summary if r.get("tuned")}
    for (label, _), choice in tuned.items():
        text = "; ".join(", ".join(f"{k}={v}" for k, v in c.items()) for c in
                         (choice if isinstance(choice, list) else [choice]))
        notes.append(f"- `{label}`: options chosen on validation data (--tune: ID validation split vs the "
                     f"training split of tune.val_ood): {text}.")
    if any(BELOW_CHANCE in n["note"] for n in caveats):
        notes.append(f"- A note `{BELOW_CHANCE} SET AUROC` marks a row that ranks that OOD set as more "
                     f"in-distribution than the ID test set (AUROC < 50%).")
    notes.append(f"- Plots: {plot_note}")
    lines += ["## Notes", ""] + notes + [""]
    for in_spec in bench.ins:
        lines += in_section(bench, in_spec, summary, failed, foot, skipped, folder,
                            {n["method"]: n["note"] for n in caveats if n["in"] == in_spec})
    if failed:
        lines += ["## Failures", ""]
        for i, f in enumerate(notes_failed):
            seeds = f" (seed{'s' if len(f['seeds']) > 1 else ''} {', '.join(map(str, f['seeds']))})"
            lines.append(f"{i + 1}. `{f['method']}` on {f['in']} → {', '.join(f['outs'])}{seeds}: {f['error']}")
        lines.append("")
    return "\n".join(lines)


def entry_rows(labels: list, summary: list, in_spec: str) -> list:
    """(entry label, row name) pairs in config order; an entry with no results gets one line under its label."""
    pairs = []
    for label in labels:
        names = list(dict.fromkeys(r["method"] for r in summary if r["entry"] == label and r["in"] == in_spec))
        pairs += [(label, n) for n in names] or [(label, label)]
    return pairs


def table_columns(outs: list, groups: dict, skipped: list) -> list:
    """The OOD sets on disk, then the groups."""
    gone = {s["dataset"] for s in skipped}
    return [s for s in outs if s not in gone] + list(groups)


def metric_table(metric: str, labels: list, summary: list, in_spec: str, columns: list, groups: dict, foot: dict,
                 n_seeds: int, notes: dict) -> list:
    """One metric of one ID set as method × OOD set (and group); `failed [n]` where a cell failed, n its note."""
    index = {(r["entry"], r["method"], r["out"]): r for r in summary if r["in"] == in_spec}
    lines = [f"### {METRIC_TITLES[metric]} (%)", "", "| method | " + " | ".join(columns)
             + (" | note |" if notes else " |"), "|---|" + "---|" * (len(columns) + bool(notes))]
    for label, name in entry_rows(labels, summary, in_spec):
        cells = []
        for col in columns:
            row = index.get((label, name, col))
            cell = pct(row, metric, n_seeds) if row else "—"
            refs = [n for o in (groups.get(col) or [col]) for n in foot.get((label, in_spec, o), [])]
            if refs:
                cell = ("failed" if not row else cell) + f" [{','.join(refs)}]"
            elif row and len(row["seeds"]) < n_seeds:
                cell += f" (seeds {row['seeds']})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells + ([notes.get(name, "")] if notes else [])) + " |")
    return lines + [""]


def auroc_tables(results: dict) -> str:
    """The AUROC table of each in-distribution set, as report.md shows it, from a bench's results.json."""
    s = results["settings"]
    columns = table_columns(s["out"], s["groups"], results["skipped"])
    _, foot = footnotes(results["failed"])
    lines = []
    for in_spec in s["in"]:
        lines += [f"## {in_spec} (in-distribution)", ""]
        if in_spec in {x["dataset"] for x in results["skipped"]}:
            lines += ["Skipped: the dataset is not available.", ""]
            continue
        notes = {n["method"]: n["note"] for n in results["notes"] if n["in"] == in_spec}
        lines += metric_table("auroc", s["methods"], results["summary"], in_spec, columns, s["groups"], foot,
                              len(s["seeds"]), notes)
    return "\n".join(lines).strip()


def openood_rows(bench, per_seed: list) -> list:
    """{method, in, model, near, far, acc}: per-seed near/far group AUROCs and ID accuracies of each entry."""
    models = {e.label: e.model for e in bench.entries}
    rows: dict = {}
    for r in per_seed:
        if r["group"] and r["out"] in ("near", "far"):
            key = (r["entry"], r["method"], r["in"])
            row = rows.setdefault(key, {"method": r["method"], "in": r["in"], "model": models.get(r["entry"]),
                                        "near": [], "far": [], "acc": {}})
            row[r["out"]].append(r.get("auroc"))
    for r in per_seed:   # one ID accuracy per seed (every set row of a seed repeats it)
        key = (r["entry"], r["method"], r["in"])
        if not r["group"] and "id_accuracy" in r and key in rows:
            rows[key]["acc"][r["seed"]] = r["id_accuracy"]
    return [{**r, "acc": list(r["acc"].values())} for r in rows.values()]


def leaderboard_lines(bench, in_spec, summary) -> list:
    """The leaderboard table of one ID set: each entry whose model is the leaderboard's (leaderboard.py)."""
    models = {e.label: e.model for e in bench.entries}
    index = {(r["entry"], r["method"], r["out"]): r.get("auroc") for r in summary if r["in"] == in_spec}
    pairs = dict.fromkeys((label, method) for label, method, out in index if out in ("near", "far"))
    return leaderboard.markdown(in_spec, [(label if label == method else f"{label} ({method})", method,
                                           models.get(label), index.get((label, method, "near")),
                                           index.get((label, method, "far"))) for label, method in pairs])


def in_section(bench, in_spec, summary, failed, foot, skipped, folder, notes: dict) -> list:
    """The tables of one ID set; a `note` column holds the caveats of the rows that have one."""
    if in_spec in {s["dataset"] for s in skipped}:
        return [f"## {in_spec} (in-distribution)", "", "Skipped: the dataset is not available (see Notes).", ""]
    n_seeds, labels = len(bench.seeds), [e.label for e in bench.entries]
    columns = table_columns(bench.outs, bench.groups, skipped)
    index = {(r["entry"], r["method"], r["out"]): r for r in summary if r["in"] == in_spec}
    lines = [f"## {in_spec} (in-distribution)", ""]
    for metric in ("auroc", "fpr95"):
        lines += metric_table(metric, labels, summary, in_spec, columns, bench.groups, foot, n_seeds, notes)
    lines += leaderboard_lines(bench, in_spec, summary)
    lines += recipe_lines(bench, [r for r in recipe_table(bench, summary, skipped) if r["in"] == in_spec], n_seeds)
    lines += ["### All metrics (%)", "",
              "| method | out | " + " | ".join(METRIC_TITLES[m] for m in TABLE_METRICS)
              + (" | AUROC 95% CI" if bench.bootstrap else "") + " |",
              "|---|---|" + "---|" * (len(TABLE_METRICS) + bool(bench.bootstrap))]
    for label, name in entry_rows(labels, summary, in_spec):
        for col in columns:
            row = index.get((label, name, col))
            if not row:
                continue
            cells = [pct(row, m, n_seeds) for m in TABLE_METRICS]
            if bench.bootstrap:
                ci = row.get("auroc_ci")
                cells.append(f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else "")
            lines.append(f"| {name} | {col} | " + " | ".join(cells) + " |")
    lines.append("")
    if bench.joint:
        lines += joint_table(labels, summary, in_spec, columns, index, n_seeds)
    if bench.csid.get(in_spec):
        lines += fs_table(bench.csid[in_spec], skipped, labels, summary, in_spec, columns, index, n_seeds)
    images = sorted((folder / "plots").glob(f"*{workflow.safe_name(in_spec)}*.png")) if (folder / "plots").is_dir() else []
    if images:
        lines += ["### Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in images] + [""]
    return lines


def recipe_table(bench, summary: list, skipped: list) -> list:
    """Recipe × method (bench `recipes:` with more than one item): one row per (recipe, ID set) with the ID accuracy
    and `<method> <column>` = AUROC (a fraction, mean over seeds) for each column (the groups, else the OOD sets on
    disk); None where the cell failed or is missing."""
    if len(bench.recipes) < 2:
        return []
    entries = {e.label: e for e in bench.entries if e.recipe}
    columns = list(bench.groups) or table_columns(bench.outs, {}, skipped)
    found, methods = {}, []
    for r in summary:
        e = entries.get(r["entry"])
        if e is None:
            continue
        name = r["method"][len(e.recipe) + 1:] if e.recipe_overrides else r["method"]
        methods += [name] if name not in methods else []
        found[(e.recipe, r["in"], name, r["out"])] = r
    rows = []
    for in_spec in bench.ins:
        for recipe in bench.recipes:
            accs = [r["id_accuracy"] for (rec, i, _, _), r in found.items()
                    if rec == recipe and i == in_spec and "id_accuracy" in r]
            row = {"recipe": recipe, "in": in_spec, "id_accuracy": accs[0] if accs else None}
            for name in methods:
                for col in columns:
                    cell = found.get((recipe, in_spec, name, col))
                    row[f"{name} {col}"] = cell["auroc"] if cell else None
            rows.append(row)
    return rows


def recipe_lines(bench, rows: list, n_seeds: int) -> list:
    """The recipe × method AUROC table of one ID set in report.md (cells `near / far`, or the OOD sets)."""
    if not rows:
        return []
    keys = [k for k in rows[0] if k not in ("recipe", "in", "id_accuracy")]
    methods = list(dict.fromkeys(k.rsplit(" ", 1)[0] for k in keys))
    columns = list(dict.fromkeys(k.rsplit(" ", 1)[1] for k in keys))
    def show(v):
        return "—" if v is None else f"{100 * v:.2f}"
    lines = ["### Training recipes: AUROC (%)", "",
             f"Each recipe's own classifier run (`recipes:`), scored by each method; cells {' / '.join(columns)}"
             + (f", mean over {n_seeds} seeds" if n_seeds > 1 else "") + "; — = failed or missing (see the "
             "tables above).", "",
             "| recipe | ID acc | " + " | ".join(f"{m} {' / '.join(columns)}" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for r in rows:
        lines.append(f"| {r['recipe']} | {show(r['id_accuracy'])} | "
                     + " | ".join(" / ".join(show(r[f'{m} {c}']) for c in columns) for m in methods) + " |")
    return lines + [""]


def joint_table(labels: list, summary: list, in_spec: str, columns: list, index: dict, n_seeds: int) -> list:
    """The joint metrics (bench `joint: true`) of each row, in percent (docs/metrics.md)."""
    lines = ["### Joint metrics: classification and detection (%)", "",
             "| method | out | " + " | ".join(JOINT_TITLES.values()) + " |", "|---|---|" + "---|" * len(JOINT_TITLES)]
    for label, name in entry_rows(labels, summary, in_spec):
        for col in columns:
            row = index.get((label, name, col))
            if row:
                lines.append(f"| {name} | {col} | " + " | ".join(pct(row, m, n_seeds) for m in JOINT_TITLES) + " |")
    return lines + [""]


FS_COLUMNS = (("id_accuracy", "ID acc"), ("csid_accuracy", "csID acc"), ("auroc", "AUROC"),
              ("fs_auroc", "FS-AUROC"), ("fpr95", "FPR@95"), ("fs_fpr95", "FS-FPR@95"))


def fs_table(csid: list, skipped: list, labels: list, summary: list, in_spec: str, columns: list, index: dict,
             n_seeds: int) -> list:
    """Full-spectrum OOD (bench `csid:`): ID and csID accuracy, the standard and the FS-OOD AUROC / FPR@95 of each
    row, in percent; FS-OOD scores ID ∪ csID as in-distribution against each OOD set (docs/bench.md)."""
    gone = {s["dataset"] for s in skipped}
    used = [s for s in csid if s not in gone]
    lines = ["### Full-spectrum OOD (%)", ""]
    if not used:
        return lines + ["No csID set is available (see Notes): no FS-OOD rows.", ""]
    lines += [f"In-distribution = {in_spec} ∪ csID ({', '.join(f'`{s}`' for s in used)}) for the FS- columns; "
              f"csID acc is the classifier's accuracy pooled over the csID images (— for a method without one)."
              + (f" Not available: {', '.join(f'`{s}`' for s in csid if s in gone)}." if len(used) < len(csid) else ""),
              "", "| method | out | " + " | ".join(t for _, t in FS_COLUMNS) + " |",
              "|---|---|" + "---|" * len(FS_COLUMNS)]
    for label, name in entry_rows(labels, summary, in_spec):
        for col in columns:
            row = index.get((label, name, col))
            if row and "fs_auroc" in row:
                lines.append(f"| {name} | {col} | " + " | ".join(pct(row, m, n_seeds) if m in row else "—"
                                                                 for m, _ in FS_COLUMNS) + " |")
    return lines + [""]


def make_plots(bench: Bench, cells: dict, summary: dict, folder: Path) -> str:
    """ROC curves per OOD set, ID-vs-OOD histograms per method, an AUROC heatmap; first seed. Returns a note."""
    plot_dir = folder / "plots"
    plot_dir.mkdir(exist_ok=True)
    for old in plot_dir.glob("*.png"):
        old.unlink()
    seed = bench.seeds[0]
    jobs = []
    for in_spec in bench.ins:
        outs = [o for o in bench.outs if any(cells.get((e.label, in_spec, seed, o), {}).get("status") == "ok"
                                             for e in bench.entries)]
        if outs:
            jobs.append(("heatmap", in_spec, None))
        jobs += [("roc", in_spec, o) for o in outs]
        jobs += [("hist", in_spec, e) for e in bench.entries]
    written = 0
    for what, in_spec, arg in progress.bar(jobs, desc="bench: plots", unit="plot"):
        tag = workflow.safe_name(in_spec)
        if what == "heatmap":
            written += heatmap(bench, summary["summary"], in_spec, plot_dir / f"heatmap_auroc_{tag}.png")
        elif what == "roc":
            curves = {}
            for entry in bench.entries:
                if cells.get((entry.label, in_spec, seed, arg), {}).get("status") != "ok":
                    continue
                ids = load_plot_scores(plot_scores_path(folder, entry, in_spec, in_spec))
                oods = load_plot_scores(plot_scores_path(folder, entry, in_spec, arg))
                curves.update({renamer(entry)(r): (ids[r], oods[r]) for r in ids if r in oods})
            if curves:
                plots.roc_curves(curves, f"ROC: {in_spec} (ID) vs {arg} (OOD), seed {seed}",
                                 plot_dir / f"roc_{tag}_vs_{workflow.safe_name(arg)}.png")
                written += 1
        else:
            entry = arg
            outs = [o for o in bench.outs if cells.get((entry.label, in_spec, seed, o), {}).get("status") == "ok"]
            ids = load_plot_scores(plot_scores_path(folder, entry, in_spec, in_spec))
            per_out = {o: load_plot_scores(plot_scores_path(folder, entry, in_spec, o)) for o in outs}
            for r in ids:
                name = renamer(entry)(r)
                plots.score_histograms(ids[r], {o: s[r] for o, s in per_out.items() if r in s},
                                       f"{name}: scores on {in_spec} (ID) and OOD sets, seed {seed}",
                                       plot_dir / f"hist_{tag}_{workflow.safe_name(name)}.png")
                written += 1
    return f"{written} PNG file(s) in plots/ (first seed)."


def heatmap(bench: Bench, summary: list, in_spec: str, path: Path) -> int:
    columns = [o for o in bench.outs] + list(bench.groups)
    pairs = entry_rows([e.label for e in bench.entries], summary, in_spec)
    index = {(r["entry"], r["method"], r["out"]): r["auroc"] for r in summary if r["in"] == in_spec}
    values = np.array([[index.get((label, name, c), np.nan) for c in columns] for label, name in pairs])
    keep = ~np.all(np.isnan(values), axis=0)
    if not keep.any():
        return 0
    plots.auroc_heatmap(100 * values[:, keep], [n for _, n in pairs], [c for c, k in zip(columns, keep) if k],
                        f"AUROC (%), {in_spec} (ID), mean over seeds", path)
    return 1
