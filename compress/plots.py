"""PNG figures: matplotlib on the file-only backend, written atomically.

Example:
    >>> fig, ax = figure(5, 3.5); ax.plot([0, 1], [0, 1]); save_figure(fig, "line.png")
"""

from __future__ import annotations

import io
from pathlib import Path

from .checkpoint import atomic_write


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def figure(width: float, height: float, rows: int = 1, cols: int = 1):
    """A new figure and its axes (an array of them when rows * cols > 1)."""
    return pyplot().subplots(rows, cols, figsize=(width, height), squeeze=rows * cols == 1)


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (atomically) and close it."""
    fig.tight_layout()
    out = atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    pyplot().close(fig)
    return out


def png_bytes(fig) -> bytes:
    """`fig` as PNG bytes (for reports that embed their pictures), closed after."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=90, format="png")
    pyplot().close(fig)
    return buf.getvalue()
