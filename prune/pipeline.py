"""`compress prune` as a function: prune (at a ratio or a MACs target), recover, measure before / after,
and optionally sweep the ratio.

Example:
    >>> ckpt, result = run("vit.pt", "digits", PruneRun(target_macs=0.5, finetune_epochs=8,
    ...                                                   distill_from_original=True))
    >>> result["top1_after"], result.rows[-1].latency_ms
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from compress.checkpoint import Checkpoint, as_checkpoints
from compress.data import data_for, spec_of
from compress.device import hardware
from compress.losses import distillation_objective
from compress.measure import compare_latency, macs, param_count, top1
from compress.result import Result, batch_of, labels_of, measure_rows
from compress.train import train

from .config import PruneConfig, PruneRun
from .methods import prune, ratio_for_macs

__all__ = ["run", "sweep", "PruneRun"]


def run(inputs, data, cfg: PruneRun, *, state: str | Path | None = None,
        resume: bool = False) -> tuple[Checkpoint, Result]:
    """Prune the input checkpoint (a classifier) with `cfg`; `state` keeps the recovery's resumable state
    (`<state>.resume.pt`).

    Example:
        >>> ckpt, result = run("vit.pt", "digits", PruneRun(method="depth", ratio=0.25))
        >>> result["params_after"] < result["params_before"]
        True
    """
    (ckpt,) = as_checkpoints(inputs, at_most=1, at_least=1)
    d = data_for(ckpt, data, "prune", classifier=True, subset=cfg.subset)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    original = ckpt.build()
    x, y = batch_of(d.train, cfg.calib), labels_of(d.train, cfg.calib)
    size = ckpt.input.size
    method_cfg = PruneConfig(**{k: getattr(cfg, k) for k in PruneConfig.__dataclass_fields__})
    if cfg.target_macs:  # 0 turns a recipe's target off
        method_cfg = replace(method_cfg, ratio=ratio_for_macs(original, x, y, method_cfg, cfg.target_macs, size),
                             keep=None)
    values = {"checkpoint": ckpt.source, "arch": ckpt.arch, "method": cfg.method, "ratio": method_cfg.ratio,
              "keep": method_cfg.keep, "unit": cfg.unit, "score": cfg.score, "importance": cfg.importance,
              "data": d.name}
    if cfg.sweep is not None:
        values["sweep"] = sweep(original, x, y, method_cfg, cfg.sweep or [i / 10 for i in range(9)], d.test, size)
        if cfg.plot:
            plot_sweep(values["sweep"], cfg.plot, f"{ckpt.arch}: {cfg.method} pruning")
    t = time.perf_counter()
    pruned = prune(copy.deepcopy(original), x, y, method_cfg)
    values["prune_seconds"] = round(time.perf_counter() - t, 2)
    model = pruned.model.eval()
    values["top1_pruned"] = top1(model, d.test)
    recovery = cfg.recovery()
    device, _ = hardware(cfg)
    if recovery is not None:
        original.to(device)  # the teacher of the recovery sits beside the student
        loss = distillation_objective(original) if cfg.distill_from_original else None
        t = time.perf_counter()
        train(model.train(), d.train, recovery, loss_fn=loss, state_path=f"{state}.resume.pt" if state else None,
              resume=resume, description="recovery")
        values["finetune_seconds"] = round(time.perf_counter() - t, 2)
    model.eval()
    values.update(params_before=param_count(original), params_after=param_count(model),
                  macs_before=macs(original, size), macs_after=macs(model, size),
                  top1_before=top1(original, d.test), top1_after=top1(model, d.test),
                  finetune_epochs=cfg.finetune_epochs, distill_from_original=cfg.distill_from_original,
                  threads=torch.get_num_threads(), op=pruned.op, units=pruned.rows)
    rows = measure_rows([("original", original), ("pruned", model)], d.test, d.num_classes, size, d.task,
                        len(ckpt.input.mean), scores={"original": values["top1_before"], "pruned": values["top1_after"]},
                        seconds={"pruned": time.perf_counter() - t0},
                        notes={"pruned": f"{values['top1_pruned']:.2f} before recovery" if recovery else ""},
                        device=device)
    for k, r in (("before", rows[0]), ("after", rows[1])):
        values[f"latency_{k}_ms"], values[f"latency_{k}_ms_batch32"] = r.latency_ms, r.latency_ms_b32
    out = ckpt.derive(model, "prune", [ckpt], spec_of(data), cfg,
                      {k: values[k] for k in ("top1_before", "top1_pruned", "top1_after")},
                      structure=[*ckpt.structure, pruned.op])
    tables = {f"{cfg.method} pruning sweep of {ckpt.arch} (no recovery, test top1)": values["sweep"]} \
        if cfg.sweep is not None else {}
    stuck = [r for r in pruned.rows if r.get("kind") == "not sliceable"]
    notes = [f"{len(stuck)} space(s) could not be sliced and keep their width, e.g. {stuck[0]['space']}: "
             f"{stuck[0]['why']}"] if stuck else []
    notes += pruned_verdict(values)
    return out, Result("prune", "top1", values["top1_after"], values, rows, seconds=time.perf_counter() - t0,
                       tables=tables, notes=notes)


def pruned_verdict(values: dict) -> list[str]:
    """Notes where the pruned model misses what pruning is for: more than a point of top-1 lost against the
    original, or no faster than it at a batch size (timed side by side).

    Example:
        >>> notes = pruned_verdict({"top1_before": 98.5, "top1_after": 96.0, "finetune_epochs": 0,
        ...                         "latency_before_ms": 1.0, "latency_after_ms": 0.7,
        ...                         "latency_before_ms_batch32": 9.0, "latency_after_ms_batch32": 9.2})
        >>> notes[1]
        'the pruned model is no faster than the original at batch 32 (9.20 ms against 9.00)'
    """
    notes = []
    before, after = values["top1_before"], values["top1_after"]
    if after < before - 1:
        fix = ("a longer recovery or a lower --ratio / --target-macs" if values.get("finetune_epochs")
               else "recover it with --finetune-epochs N (and --distill-from-original)")
        notes.append(f"the pruned model's top-1 {after:.2f} is more than a point under the original's {before:.2f}: "
                     f"{fix}")
    for batch, key in (("1", "latency_{}_ms"), ("32", "latency_{}_ms_batch32")):
        old, new = values.get(key.format("before")), values.get(key.format("after"))
        if old is not None and new is not None and new >= old:
            notes.append(f"the pruned model is no faster than the original at batch {batch} ({new:.2f} ms against "
                         f"{old:.2f})")
    return notes


def sweep(original, x, y, cfg: PruneConfig, ratios: list[float], test, size: int) -> list[dict]:
    """Accuracy (no recovery), parameters, MACs and batch-1 speed-up at each ratio."""
    rows = []
    for r in ratios:
        model = prune(copy.deepcopy(original), x, y, replace(cfg, ratio=r, keep=None)).model.eval()
        base, lat = compare_latency([original, model], size, 1, rounds=1)
        rows.append({"ratio": r, "params": param_count(model), "macs": macs(model, size),
                     "speedup_b1": round(base / lat, 3), "top1": top1(model, test)})
    return rows


def plot_sweep(rows: list[dict], path: str, title: str) -> None:
    """Accuracy and relative MACs against the ratio removed (PNG)."""
    from compress.plots import figure, save_figure

    fig, a = figure(5, 3.5)
    a.plot([r["ratio"] for r in rows], [r["top1"] for r in rows], "o-", label="top-1 (no recovery)")
    b = a.twinx()
    b.plot([r["ratio"] for r in rows], [r["macs"] / rows[0]["macs"] for r in rows], "s--", color="gray",
           label="MACs (relative)")
    a.set_xlabel("ratio removed"), a.set_ylabel("top-1 %"), b.set_ylabel("MACs / MACs at first ratio")
    a.set_title(title, fontsize=9)
    save_figure(fig, path)
