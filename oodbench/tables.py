"""Plain tables as text (no oodbench imports): rows (a list of dicts) → CSV."""
from __future__ import annotations

import csv
import io
import json


def rows_to_csv(rows: list) -> str:
    """CSV of `rows` with the union of their keys as columns (first-seen order); lists and dicts as JSON."""
    if not rows:
        return ""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    return buf.getvalue()
