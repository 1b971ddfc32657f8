"""Width pruning: keep the most important units of every sliceable space, then slice the weights."""

from __future__ import annotations

import copy
from fnmatch import fnmatch
from math import ceil

import torch
from torch import nn

from compress.alignment.spaces import Space, SpaceGraph, find_spaces
from compress.alignment.surgery import consumers, removable_spaces, resize
from compress.errors import CompressError

from .config import check_width
from .importance import importance


def kept_units(size: int, ratio: float, round_to: int = 1) -> int:
    """Units kept when `ratio` of `size` is removed; rounded up to a multiple of `round_to` (fast kernels
    like channel counts that are multiples of 8), never more than `size`, never fewer than 1.

    Example:
        >>> kept_units(384, 0.5), kept_units(100, 0.5, round_to=8), kept_units(3, 0.9)
        (192, 56, 1)
    """
    k = size - int(size * ratio)
    if round_to > 1:
        k = min(size, ceil(k / round_to) * round_to)
    return max(k, 1)


def prunable(model: nn.Module, sg: SpaceGraph, example: torch.Tensor, include_residual: bool = False,
             exclude: tuple[str, ...] = (), why: dict[str, str] | None = None) -> list[Space]:
    """Spaces that width pruning may slice: hidden spaces (and heads) read by a next layer, plus residual
    streams when asked; verified on a copy (`removable_spaces`, which says in `why` why a space is not);
    none touching an `exclude` pattern."""
    cands = [s for s in sg.spaces if (consumers(s) and not s.residual) or (include_residual and s.residual)]
    cands = [s for s in cands if not any(fnmatch(t, p) for t in s.tensors for p in exclude)]
    return removable_spaces(model, sg, example, cands, why)


def plan_width(model: nn.Module, example: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ratio: float,
               criterion: str = "activation", round_to: int = 1, include_residual: bool = False,
               exclude: tuple[str, ...] = (), keep_heads: bool = False
               ) -> tuple[SpaceGraph, dict[int, torch.Tensor], list[dict]]:
    """Which units to keep: (space graph, {space id: sorted kept indices}, one row per space, the spaces that
    cannot be sliced included with the reason). With `keep_heads`, head counts are left whole and only channel
    spaces narrow. A model in which no space can be sliced is refused, with the first reason."""
    sg = find_spaces(model, example)
    why: dict[str, str] = {}
    spaces = prunable(model, sg, example, include_residual, exclude, why)
    if not spaces and why and ratio > 0:
        name, reason = next(iter(why.items()))
        raise CompressError(f"width pruning can slice none of {type(model).__name__}'s {len(why)} candidate spaces",
                            expected="spaces whose units can be removed (the model's own code reshapes with "
                                     "hard-coded widths otherwise)", found=f"{name}: {reason}")
    scores = importance(model, sg, spaces, criterion, x, y) if spaces and ratio > 0 else {}
    keep, rows = {}, []
    for s in spaces:
        heads = any(m.structured for m in s.members)  # a factor (heads) is not rounded like channels
        k = s.size if heads and keep_heads else kept_units(s.size, ratio, 1 if heads else round_to)
        if k < s.size:
            keep[s.id] = scores[s.id].topk(k).indices.sort().values
        rows.append({"space": s.name, "kind": "residual" if s.residual else "heads" if heads else "hidden",
                     "units": s.size, "kept": k})
    sizes = {s.name: s.size for s in sg.spaces}
    rows += [{"space": name, "kind": "not sliceable", "units": sizes[name], "kept": sizes[name], "why": reason}
             for name, reason in why.items()]
    return sg, keep, rows


def prune_width(model: nn.Module, example: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ratio: float,
                **options) -> tuple[nn.Module, dict, list[dict]]:
    """Slice `model` in place; returns (model, the replayable op, per-space rows).

    Example:
        >>> model, op, rows = prune_width(vit, torch.randn(1, 3, 32, 32), images, labels, ratio=0.5)
        >>> op["spaces"]["blocks.0.mlp.fc1.weight:0"]
        192
    """
    sg, keep, rows = plan_width(model, example, x, y, ratio, **options)
    resize(model, sg, keep)
    names = {s.id: s.name for s in sg.spaces}
    return model, {"op": "resize", "spaces": {names[i]: len(idx) for i, idx in keep.items()}}, rows


def narrow(model: nn.Module, images: torch.Tensor, width: float) -> tuple[nn.Module, dict]:
    """A copy of `model` with `width` of the units of every channel space (residual streams and hidden
    layers; head counts are kept), the most active ones, and its replayable `resize` op: the basis that
    fusion fuses into when it also compresses (`fuse_models(..., target=)`).

    Example:
        >>> target, op = narrow(anchor, calib_images, 0.5)   # a 96-wide ViT -> a 48-wide basis
    """
    check_width(width)
    model, op, _ = prune_width(copy.deepcopy(model).eval(), images[:1], images, None, 1 - width,
                               criterion="activation", include_residual=True, keep_heads=True)
    return model, op
