"""Display (rich) and machine-readable results (--json). Nothing here computes anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=False, highlight=False)


def progress(disable: bool = False) -> Progress:
    """A rich progress bar showing the running loss; quiet when `disable` or when output is not a terminal."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=disable, transient=not sys.stderr.isatty())


def table(title: str, rows: list[dict], columns: list[str] | None = None) -> Table:
    columns = columns or list(rows[0]) if rows else []
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left")
    for r in rows:
        t.add_row(*[_fmt(r.get(c)) for c in columns])
    return t


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return "" if v is None else str(v)


def write_json(path: str | Path | None, result: dict) -> None:
    """Write `result` atomically to `path` (no-op for None)."""
    if not path:
        return
    from .checkpoint import atomic_write

    text = json.dumps(result, indent=2, default=str)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
