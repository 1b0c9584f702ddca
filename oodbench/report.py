"""Result tables: Markdown for people, CSV and JSON for scripts."""
from __future__ import annotations

import json

from oodbench.joint_metrics import FS_JOINT_TITLES, FS_TITLES, JOINT_TITLES
from oodbench.metrics import METRIC_TITLES, TABLE_METRICS
from oodbench.tables import rows_to_csv

COLUMNS = tuple((m, METRIC_TITLES[m]) for m in TABLE_METRICS)
JSON_KEYS = ("method", "in", "out") + TABLE_METRICS


def markdown_table(rows: list) -> str:
    """One line per (method, in, out); metrics in percent. The joint metrics (--joint) get columns when a row has
    them, and so do the full-spectrum ones (--csid, FS-*); a row without one shows "-"."""
    optional = {**JOINT_TITLES, **{f"fs_{m}": FS_TITLES[f"fs_{m}"] for m in TABLE_METRICS}, **FS_JOINT_TITLES}
    columns = COLUMNS + tuple((k, t) for k, t in optional.items() if any(k in r for r in rows))
    head = "| method | in | out | " + " | ".join(title for _, title in columns) + " |"
    lines = [head, "|" + "---|" * (3 + len(columns))]
    for r in rows:
        cells = [r["method"], r["in"], r["out"]] + [_percent(r.get(k)) for k, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def json_rows(rows: list) -> str:
    """The stable machine-readable form: a list of {method, in, out, auroc, aupr_in, aupr_out, fpr95,
    detection_error} (fractions), plus any extra keys (e.g. fpr95_openood, bootstrap intervals)."""
    ordered = [{**{k: r[k] for k in JSON_KEYS}, **{k: v for k, v in r.items() if k not in JSON_KEYS}} for r in rows]
    return json.dumps(ordered, indent=2)


def csv_rows(rows: list) -> str:
    return rows_to_csv(rows)
