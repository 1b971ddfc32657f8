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

from ..alignment.blocks import find_blocks
from ..alignment.surgery import replace_modules
from ..alignment.taps import channel_axis
from ..errors import CompressError

UNITS = ("block", "attn", "mlp")
SCORES = ("cos", "loss")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = channel_axis(a)
    return F.cosine_similarity(a.float(), b.float(), dim=d).flatten(1).mean(1).sum()


@torch.no_grad()
def unit_similarity(model: nn.Module, example: torch.Tensor, x: torch.Tensor, unit: str = "block",
                    batch_size: int = 64) -> dict[str, float]:
    """Mean cos(input, output) of every removable unit, by module path.

    Example:
        >>> unit_similarity(vit, torch.randn(1, 3, 32, 32), images)
        {'blocks.0': 0.41, 'blocks.1': 0.83, 'blocks.2': 0.88, 'blocks.3': 0.79}
    """
    if unit not in UNITS:
        raise CompressError(f"unknown depth unit '{unit}'", expected=" | ".join(UNITS))
    modules = dict(model.named_modules())
    blocks = [b.name for b in find_blocks(model, example)]
    if unit != "block":
        blocks = [b for b in blocks if all(hasattr(modules[b], c) for c in ("attn", "mlp", "norm2"))]
        if not blocks:
            raise CompressError(f"no block with separate attention and MLP branches for --unit {unit}",
                                expected="transformer blocks with attn, mlp and norm2 (timm's Block)",
                                found=type(model).__name__, hint="use --unit block")
    seen: dict[str, list] = {b: [None, None, None] for b in blocks}  # input, mid, output of the last batch
    totals: dict[str, float] = {}
    handles = []
    for b in blocks:
        m = modules[b]
        handles.append(m.register_forward_pre_hook(lambda mod, a, b=b: seen[b].__setitem__(0, a[0])))
        handles.append(m.register_forward_hook(lambda mod, a, out, b=b: seen[b].__setitem__(2, out)))
        if unit != "block":
            handles.append(m.norm2.register_forward_pre_hook(lambda mod, a, b=b: seen[b].__setitem__(1, a[0])))
    was_training = model.training
    model.eval()
    n = 0
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
            n += len(x[i:i + batch_size])
            for b, (inp, mid, out) in seen.items():
                if unit == "block":
                    pair = (inp, out) if isinstance(out, torch.Tensor) and out.shape == inp.shape else None
                else:  # Swin flattens its map to tokens between the branches
                    mid = mid.reshape(inp.shape) if mid.numel() == inp.numel() else mid
                    pair = (inp, mid) if unit == "attn" else (mid, out.reshape(mid.shape))
                if pair is not None:
                    totals[b] = totals.get(b, 0.0) + _cos(*pair).item()
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {b: v / n for b, v in totals.items()}


def plan_depth(scores: dict[str, float], total_units: int, ratio: float | None = None,
               keep: int | None = None) -> list[str]:
    """The units to remove: the most similar ones, `ratio` of all units or down to `keep` units."""
    remove = total_units - keep if keep is not None else int(round(ratio * total_units))
    if remove >= total_units:
        raise CompressError("depth pruning would remove every unit", expected=f"keep >= 1 of {total_units}",
                            found=f"remove {remove}")
    if remove > len(scores):
        raise CompressError(f"cannot remove {remove} units", expected=f"at most {len(scores)}: only those keep "
                            "their input's shape can be replaced by a pass-through", found=f"{total_units} units")
    return sorted(scores, key=scores.get, reverse=True)[:max(remove, 0)]


def removal_op(names: list[str], unit: str) -> dict:
    """The replayable op that removes `names` (blocks become a pass-through, branches contribute zero and
    their pre-norm is skipped)."""
    if unit == "block":
        return {"op": "replace", "modules": {n: "skip" for n in names}}
    norm = {"attn": "norm1", "mlp": "norm2"}[unit]
    mods = {}
    for n in names:
        mods[f"{n}.{unit}"] = "zero"
        mods[f"{n}.{norm}"] = "identity"
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
    def loss(extra: list[str]) -> float:
        with _removed(model, removal_op(removed + extra, unit)["modules"]):
            return sum(F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum").item()
                       for i in range(0, len(x), batch_size)) / len(x)

    was_training = model.training
    model.eval()
    removed: list[str] = []
    alone: dict[str, float] = {}
    try:
        for step in range(remove):
            trial = {u: loss([u]) for u in units if u not in removed}
            if step == 0:
                alone = dict(trial)
            removed.append(min(trial, key=trial.get))
        if not alone:
            alone = {u: loss([u]) for u in units}
    finally:
        model.train(was_training)
    return removed, alone
