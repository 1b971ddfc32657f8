"""`compress fuse` as a function: fusion, its baselines, an optional finetune, and the measurements.

Example:
    >>> ckpt, result = run(["a.pt", "b.pt"], "digits", FuseRun(ground="wts", finetune_epochs=4))
    >>> save(ckpt, "fused.pt"); result["ot"], result["ot_finetuned"], result["vanilla_finetuned"]
"""

from __future__ import annotations

import copy
import resource
import time
from pathlib import Path

import torch

from compress.checkpoint import Checkpoint, as_checkpoints
from compress.data import as_data, spec_of
from compress.device import resolve_device
from compress.errors import CompressError
from compress.measure import score
from compress.result import Result, batch_of, measure_rows
from compress.train import train
from prune.width import narrow

from .config import FuseRun
from .fusion import Ensemble, fuse_models, recompute_batchnorm, vanilla_average

__all__ = ["run", "FuseRun"]


def run(inputs, data, cfg: FuseRun, *, state: str | Path | None = None,
        resume: bool = False) -> tuple[Checkpoint, Result]:
    """Fuse the input checkpoints (one architecture) into the anchor's basis (or into the anchor narrowed to
    `cfg.width`), with the baselines a user would compare: each parent, their output ensemble, and the
    vanilla average (or the narrowed anchor), finetuned with the same budget when `cfg.finetune_epochs`.
    `state` keeps the finetunes' resumable states (`<state>.finetune.resume.pt`, `<state>.baseline.resume.pt`).

    Example:
        >>> ckpt, result = run(["a.pt", "b.pt"], "digits", FuseRun(ground="wts", finetune_epochs=4))
        >>> result["ot"], result["ot_finetuned"], [r.name for r in result.rows]
    """
    ckpts = as_checkpoints(inputs, at_least=2)
    names = [c.source or f"model {i}" for i, c in enumerate(ckpts)]
    first = ckpts[0]
    for name, c in zip(names[1:], ckpts[1:]):  # every mismatch is named before any work
        for what, a, b in (("architecture", first.arch, c.arch), ("classes", first.num_classes, c.num_classes),
                           ("task", first.task, c.task), ("input spec", vars(first.input), vars(c.input))):
            if a != b:
                raise CompressError(f"cannot fuse {names[0]} with {name}: different {what}", expected=str(a),
                                    found=str(b))
    ft = cfg.finetune()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    timings = {}
    models = [c.build() for c in ckpts]
    d = as_data(data, first.input, first.task)
    images = batch_of(d.train, cfg.calib)
    anchor_i = cfg.anchor % len(ckpts)
    anchor_ckpt = ckpts[anchor_i]
    metric = "miou" if d.task == "segmentation" else "top1"

    def test(model):
        return score(model, d.test, d.num_classes, d.task)

    parents = [test(m) for m in models]
    ensemble = Ensemble(models)
    values = {"models": names, "arch": first.arch, "metric": metric, "solver": cfg.solver, "softness": cfg.softness,
              "tokens": cfg.tokens, "ground": cfg.ground, "residual": cfg.residual, "attention": cfg.attention,
              "repair": cfg.repair, "width": cfg.width, "parents": parents, "ensemble": test(ensemble),
              "vanilla": None, "narrowed": None}
    same_shapes = all(m.state_dict()[k].shape == v.shape for m in models for k, v in models[0].state_dict().items())
    # the baseline that keeps the fused model's size: vanilla averaging, or with --width the anchor narrowed
    baseline, target, structure = None, None, list(anchor_ckpt.structure)
    if cfg.width < 1:
        target, op = narrow(models[anchor_i], images, cfg.width)
        structure.append(op)
        baseline = copy.deepcopy(target)
        recompute_batchnorm(baseline, images)
    elif same_shapes:
        baseline = anchor_ckpt.build()
        baseline.load_state_dict(vanilla_average(models))
        recompute_batchnorm(baseline, images)
    name = "narrowed" if target is not None else "vanilla"
    label = f"anchor narrowed to {cfg.width:g}" if target is not None else "vanilla average"
    if baseline is not None:
        values[name] = test(baseline)
    t = time.perf_counter()
    fused_state, report = fuse_models(models, images, cfg, target)
    fused = copy.deepcopy(target) if target is not None else anchor_ckpt.build()
    fused.load_state_dict(fused_state)
    bn = recompute_batchnorm(fused, images)
    timings["fuse"] = time.perf_counter() - t
    values["ot"] = test(fused)
    values.update(ot_finetuned=None, vanilla_finetuned=None, narrowed_finetuned=None, batchnorm_recomputed=bn,
                  spaces=report.spaces, unmatched_spaces=report.unmatched, fallbacks=report.fallbacks,
                  repaired_layers=report.repaired, partners=report.partners)
    rows = [(f"parent {i}", m) for i, m in enumerate(models)] + [("output ensemble", ensemble)]
    scores = {f"parent {i}": v for i, v in enumerate(parents)} | {"output ensemble": values["ensemble"]}
    if baseline is not None:
        rows.append((label, baseline))
        scores[label] = values[name]
    rows.append((f"OT one-shot ({cfg.solver})", fused))
    scores[f"OT one-shot ({cfg.solver})"] = values["ot"]
    seconds = {f"OT one-shot ({cfg.solver})": timings["fuse"]}
    if ft is not None:
        t = time.perf_counter()
        train(fused.train(), d.train, ft, state_path=f"{state}.finetune.resume.pt" if state else None,
              resume=resume, description="finetune OT-fused")
        timings["finetune"] = time.perf_counter() - t
        values["ot_finetuned"] = test(fused)
        if baseline is not None:
            train(baseline.train(), d.train, ft, state_path=f"{state}.baseline.resume.pt" if state else None,
                  resume=resume, description=f"finetune {name}")
            values[f"{name}_finetuned"] = test(baseline)
            scores[f"{label} + {ft.epochs} ep"] = values[f"{name}_finetuned"]
            rows.append((f"{label} + {ft.epochs} ep", baseline))
        rows.append((f"OT + {ft.epochs} ep", fused))
        scores[f"OT + {ft.epochs} ep"] = values["ot_finetuned"]
        seconds[f"OT + {ft.epochs} ep"] = timings["fuse"] + timings["finetune"]
    timings.update(trace=report.seconds_trace, statistics=report.seconds_stats, ot_solve=report.seconds_solve,
                   apply=report.seconds_apply, repair=report.seconds_repair)
    values["seconds_by_stage"] = {k: round(v, 3) for k, v in timings.items()}
    values["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    notes = [f"fallback: {f}" for f in report.fallbacks]
    out_score = values["ot_finetuned"] if ft is not None else values["ot"]
    best = max(parents)
    if ft is None and values["ot"] < best - 10:
        notes.append(f"the one-shot fused model ({values['ot']:.1f}%) is far below the best parent ({best:.1f}%): "
                     "finetune it before use (--finetune-epochs 4 --finetune-batch-size 16, or "
                     "recipes/fuse-vit.yaml)")
    if cfg.plot:
        plot_maps(report.maps, cfg.plot)
    result_rows = measure_rows(rows, d.test, d.num_classes, first.input.size, d.task, len(first.input.mean),
                               seconds=seconds, scores=scores, device=resolve_device(cfg.device))
    ckpt = anchor_ckpt.derive(fused, "fuse", ckpts, spec_of(data), cfg, {
        k: values[k] for k in ("ot", "ot_finetuned", "vanilla", "ensemble")}, structure=structure)
    return ckpt, Result("fuse", metric, out_score, values, result_rows, notes, time.perf_counter() - t0)


def plot_maps(maps: dict, path: str, most: int = 8) -> None:
    """The largest transport maps as heatmaps (PNG)."""
    from compress.plots import figure, save_figure

    items = sorted(maps.items(), key=lambda kv: -kv[1].numel())[:most]
    cols = (len(items) + 1) // 2
    fig, axs = figure(3 * cols, 6, 2, cols)
    for a, (name, t) in zip(axs.flat, items):
        a.imshow(t.numpy() * t.shape[0], cmap="viridis", vmin=0, vmax=1)
        a.set_title(name[:28], fontsize=7)
        a.set_xticks([]), a.set_yticks([])
    save_figure(fig, path)
