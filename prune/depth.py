"""Training-free depth pruning: drop the residual units whose output is most similar to their input.

A unit is a whole block, or one branch of a transformer block (`attn` / `mlp`). Its redundancy is the
mean cosine similarity, over calibration images and positions, between what enters and what leaves it
(SparseUnifiedModel: block cos(in, out); attention cos(in, mid); MLP cos(mid, out), mid being the stream
between the two branches). The units with the highest similarity are replaced by a pass-through.

`score="loss"` ranks by what removal does instead: units are removed greedily, each time the one whose
removal gives the lowest calibration cross-entropy (still no training). On small ViTs cos(in, out) is a
weak predictor of harm (docs/BENCHMARKS.md), and this costs one forward of the calibration set per
candidate and step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from compress.alignment.blocks import Block, find_blocks
from compress.alignment.hooks import evaluating, hooks
from compress.alignment.surgery import replace_modules
from compress.alignment.taps import channel_axis
from compress.errors import CompressError

from .config import UNITS


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = channel_axis(a)
    return F.cosine_similarity(a.float(), b.float(), dim=d).flatten(1).mean(1).sum()


@torch.no_grad()
def unit_similarity(model: nn.Module, example: torch.Tensor, x: torch.Tensor, unit: str = "block",
                    batch_size: int = 64) -> dict[str, float]:
    """Mean cos(input, output) of every removable unit, by block path. A branch unit (`attn` / `mlp`)
    compares the residual stream before the branch (its pre-norm's input) with the stream after it (the
    next branch's pre-norm input, or the block's output); the alignment layer finds the branches.

    Example:
        >>> unit_similarity(vit, torch.randn(1, 3, 32, 32), images)
        {'blocks.0': 0.41, 'blocks.1': 0.83, 'blocks.2': 0.88, 'blocks.3': 0.79}
    """
    if unit not in UNITS:
        raise CompressError(f"unknown depth unit '{unit}'", expected=" | ".join(UNITS))
    blocks = find_blocks(model, example)
    if unit != "block":
        blocks = [b for b in blocks if b.branch(unit) is not None]
        if not blocks:
            raise CompressError(f"no block with a separate {unit} branch for --unit {unit}",
                                expected="residual blocks with pre-norm branches (transformer, Mixer blocks)",
                                found=type(model).__name__, hint="use --unit block")
    seen: dict[str, list] = {b.name: [None, None] for b in blocks}  # the stream before / after the unit
    pre, post = {}, {}
    for b in blocks:
        if unit == "block":
            before, after = b.name, None
        else:
            br = b.branch(unit)
            k = b.branches.index(br)
            before = br.norm or br.module
            after = (b.branches[k + 1].norm or b.branches[k + 1].module) if k + 1 < len(b.branches) else None
        pre[before] = lambda mod, a, b=b.name: seen[b].__setitem__(0, a[0])
        if after is None:
            post[b.name] = lambda mod, a, out, b=b.name: seen[b].__setitem__(1, out)
        else:
            pre[after] = lambda mod, a, b=b.name: seen[b].__setitem__(1, a[0])
    totals: dict[str, float] = {}
    n = 0
    with hooks(model, pre=pre, post=post), evaluating(model):
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
            n += len(x[i:i + batch_size])
            for b, (inp, out) in seen.items():
                if not _passes_through(inp, out):
                    continue  # a block that changes its shape (or reads a list: DenseNet) cannot become a pass-through
                # Swin flattens its map to tokens between the branches
                totals[b] = totals.get(b, 0.0) + _cos(inp, out.reshape(inp.shape)).item()
    return {b: v / n for b, v in totals.items()}


def _passes_through(inp, out) -> bool:
    """Whether a pass-through can stand in for a unit: a tensor in, one of the same size out, with the same
    channels (Swin's map and its flattened tokens agree on the last axis; PNASNet's cell that halves the
    map and quadruples the channels has as many elements, and is not one)."""
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor) or out.numel() != inp.numel():
        return False
    return inp.shape == out.shape or inp.shape[-1] == out.shape[-1]


def plan_depth(scores: dict[str, float], total_units: int, ratio: float | None = None,
               keep: int | None = None) -> list[str]:
    """The units to remove: the most similar ones, `ratio` of all units or down to `keep` units."""
    remove = total_units - keep if keep is not None else int(round(ratio * total_units))
    if remove >= total_units:
        raise CompressError("depth pruning would remove every unit", expected=f"keep >= 1 of {total_units}",
                            found=f"remove {remove}")
    if keep is None and ratio and remove < 1:  # a ratio rounding to no unit (VGG: one block) is no pruned model
        raise CompressError(f"depth pruning would remove no unit: {total_units} unit(s) found",
                            expected=f"a --ratio that removes at least one (>= {1 / (2 * total_units):.2g}) or "
                                     f"--keep < {total_units}" if total_units > 1 else
                                     "a model with more than one block (the alignment layer found one)",
                            found=f"ratio {ratio}")
    if remove > len(scores):
        raise CompressError(f"cannot remove {remove} units", expected=f"at most {len(scores)}: only those keep "
                            "their input's shape can be replaced by a pass-through", found=f"{total_units} units")
    return sorted(scores, key=scores.get, reverse=True)[:max(remove, 0)]


def removal_op(names: list[str], unit: str, blocks: list[Block] = ()) -> dict:
    """The replayable op that removes `names`: blocks become a pass-through; a branch contributes zero and
    its pre-norm is skipped (the branches of `blocks`, from the alignment layer)."""
    if unit == "block":
        return {"op": "replace", "modules": {n: "skip" for n in names}}
    branches = {b.name: b.branch(unit) for b in blocks}
    mods = {}
    for n in names:
        br = branches.get(n)
        if br is None:
            raise CompressError(f"block '{n}' has no {unit} branch", expected="a block with pre-norm branches")
        mods[br.module] = "zero"
        if br.norm:
            mods[br.norm] = "identity"
    return {"op": "replace", "modules": mods}


@contextlib.contextmanager
def _removed(model: nn.Module, modules: dict[str, str]):
    """`model` with `modules` replaced for the duration of the block, then restored."""
    originals = {p: model.get_submodule(p) for p in modules}
    replace_modules(model, modules)
    try:
        yield model
    finally:
        for path, m in originals.items():
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, m)


@torch.no_grad()
def greedy_by_loss(model: nn.Module, units: list[str], remove: int, x: torch.Tensor, y: torch.Tensor,
                   unit: str = "block", batch_size: int = 128) -> tuple[list[str], dict[str, float]]:
    """Remove `remove` of `units` one at a time, each time the one whose removal keeps the calibration
    cross-entropy lowest. Returns (removed units, the loss with each unit removed alone).

    Example:
        >>> greedy_by_loss(vit, ["blocks.0", "blocks.1", "blocks.2"], 1, images, labels)
        (['blocks.2'], {'blocks.0': 2.1, 'blocks.1': 0.7, 'blocks.2': 0.5})
    """
    blocks = find_blocks(model, x[:1])

    def loss(extra: list[str]) -> float:
        with _removed(model, removal_op(removed + extra, unit, blocks)["modules"]):
            return sum(F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum").item()
                       for i in range(0, len(x), batch_size)) / len(x)

    removed: list[str] = []
    alone: dict[str, float] = {}
    with evaluating(model):
        for step in range(remove):
            trial = {u: loss([u]) for u in units if u not in removed}
            if step == 0:
                alone = dict(trial)
            removed.append(min(trial, key=trial.get))
        if not alone:
            alone = {u: loss([u]) for u in units}
    return removed, alone
