"""Progress of long work (training, scoring, bench stages): a tqdm bar on a terminal, plain lines in a log.

`OODBENCH_PROGRESS` unset: a bar when stderr is a terminal; otherwise (nohup, SLURM, CI logs) one plain line per
stage every `LINE_EVERY_S` seconds and one when the stage ends, if it printed any: stage, item, done/total, elapsed,
ETA. `OODBENCH_PROGRESS=1`: bars even when not a terminal; `OODBENCH_PROGRESS=0`: nothing.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional

from tqdm import tqdm

LINE_EVERY_S = 30.0
clock = time.monotonic


def mode() -> str:
    """"bars", "lines" or "off" (see the module docstring)."""
    env = os.environ.get("OODBENCH_PROGRESS")
    if env is not None:
        return "off" if env == "0" else "bars"
    return "bars" if sys.stderr.isatty() else "lines"


def bar(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", unit: str = "it",
        initial: int = 0, leave: bool = True, enabled: bool = True):
    """A progress bar over `iterable` (or updated by hand): tqdm's interface, shown as `mode()` says.

    enabled=False silences it (e.g. on the non-main ranks of a distributed run)."""
    how = mode() if enabled else "off"
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if how == "lines":
        return Lines(iterable, total, desc, unit, initial)
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, disable=how == "off",
                dynamic_ncols=True, file=sys.stderr)


def duration(seconds: float) -> str:
    """2h05m, 3m07s or 12s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Lines:
    """The plain-line form of a bar: the subset of tqdm's interface that oodbench uses."""

    def __init__(self, iterable, total, desc, unit, initial=0):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start_n = initial
        self.postfix = ""
        self.started = self.last = clock()
        self.printed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if clock() - self.last >= LINE_EVERY_S:
            self._line()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.printed:
            self._line(final=True)
            self.printed = False   # a second close prints nothing

    def _line(self, final: bool = False) -> None:
        now = clock()
        elapsed = now - self.started
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        text = f"oodbench: {self.desc}: {count} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        if self.postfix:
            text += f" [{self.postfix}]"
        text += f", elapsed {duration(elapsed)}"
        done = self.n - self.start_n
        if final:
            text += ", done" if self.total is None or self.n >= self.total else ", stopped"
        elif self.total is not None and done > 0:
            text += f", ETA {duration((self.total - self.n) * elapsed / done)}"
        print(text, file=sys.stderr, flush=True)
        self.last, self.printed = now, True
