"""Display (rich) and machine-readable results (--json). Nothing here computes anything.

Tables are for people: sizes in MB, parameters and MACs in M / G, percentages with two decimals, latency in
ms with its batch named in the column; `--json` keeps the raw numbers. Progress bars of a step that runs
inside `compress run` join the run's own display, under its "step i of N" line.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 120)
_shared: list[Progress] = []  # the enclosing run's display, when there is one


class _Fields(ProgressColumn):
    """A task's loss (training) or note (a run's step), when it has one."""

    def render(self, task) -> Text:
        if "loss" in task.fields:
            return Text(f"loss {task.fields['loss']:.3f}")
        return Text(str(task.fields.get("note", "")))


def _columns():
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Fields(),
            TimeElapsedColumn(), TimeRemainingColumn())


class _Nested:
    """Tasks added through this join the shared display and leave it when the block ends."""

    def __init__(self, shared: Progress):
        self.shared, self.tasks = shared, []

    def add_task(self, *args, **kwargs):
        task = self.shared.add_task(*args, **kwargs)
        self.tasks.append(task)
        return task

    def update(self, *args, **kwargs):
        self.shared.update(*args, **kwargs)


@contextlib.contextmanager
def progress(disable: bool = False) -> Iterator[Progress | _Nested]:
    """A rich progress display: the enclosing run's (see `run_progress`) or a new one; quiet when `disable`,
    transient when output is not a terminal."""
    if _shared and not disable:
        nested = _Nested(_shared[-1])
        try:
            yield nested
        finally:
            for task in nested.tasks:
                _shared[-1].remove_task(task)
        return
    with Progress(*_columns(), console=Console(stderr=True), disable=disable,
                  transient=not sys.stderr.isatty()) as bar:
        yield bar


@contextlib.contextmanager
def run_progress() -> Iterator[Progress]:
    """The display of a multi-step run: its own task (step i of N) above each step's progress bars."""
    with Progress(*_columns(), console=Console(stderr=True), transient=not sys.stderr.isatty()) as bar:
        _shared.append(bar)
        try:
            yield bar
        finally:
            _shared.remove(bar)


# ---- numbers for people ------------------------------------------------------------------------------

def count(n: float | None) -> str:
    """1234567 -> '1.23 M'; 2.5e9 -> '2.50 G'; counts under 10,000 as they are."""
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} G" if abs(n) >= 1e9 else f"{n / 1e6:.2f} M" if abs(n) >= 1e4 else f"{n:g}"


def megabytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def seconds(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 120:
        return f"{v:.1f} s"
    whole = round(v)  # rounded once, so 239.7 s reads 4 min 00 s, not 3 min 60 s
    return f"{whole // 60} min {whole % 60:02d} s"


_FORMATS = {"size": megabytes, "size_bytes": megabytes, "params": count, "macs": count, "top1": pct, "miou": pct,
            "cost": seconds, "seconds": seconds}


def _formatter(column: str):
    """By the column's name: size (MB), params / MACs (M, G), top1 / miou (%), cost / seconds, and any
    column named `latency ...` or `... ms` (milliseconds)."""
    low = column.lower()
    if low.startswith("latency") or low.endswith(" ms"):
        return ms
    return _FORMATS.get(low)


def table(title: str, rows: list[dict], columns: list[str] | None = None) -> Table:
    """A rich table of `rows`; numbers are formatted by what their column names say (size, params, MACs,
    ms, top1 / miou, seconds)."""
    columns = columns or (list(rows[0]) if rows else [])
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left")
    for r in rows:
        t.add_row(*[_fmt(c, r.get(c)) for c in columns])
    return t


def _fmt(column: str, v) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        f = _formatter(column)
        if f is not None:
            return f(v)
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    return str(v)


def rows_table(title: str, rows: list) -> Table:
    """The table of a result's `Row`s: one line per model, the batch named in the latency columns; columns
    with nothing in them are left out."""
    dicts = [row_dict(r) for r in rows]
    columns = [c for c in (dicts[0] if dicts else {}) if any(d[c] not in (None, "", "eager") for d in dicts)]
    return table(title, dicts, columns)


def row_dict(r) -> dict:
    """A `Row` as the columns people read."""
    return {"model": r.name, r.metric: r.score, "params": r.params, "MACs": r.macs, "size": r.size_bytes,
            "latency b1": r.latency_ms, "latency b32": r.latency_ms_b32, "cost": r.seconds,
            "runtime": r.runtime, "note": r.note}


def write_json(path: str | Path | None, result: dict) -> None:
    """Write `result` atomically to `path` (no-op for None)."""
    if not path:
        return
    from .checkpoint import atomic_write

    text = json.dumps(result, indent=2, default=str)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
