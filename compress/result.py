"""What a pipeline run returns: `Result`, with one measured `Row` per model it produced or compared.

Every pipeline's `run(inputs, data, config)` returns `(Checkpoint, Result)`. `Result.values` holds every
raw number (what `--json` writes); `Result.rows` are the models a person compares (parents, baselines,
the output), each measured the same way by `measure_rows`: test metric, parameters, MACs, size and
latency at batch 1 and 32, timed side by side in interleaved rounds; `Result.notes` are what a user
must not miss (a fallback, a teacher weaker than the student alone, an int8 program slower than float).

Example:
    >>> ckpt, result = fuse.run(["a.pt", "b.pt"], "digits", FuseRun(finetune_epochs=4))
    >>> result.score, result["ot"], [r.name for r in result.rows]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .measure import compare_latency, macs, param_count, score


@dataclass
class Row:
    """One model in a report: what it is and what it measured (None: not measured / not applicable)."""

    name: str
    metric: str  # top1 | miou
    score: float | None
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None  # batch 1
    latency_ms_b32: float | None = None  # batch 32
    seconds: float | None = None  # what producing it cost
    runtime: str = "eager"  # eager | inductor (a compiled program) | simulated (fake-quant: no latency)
    note: str = ""


def below_as_printed(score: float, rival: float, digits: int = 2) -> bool:
    """Whether `score` is below `rival` as a report prints them: a difference too small to print is no
    verdict, so a note never contradicts the table beside it.

    Example:
        >>> below_as_printed(71.0, 71.004), below_as_printed(71.0, 71.006)
        (False, True)
    """
    return round(score, digits) < round(rival, digits)


@dataclass
class Result:
    """A pipeline run's measurements. `result["key"]` reads `values`.

    Example:
        >>> result.score, result.metric, result.rows[-1].latency_ms
    """

    kind: str  # train | fuse | distill | prune | quantize | eval
    metric: str
    score: float | None  # the output model's test metric
    values: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tables: dict[str, list[dict]] = field(default_factory=dict)  # further tables to show (title -> rows)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return {**self.values, "kind": self.kind, "metric": self.metric, "score": self.score,
                "seconds": round(self.seconds, 2), "rows": [asdict(r) for r in self.rows], "notes": list(self.notes),
                "tables": self.tables}


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights and buffers (what a checkpoint of it holds, without the container)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def measure_rows(models: list[tuple[str, nn.Module]], data, num_classes: int, input_size: int, task: str,
                 in_chans: int = 3, seconds: dict[str, float] | None = None, scores: dict[str, float] | None = None,
                 sizes: dict[str, int] | None = None, latency: bool = True, notes: dict[str, str] | None = None,
                 runtime: dict[str, str] | None = None, device: torch.device | None = None) -> list[Row]:
    """One `Row` per named model: test metric on `data` (unless given in `scores`), parameters, MACs, size
    (`sizes`, else the weights' bytes) and latency at batch 1 and 32. Models of one structure (same type,
    parameters and MACs) are timed once; the others side by side in interleaved rounds, so load on the
    machine affects them alike. With `device`, every (eager) model is moved there first: one table, one device.

    Example:
        >>> measure_rows([("parent", a), ("fused", f)], data.test, 10, 32, "classification")
    """
    metric = "miou" if task == "segmentation" else "top1"
    seconds, scores, sizes = seconds or {}, scores or {}, sizes or {}
    rows, keys = [], []
    if device is not None:
        models = [(n, m.to(device) if (runtime or {}).get(n, "eager") == "eager" else m) for n, m in models]
    for name, model in models:
        timed = (runtime or {}).get(name, "eager")
        countable = timed == "eager"
        p = param_count(model) if countable else None
        m = macs(model, input_size, in_chans) if countable else None
        rows.append(Row(name, metric, scores[name] if name in scores else score(model, data, num_classes, task),
                        p, m, sizes.get(name, state_bytes(model) if countable else None), seconds=seconds.get(name),
                        runtime=timed, note=(notes or {}).get(name, "")))
        keys.append((type(model).__name__, p, m) if countable else name)
    if latency:
        timed = [(i, models[i][1]) for i, r in enumerate(rows) if r.runtime != "simulated"]
        distinct = list(dict.fromkeys(keys[i] for i, _ in timed))
        first = {k: next(m for i, m in timed if keys[i] == k) for k in distinct}
        ms1 = compare_latency([first[k] for k in distinct], input_size, 1, in_chans=in_chans)
        ms32 = compare_latency([first[k] for k in distinct], input_size, 32, runs=5, in_chans=in_chans)
        by_key = {k: (a, b) for k, a, b in zip(distinct, ms1, ms32)}
        for i, _ in timed:
            rows[i].latency_ms, rows[i].latency_ms_b32 = (round(v, 3) for v in by_key[keys[i]])
    return rows


@torch.no_grad()
def batch_of(dataset, n: int) -> torch.Tensor:
    """The first `n` images of a dataset, stacked."""
    if hasattr(dataset, "tensors"):
        return dataset.tensors[0][:n]
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def labels_of(dataset, n: int) -> torch.Tensor:
    """The first `n` labels of a dataset."""
    if hasattr(dataset, "tensors"):
        return dataset.tensors[1][:n]
    return torch.tensor([int(dataset[i][1]) for i in range(min(n, len(dataset)))])
