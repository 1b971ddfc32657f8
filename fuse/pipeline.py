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
from torch import nn

from compress.checkpoint import Checkpoint, as_checkpoints
from compress.config import parse_subset
from compress.data import as_data, spec_of
from compress.device import resolve_device
from compress.ensemble import Ensemble, LogEnsemble
from compress.errors import CompressError
from compress.losses import distillation_objective
from compress.measure import score, top1_by_class
from compress.probe import refit_classifier
from compress.result import Result, batch_of, below_as_printed, measure_rows
from compress.train import train
from prune.width import narrow

from .config import FuseRun
from .fusion import fuse_models, recompute_batchnorm, resolve_auto, vanilla_average

__all__ = ["run", "FuseRun"]

IN_PLACE = 0.9  # share of units the alignment leaves in place above which the parents share their start


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
    d = as_data(data, first.input, first.task, cfg.subset)
    images = batch_of(d.train, cfg.calib)
    anchor_i = cfg.anchor % len(ckpts)
    anchor_ckpt = ckpts[anchor_i]
    metric = "miou" if d.task == "segmentation" else "top1"
    same_shapes = all(m.state_dict()[k].shape == v.shape for m in models for k, v in models[0].state_dict().items())
    cfg, family = resolve_auto(cfg, models[anchor_i], images[:1], equal_widths=cfg.width == 1 and same_shapes)
    measured: dict[str, tuple[float, list[float] | None]] = {}  # name -> (test metric, per-class top-1)
    rows: list[tuple[str, nn.Module]] = []

    def record(name: str, model: nn.Module) -> float:
        """Score `model` now (it may be finetuned afterwards) and list it for the table."""
        if d.task == "segmentation":
            measured[name] = (score(model, d.test, d.num_classes, d.task), None)
        else:
            measured[name] = top1_by_class(model, d.test, d.num_classes)
        rows.append((name, model))
        return measured[name][0]

    parents = [record(f"parent {i}", m) for i, m in enumerate(models)]
    values = {"models": names, "arch": first.arch, "metric": metric, "solver": cfg.solver, "softness": cfg.softness,
              "tokens": cfg.tokens, "ground": cfg.ground, "residual": cfg.residual, "attention": cfg.attention,
              "stats_precision": cfg.stats_precision, "repair": cfg.repair, "merge": cfg.merge, "auto": family,
              "width": cfg.width, "parents": parents,
              "ensemble": record("output ensemble", Ensemble(models)), "vanilla": None, "narrowed": None,
              "subset": cfg.subset, "finetune_images": len(d.train)}
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
        values[name] = record(label, baseline)
    t = time.perf_counter()
    fused_state, report = fuse_models(models, images, cfg, target)
    fused = copy.deepcopy(target) if target is not None else anchor_ckpt.build()
    fused.load_state_dict(fused_state)
    bn = recompute_batchnorm(fused, images)
    timings["fuse"] = time.perf_counter() - t
    bf16 = ", bf16 statistics" if cfg.stats_precision == "bf16" else ""  # only activation costs take it
    one_shot = (f"OT one-shot ({cfg.ground}{bf16}, {cfg.solver}{', RegMean' if cfg.merge == 'regmean' else ''}"
                f"{', REPAIR' if cfg.repair else ''})")
    values["ot"] = record(one_shot, fused)
    in_place = report.in_place  # a property over every map: read once
    values.update(ot_finetuned=None, vanilla_finetuned=None, narrowed_finetuned=None, batchnorm_recomputed=bn,
                  spaces=report.spaces, unmatched_spaces=report.unmatched, unaligned_spaces=report.unaligned,
                  fallbacks=report.fallbacks,
                  repaired_layers=report.repaired, regmean_layers=report.regmean, partners=report.partners,
                  units_in_place=round(in_place, 4))
    seconds = {one_shot: timings["fuse"]}
    if ft is not None:
        def finetuned(model: nn.Module, what: str, tag: str, loss_fn=None) -> float:
            t = time.perf_counter()
            train(model.train(), d.train, ft, loss_fn=loss_fn, description=f"finetune {what}",
                  state_path=f"{state}.{tag}.resume.pt" if state else None, resume=resume)
            seconds[f"{what} + {ft.epochs} ep"] = time.perf_counter() - t
            return record(f"{what} + {ft.epochs} ep", model)

        values["ot_finetuned"] = finetuned(fused, "OT", "finetune")
        seconds[f"OT + {ft.epochs} ep"] += timings["fuse"]
        if baseline is not None:
            values[f"{name}_finetuned"] = finetuned(baseline, label, "baseline")
        if cfg.baselines:  # what a user would do instead of fusing
            values["parents_finetuned"] = [finetuned(copy.deepcopy(m), f"parent {i}", f"parent{i}")
                                           for i, m in enumerate(models)]
            torch.manual_seed(cfg.seed)
            fresh = anchor_ckpt.instantiate() if target is None else _fresh_like(target)
            # alpha 0.5, T 1: the better of the two KD settings measured with the ensemble teacher (97.57 vs 97.31)
            values["ensemble_distilled"] = finetuned(fresh, "ensemble distilled into a fresh model", "distilled",
                                                     distillation_objective(LogEnsemble(models), 0.5, 1.0))
    timings.update(trace=report.seconds_trace, statistics=report.seconds_stats, ot_solve=report.seconds_solve,
                   apply=report.seconds_apply, regmean=report.seconds_regmean, repair=report.seconds_repair)
    values["seconds_by_stage"] = {k: round(v, 3) for k, v in timings.items()}
    values["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    notes = [f"fallback: {f}" for f in report.fallbacks]
    if report.unaligned:  # the alignment layer's rules were wrong there: those axes are averaged unaligned
        what = ("no space could be aligned: this fusion is a vanilla average" if not report.spaces else
                f"{len(report.unaligned)} spaces failed the invariance check and are averaged without alignment")
        notes.append(f"{what} ({', '.join(report.unaligned[:6])}{', ...' if len(report.unaligned) > 6 else ''})")
    if family:
        notes.append(f"auto settings for the {family}")
    if in_place > IN_PLACE:  # from random inits about 1/n of the units stay in place
        notes.append(f"the alignment left {in_place:.1%} of the units where they were: the parents share their "
                     "start (finetuned from the same weights), so their merge, not the alignment, decides the result")
    if cfg.baselines and d.task == "classification":  # one parent and the shared labels, in seconds
        values["parents_refit"] = []
        for i, m in enumerate(models):
            t, what = time.perf_counter(), f"parent {i}, classifier re-fit"
            try:
                refit = refit_classifier(copy.deepcopy(m), d.train)
            except CompressError as e:
                notes.append(f"no classifier re-fit baseline: {e}")
                break
            seconds[what] = time.perf_counter() - t
            values["parents_refit"].append(record(what, refit))
    out_score = values["ot_finetuned"] if ft is not None else values["ot"]
    if ft is None:
        notes += needs_finetune(values["ot"], parents, names, spec_of(data), cfg.subset)
    notes += fused_verdict(values)
    if cfg.plot:
        plot_maps(report.maps, cfg.plot)
    result_rows = measure_rows(rows, d.test, d.num_classes, first.input.size, d.task, len(first.input.mean),
                               seconds=seconds, scores={k: v[0] for k, v in measured.items()},
                               device=resolve_device(cfg.device))
    tables = {}
    if d.task == "classification":
        values["per_class"] = {k: [round(a, 2) for a in v[1]] for k, v in measured.items()}
        final = f"OT + {ft.epochs} ep" if ft is not None else one_shot
        notes += lost_classes([measured[f"parent {i}"][1] for i in range(len(models))], measured[final][1],
                              "the fused model" + (" after its finetune" if ft is not None else ""))
        groups = class_groups(ckpts, d.num_classes)
        if groups:
            values["class_groups"] = groups
            tables[f"test {metric} per class group (the classes each parent was trained on)"] = [
                {"model": k, **{g: _mean([v[1][c] for c in cs]) for g, cs in groups.items()}, "all": v[0]}
                for k, v in measured.items()]
    ckpt = anchor_ckpt.derive(fused, "fuse", ckpts, spec_of(data), cfg, {
        k: values[k] for k in ("ot", "ot_finetuned", "vanilla", "ensemble")}, structure=structure)
    return ckpt, Result("fuse", metric, out_score, values, result_rows, notes, time.perf_counter() - t0, tables)


def needs_finetune(fused: float, parents: list[float], models: list[str], data: str, subset: str | None = None
                   ) -> list[str]:
    """A note, with the command, where the one-shot fused model is more than 10 points under the best parent:
    it needs a finetune before it is usable (on the same data and subset the fusion was given).

    Example:
        >>> needs_finetune(22.7, [97.2, 98.0], ["a.pt", "b.pt"], "digits")[0][:62]
        'the one-shot fused model (22.7%) is far below the best parent'
    """
    if fused >= max(parents) - 10:
        return []
    return [f"the one-shot fused model ({fused:.1f}%) is far below the best parent ({max(parents):.1f}%): finetune it "
            f"before use, e.g. compress fuse --models {' '.join(models)} --data {data}"
            f"{f' --subset {subset}' if subset else ''} --finetune-epochs 4 --finetune-batch-size 16 --out fused.pt"]


def fused_verdict(values: dict) -> list[str]:
    """Notes where the finetuned fused model ends below what the user has without fusing (the best parent as it
    is, given the same finetune, or with its classifier re-fit on the same data; the plain average or narrowed
    anchor given the finetune) or below itself before the finetune.

    Example:
        >>> fused_verdict({"metric": "top1", "parents": [65.2, 64.5], "ot_finetuned": 54.7})
        ['the fused model after its finetune (54.70 top1) is below parent 0 as it is (65.20): keep that parent']
    """
    fused = values.get("ot_finetuned")
    if fused is None:
        return []
    rivals = []
    for key, how, advice in (("parents", "as it is", "keep that parent"),
                             ("parents_finetuned", "given the same finetune", "finetune that parent instead"),
                             ("parents_refit", "with its classifier re-fit on the same data",
                              "re-fit that parent's classifier instead")):
        scores = values.get(key) or []
        if scores:  # the best parent of each kind
            i = max(range(len(scores)), key=scores.__getitem__)
            rivals.append((f"parent {i} {how}", scores[i], advice))
    if values.get("vanilla_finetuned") is not None:
        rivals.append(("the vanilla average given the same finetune", values["vanilla_finetuned"],
                       _against_the_average(values)))
    if values.get("narrowed_finetuned") is not None:
        rivals.append(("the narrowed anchor given the same finetune", values["narrowed_finetuned"],
                       "alignment did not pay here"))
    if values.get("ot") is not None:
        rivals.append(("itself before the finetune", values["ot"],
                       "the finetune undid part of the merge: lower --finetune-lr, or keep the one-shot fusion"))
    return [f"the fused model after its finetune ({fused:.2f} {values['metric']}) is below {what} ({v:.2f}): {advice}"
            for what, v, advice in rivals if below_as_printed(fused, v)]


def _against_the_average(values: dict) -> str:
    """What to try when the plain average, finetuned alike, beat the fusion. Parents that share their start keep
    their units in place, so the alignment changed little and the merge is what differs: RegMean, or with the
    plain average, REPAIR (without it the fusion is then the vanilla average)."""
    if (values.get("units_in_place") or 0) <= IN_PLACE:
        return "alignment did not pay here"
    if values.get("merge") != "mean":
        return "the merge's settings did not pay here (try --merge mean)"
    if values.get("repair"):
        return "REPAIR did not pay here: with the units in place, --no-repair gives the vanilla average"
    return "alignment did not pay here"


def lost_classes(parents: list[list[float]], fused: list[float], what: str = "the fused model",
                 knew: float = 50.0) -> list[str]:
    """A note naming the classes a parent knew (top-1 >= `knew` there) on which `fused` scores under half of that
    parent's: what one site contributed, lost in the merge (four digits ViTs on their own class mixes, fused
    one-shot: 0.0% on the two classes only one of them was trained on). Empty when no class is lost.

    Example:
        >>> lost_classes([[99.0, 10.0], [20.0, 98.0]], [90.0, 30.0])[0][:96]
        "the fused model scores under half of the best parent's top-1 on 1 class: class 1 30.0 (parent 1:"
    """
    lost = []
    for c, top1 in enumerate(fused):
        best = max(range(len(parents)), key=lambda i: parents[i][c])
        if parents[best][c] >= knew and top1 < parents[best][c] / 2:
            lost.append(f"class {c} {top1:.1f} (parent {best}: {parents[best][c]:.1f})")
    if not lost:
        return []
    many = len(lost) > 1
    named = ", ".join(lost[:8]) + (f", and {len(lost) - 8} more" if len(lost) > 8 else "")
    return [f"{what} scores under half of the best parent's top-1 on {len(lost)} class{'es' if many else ''}: "
            f"{named}. What the parents knew there is lost: finetune on images of "
            f"{'those classes' if many else 'that class'}, or keep the parent for {'them' if many else 'it'}"]


def class_groups(ckpts: list[Checkpoint], num_classes: int) -> dict[str, list[int]]:
    """The class groups the parents were trained on (their `--subset classes=...`), and the rest; empty when
    no parent was trained on a class subset."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(ckpts):
        spec = parse_subset((c.provenance.get("settings") or {}).get("subset"))
        if spec and spec.classes:
            label = f"classes {_span(spec.classes)}"
            groups[label if label not in groups else f"{label} (parent {i})"] = list(spec.classes)
    rest = sorted(set(range(num_classes)) - {k for cs in groups.values() for k in cs})
    if groups and rest:
        groups[f"classes {_span(rest)}"] = rest
    return groups


def _span(classes) -> str:
    """[0, 1, 2, 3, 4, 7] -> '0-4+7' (the --subset spelling)."""
    runs: list[list[int]] = []
    for c in sorted(classes):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return "+".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]  # classes without a test image are NaN
    return sum(xs) / len(xs) if xs else float("nan")


def _fresh_like(model: nn.Module) -> nn.Module:
    """A copy of `model` with every parameter re-initialised (the narrowed architecture, from scratch)."""
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


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
