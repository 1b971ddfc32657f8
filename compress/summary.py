"""The report a run ends with: a table of every stage, the Pareto view (accuracy against latency and size),
each step's provenance and the command that reproduces it, and the notes a user must not miss; written as
self-contained HTML (the plot embedded, no external file or network), Markdown (+ its PNG) and JSON.

Example:
    >>> summary = Summary("demo", rows, steps=[StepRecord("fuse", "fuse", ["a.pt", "b.pt"], {...}, "compress fuse ...")])
    >>> write_report(summary, "run/report.html"); write_report(summary, "run/report.md")
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import atomic_write
from .report import count, megabytes, ms, pct, seconds
from .result import Result, Row


@dataclass
class StepRecord:
    """One step of a run: what it was, what it read, how it was set, how to run it again, what it cost."""

    name: str
    kind: str
    parents: list[str]
    settings: dict
    command: str
    seconds: float | None = None
    status: str = "ran"  # ran | resumed | cached (finished earlier with the same settings and inputs)
    output: str | None = None
    notes: list[str] = field(default_factory=list)
    tables: dict[str, list[dict]] = field(default_factory=dict)  # what the step compared (title -> rows)


@dataclass
class Summary:
    """What a report shows: the stages (rows), the steps behind them and the run's notes."""

    title: str
    rows: list[Row]
    steps: list[StepRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    threads: int | None = None

    def to_dict(self) -> dict:
        return {"title": self.title, "threads": self.threads, "rows": [asdict(r) for r in self.rows],
                "steps": [asdict(s) for s in self.steps], "notes": self.notes}


def from_result(title: str, result: Result, step: StepRecord | None = None) -> Summary:
    """The report of one command's result (`compress fuse ... --report r.html`)."""
    import torch

    return Summary(title, result.rows, [step] if step else [], list(result.notes), torch.get_num_threads())


_HEAD = ["stage", "metric %", "params", "MACs", "size", "latency b1", "latency b32", "cost", "runtime", "note"]


def _cells(r: Row) -> list[str]:
    return [r.name, f"{pct(r.score)} ({r.metric})", count(r.params), count(r.macs), megabytes(r.size_bytes),
            ms(r.latency_ms) if r.runtime != "simulated" else "simulated", ms(r.latency_ms_b32)
            if r.runtime != "simulated" else "simulated", seconds(r.seconds), r.runtime, r.note]


def pareto_png(rows: list[Row], title: str) -> bytes | None:
    """Accuracy against batch-1 latency and against size, the Pareto front of each marked (PNG bytes)."""
    from .plots import figure, png_bytes

    timed = [r for r in rows if r.score is not None and r.latency_ms is not None]
    sized = [r for r in rows if r.score is not None and r.size_bytes is not None]
    if not timed and not sized:
        return None
    fig, axes = figure(10, 4, 1, 2)
    for ax, pts, key, label in ((axes[0][0], timed, "latency_ms", "latency at batch 1 (ms)"),
                                (axes[0][1], sized, "size_bytes", "size (MB)")):
        scale = 1e-6 if key == "size_bytes" else 1.0
        xs = [getattr(r, key) * scale for r in pts]
        ys = [r.score for r in pts]
        ax.scatter(xs, ys, color="tab:blue")
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(r.name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = _front(list(zip(xs, ys)))
        if front:
            ax.plot(*zip(*front), "o--", color="tab:orange", markersize=9, markerfacecolor="none",
                    label="Pareto front")  # nothing else is both faster (smaller) and more accurate
            ax.legend(fontsize=7, loc="best")
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {pts[0].metric if pts else 'top1'} (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (smaller x, higher y), sorted by x."""
    out, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return out


def write_report(summary: Summary, path: str | Path) -> Path:
    """Write `summary` by the path's suffix: .html (self-contained), .md (with `<stem>.png` beside it) or
    .json; atomically."""
    path = Path(path)
    png = pareto_png(summary.rows, summary.title)
    if path.suffix == ".json":
        text = json.dumps(summary.to_dict(), indent=2, default=str)
    elif path.suffix == ".md":
        image = None
        if png:
            image = path.with_suffix(".png")
            atomic_write(image, lambda tmp: Path(tmp).write_bytes(png))
        text = markdown(summary, image.name if image else None)
    elif path.suffix in (".html", ".htm"):
        text = html_page(summary, png)
    else:
        from .errors import CompressError

        raise CompressError(f"cannot write a report to '{path}'", expected="a .html, .md or .json path")
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def markdown(summary: Summary, image: str | None) -> str:
    lines = [f"# {summary.title}", ""]
    if summary.threads:
        lines += [f"Latency measured side by side in one process, {summary.threads} threads.", ""]
    lines += ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in summary.rows]
    if image:
        lines += ["", f"![accuracy against latency and size]({image})"]
    if summary.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in summary.notes]
    if summary.steps:
        lines += ["", "## Steps", ""]
        for s in summary.steps:
            lines += [f"### {s.name} ({s.kind}, {s.status}{', ' + seconds(s.seconds) if s.seconds else ''})", "",
                      f"- parents: {', '.join(s.parents) or 'none'}", f"- output: {s.output or '-'}",
                      f"- settings: `{json.dumps(s.settings, default=str)}`", "", "```bash", s.command, "```", ""]
            lines += [f"- note: {n}" for n in s.notes]
            for title, rows in s.tables.items():
                lines += ["", f"{title}:", "", *_markdown_table(rows), ""]
    return "\n".join(lines) + "\n"


def _cell(column: str, v) -> str:
    from .report import _fmt

    return _fmt(column, v).replace("|", "/")


def _markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(_cell(c, r.get(c)) for c in cols) + " |" for r in rows])


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    e, cols = html.escape, list(rows[0])
    return ("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(_cell(c, r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
            + "</table>")


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f2f2f2}code,pre{background:#f6f6f6;padding:2px 4px}
pre{padding:8px;overflow-x:auto}.note{color:#8a4b00}img{max-width:100%}"""


def html_page(summary: Summary, png: bytes | None) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(summary.title)}</title>",
           f"<style>{_CSS}</style></head><body><h1>{e(summary.title)}</h1>"]
    if summary.threads:
        out.append(f"<p>Latency measured side by side in one process, {summary.threads} threads.</p>")
    out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in _HEAD) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in _cells(r)) + "</tr>" for r in summary.rows]
    out.append("</table>")
    if png:
        data = base64.b64encode(png).decode()
        out.append(f"<h2>Accuracy against latency and size</h2><img alt='Pareto view' src='data:image/png;base64,{data}'>")
    if summary.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li class='note'>{e(n)}</li>" for n in summary.notes) + "</ul>")
    if summary.steps:
        out.append("<h2>Steps</h2>")
        for s in summary.steps:
            cost = f", {seconds(s.seconds)}" if s.seconds else ""
            out.append(f"<h3>{e(s.name)} <small>({e(s.kind)}, {e(s.status)}{e(cost)})</small></h3>"
                       f"<p>parents: {e(', '.join(s.parents) or 'none')}<br>output: {e(s.output or '-')}</p>"
                       f"<pre>{e(s.command)}</pre><details><summary>settings</summary>"
                       f"<pre>{e(json.dumps(s.settings, indent=1, default=str))}</pre></details>")
            out += [f"<p class='note'>{e(n)}</p>" for n in s.notes]
            out += [f"<h4>{e(title)}</h4>{_html_table(rows)}" for title, rows in s.tables.items()]
    out.append("</body></html>")
    return "\n".join(out)
