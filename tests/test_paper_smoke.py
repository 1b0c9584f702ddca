"""scripts/perf/paper_smoke.py on tiny networks: every family trains in fp32 and bf16 and gives a finite row."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "perf" / "paper_smoke.py"


def load_script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))        # its sibling import of timing.py
    spec = importlib.util.spec_from_file_location("paper_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "paper_smoke", module)   # its dataclass looks the module up
    spec.loader.exec_module(module)
    return module


def test_every_family_gives_a_finite_row(monkeypatch, capsys):
    smoke = load_script(monkeypatch)
    rows = smoke.main(["--tiny", "--device", "cpu", "--steps", "3"])
    assert [r["family"] for r in rows] == list(smoke.FAMILIES)
    for row in rows:
        assert all(math.isfinite(v) for v in row.values() if not isinstance(v, str)), row
        assert row["steps"] == 3 and row["params_m"] > 0 and row["steps_s_fp32"] > 0 and row["steps_s_bf16"] > 0
        assert 0 <= row["auroc_fp32"] <= 1 and 0 <= row["auroc_bf16"] <= 1, row
        assert -1 <= row["spearman"] <= 1 and row["max_rel_diff_bf16_scoring"] >= 0, row
    printed = capsys.readouterr().out
    assert all(f"\n{name} " in printed for name in smoke.FAMILIES), printed


def test_unknown_family_is_a_usage_error(monkeypatch, capsys):
    smoke = load_script(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        smoke.main(["--families", "msma,nope"])
    assert exit_.value.code == 2
    assert "--families" in capsys.readouterr().err
