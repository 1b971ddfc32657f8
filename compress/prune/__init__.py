"""Pruning that yields physically smaller models: depth (drop residual units), width (slice the spaces of
the alignment layer), low rank (factorise Linear layers). Each returns the edited model and a replayable op
that a checkpoint records in its `structure`, so `compress eval` rebuilds the smaller model.

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

from ..alignment.blocks import find_blocks
from ..alignment.surgery import replace_modules
from ..errors import CompressError
from ..measure import macs
from .depth import SCORES, UNITS, greedy_by_loss, plan_depth, removal_op, unit_similarity
from .importance import CRITERIA, importance
from .lowrank import prune_lowrank
from .width import kept_units, prune_width

METHODS = ("depth", "width", "lowrank")

__all__ = ["PruneConfig", "Pruned", "prune", "METHODS", "CRITERIA", "importance", "kept_units"]


@dataclass
class PruneConfig:
    """What to prune and how.

    Attributes:
        method: depth | width | lowrank.
        ratio: fraction removed in [0, 1): of the units (depth), of every sliceable space's units (width),
            of every factorised layer's parameters (lowrank).
        keep: depth only, units to keep (instead of ratio).
        importance: width criterion (activation | magnitude | taylor | hessian).
        unit: depth unit (block | attn | mlp).
        score: depth ranking: cos (cos(in, out), the paper's) | loss (greedy calibration loss).
        round_to: width: kept channel counts rounded up to a multiple of this (heads are not rounded).
        include_residual: width: also slice residual streams (the embedding / stage width).
        whiten: lowrank: SVD in the calibration inputs' metric.
        exclude: fnmatch patterns of tensors (width) or layers (lowrank) left alone.
    """

    method: str = "width"
    ratio: float = 0.5
    keep: int | None = None
    importance: str = "hessian"  # the best training-free curve on both models (docs/BENCHMARKS.md)
    unit: str = "block"
    score: str = "cos"
    round_to: int = 1
    include_residual: bool = False
    whiten: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise CompressError(f"unknown pruning method '{self.method}'", expected=" | ".join(METHODS))
        if not 0.0 <= self.ratio < 1.0:
            raise CompressError("pruning ratio out of range", expected="0 <= ratio < 1 (the fraction removed)",
                                found=str(self.ratio))
        if self.keep is not None and self.keep < 1:
            raise CompressError("depth pruning would remove every unit", expected="--keep >= 1", found=str(self.keep))
        if self.round_to < 1:
            raise CompressError("invalid --round-to", expected=">= 1", found=str(self.round_to))
        if self.importance not in CRITERIA:
            raise CompressError(f"unknown importance '{self.importance}'", expected=" | ".join(CRITERIA))
        if self.score not in SCORES:
            raise CompressError(f"unknown depth score '{self.score}'", expected=" | ".join(SCORES))
        if self.unit not in UNITS:
            raise CompressError(f"unknown depth unit '{self.unit}'", expected=" | ".join(UNITS))
        self.exclude = tuple(self.exclude)


@dataclass
class Pruned:
    """The pruned model (edited in place), the op that replays its structure, and a row per unit/space/layer."""

    model: nn.Module
    op: dict
    rows: list[dict] = field(default_factory=list)


def prune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PruneConfig) -> Pruned:
    """Prune `model` in place using calibration images `x` (labels `y` for gradient criteria)."""
    example = x[:1]
    if cfg.method == "width":
        model, op, rows = prune_width(model, example, x, y, cfg.ratio, criterion=cfg.importance,
                                      round_to=cfg.round_to, include_residual=cfg.include_residual,
                                      exclude=cfg.exclude)
        return Pruned(model, op, rows)
    if cfg.method == "lowrank":
        model, op, rows = prune_lowrank(model, x, cfg.ratio, cfg.whiten, cfg.exclude)
        return Pruned(model, op, rows)
    scores = unit_similarity(model, example, x, cfg.unit)
    total = len(find_blocks(model, example)) if cfg.unit == "block" else len(scores)
    removed = plan_depth(scores, total, None if cfg.keep is not None else cfg.ratio, cfg.keep)
    losses = {}
    if cfg.score == "loss":
        removed, losses = greedy_by_loss(model, list(scores), len(removed), x, y, cfg.unit)
    op = removal_op(removed, cfg.unit)
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
