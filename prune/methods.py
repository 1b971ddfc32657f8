"""The pruning methods, registered in `METHODS`: depth (drop residual units), width (slice the spaces of the
alignment layer), low rank (factorise Linear layers). Each edits the model in place and returns a replayable
op that a checkpoint records in its `structure`, so `compress eval` rebuilds the smaller model.

Example:
    >>> result = prune(vit, images, labels, PruneConfig(method="width", ratio=0.5))
    >>> result.model, result.op["op"]
    (VisionTransformer(...), 'resize')
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from compress.alignment.blocks import find_blocks
from compress.alignment.surgery import replace_modules
from compress.errors import CompressError
from compress.measure import macs

from .config import METHODS, PruneConfig
from .depth import greedy_by_loss, plan_depth, removal_op, unit_similarity
from .lowrank import prune_lowrank
from .width import prune_width


@dataclass
class Pruned:
    """The pruned model (edited in place), the op that replays its structure, and a row per unit/space/layer."""

    model: nn.Module
    op: dict
    rows: list[dict] = field(default_factory=list)


def prune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PruneConfig) -> Pruned:
    """Prune `model` in place with `cfg.method` using calibration images `x` (labels `y` for gradient
    criteria and the depth loss score)."""
    return METHODS.get(cfg.method)(model, x, y, cfg)


@METHODS.register("width")
def width(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PruneConfig) -> Pruned:
    """Slice every sliceable space to `1 - ratio` of its units, the most important ones."""
    model, op, rows = prune_width(model, x[:1], x, y, cfg.ratio, criterion=cfg.importance, round_to=cfg.round_to,
                                  include_residual=cfg.include_residual, exclude=tuple(cfg.exclude))
    return Pruned(model, op, rows)


@METHODS.register("lowrank")
def lowrank(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PruneConfig) -> Pruned:
    """Factorise every Linear but the classifier at the rank removing `ratio` of its parameters."""
    model, op, rows = prune_lowrank(model, x, cfg.ratio, cfg.whiten, tuple(cfg.exclude))
    return Pruned(model, op, rows)


@METHODS.register("depth")
def depth(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PruneConfig) -> Pruned:
    """Replace the most redundant residual units (blocks, or their attention / MLP branches) by a pass-through."""
    blocks = find_blocks(model, x[:1])
    scores = unit_similarity(model, x[:1], x, cfg.unit)
    total = len(blocks) if cfg.unit == "block" else len(scores)
    removed = plan_depth(scores, total, None if cfg.keep is not None else cfg.ratio, cfg.keep)
    losses = {}
    if cfg.score == "loss":
        removed, losses = greedy_by_loss(model, list(scores), len(removed), x, y, cfg.unit)
    op = removal_op(removed, cfg.unit, blocks)
    replace_modules(model, op["modules"])
    rows = [{"unit": n if cfg.unit == "block" else f"{n}.{cfg.unit}", "cos_in_out": round(v, 4),
             **({"loss_without": round(losses[n], 4)} if losses else {}), "removed": n in removed}
            for n, v in scores.items()]
    return Pruned(model, op, rows)


def ratio_for_macs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PruneConfig, target: float,
                   input_size: int, steps: int = 12) -> float:
    """The smallest ratio whose pruned model has at most (1 - target) of `model`'s MACs (bisection; MACs
    fall monotonically with the ratio).

    Example:
        >>> ratio_for_macs(vit, images, labels, PruneConfig("width"), target=0.5, input_size=32)
        0.59
    """
    if not 0.0 < target < 1.0:
        raise CompressError("MACs target out of range", expected="0 < target < 1 (the fraction removed)",
                            found=str(target))
    budget = (1 - target) * macs(model, input_size)

    def fits(r: float) -> bool:
        return macs(prune(copy.deepcopy(model), x, y, replace(cfg, ratio=r, keep=None)).model, input_size) <= budget

    lo, hi = 0.0, 0.99
    if not fits(hi):
        raise CompressError(f"{cfg.method} pruning cannot remove {target:.0%} of the MACs",
                            expected="a smaller target, or --include-residual to slice the streams too")
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return round(hi, 4)
