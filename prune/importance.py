"""Unit importance for width pruning: one score per unit of each space, higher = keep.

Every criterion sums over the whole space (all parameter axes that carry the unit), as DepGraph's group
importance does, so a channel's BatchNorm, its producing conv and its consuming conv are scored together:

- `magnitude`: sum of w^2 (group L2);
- `taylor`: |w * dL/dw| with the gradient summed over the calibration set (first-order loss change);
- `hessian`: w^2 * E[(dL/dw)^2] with per-sample gradients (OBD's diagonal Fisher; Torch-Pruning keeps only
  the last sample's g^2, see research/quantize_prune.md; here every sample is accumulated);
- `activation`: the mean norm of each unit's contribution to the next layer's output. For an MLP hidden
  unit that is mean|h_j| * ||W_out[:, j]|| (SparseUnifiedModel); for a head it is the norm of the head's
  output after the projection.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from compress.alignment import axes as ax
from compress.alignment.hooks import drop_eval_caches, evaluating, hooks
from compress.alignment.spaces import Space, SpaceGraph
from compress.errors import CompressError

from .config import CRITERIA


def importance(model: nn.Module, sg: SpaceGraph, spaces: list[Space], criterion: str, x: torch.Tensor,
               y: torch.Tensor, batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Scores (one per unit) for each of `spaces`, from calibration images `x` with labels `y`, by any
    criterion of `CRITERIA`.

    Example:
        >>> scores = importance(model, sg, sg.spaces[:2], "taylor", images, labels)
        >>> scores[sg.spaces[0].id].shape
        torch.Size([384])
    """
    return CRITERIA.get(criterion)(model, sg, spaces, x, y, batch_size)


@CRITERIA.register("magnitude")
def magnitude(model, sg, spaces, x, y, batch_size=64):
    """Group L2: the sum of w^2 over every parameter axis carrying the unit."""
    return _group_sums(sg, spaces, {n: p.detach() ** 2 for n, p in model.named_parameters()})


@CRITERIA.register("taylor")
def taylor(model, sg, spaces, x, y, batch_size=64):
    """|w * dL/dw| with the gradient summed over the calibration set (first-order loss change)."""
    grads = _gradients(model, x, y, batch_size, per_sample=False)
    return _group_sums(sg, spaces, {n: (p.detach() * grads[n]).abs() for n, p in model.named_parameters()
                                    if n in grads})


@CRITERIA.register("hessian")
def hessian(model, sg, spaces, x, y, batch_size=64):
    """w^2 * E[(dL/dw)^2] with per-sample gradients (OBD's diagonal Fisher)."""
    sq = _gradients(model, x, y, batch_size, per_sample=True)
    return _group_sums(sg, spaces, {n: p.detach() ** 2 * sq[n] / len(x) for n, p in model.named_parameters()
                                    if n in sq})


def _group_sums(sg: SpaceGraph, spaces: list[Space], elem: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    wanted = {s.id: s for s in spaces}
    out = {s.id: torch.zeros(s.size) for s in spaces}
    seen = set()
    for s in spaces:
        for m in s.members:
            if m.tensor not in elem or (m.tensor, m.axis) in seen:
                continue
            seen.add((m.tensor, m.axis))  # one pass per axis covers every space on it (q, k and v heads...)
            for leaf, v in ax.unit_sums(elem[m.tensor], m.axis, sg.tensor_axes[m.tensor][m.axis]):
                if leaf.id in wanted:
                    out[leaf.id] += v.float()
    return out


def _gradients(model: nn.Module, x, y, batch_size: int, per_sample: bool) -> dict[str, torch.Tensor]:
    """Sum of gradients (or of squared per-sample gradients) of the cross-entropy over the data."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    step = 1 if per_sample else batch_size
    with evaluating(model):  # BatchNorm statistics and dropout as at deployment
        try:
            for i in range(0, len(x), step):
                model.zero_grad(set_to_none=True)
                drop_eval_caches(model)  # each backward gets its own graph
                F.cross_entropy(model(x[i:i + step]), y[i:i + step], reduction="sum").backward()
                for n, p in params.items():
                    if p.grad is not None:
                        acc[n] += p.grad ** 2 if per_sample else p.grad
        finally:
            model.zero_grad(set_to_none=True)
    return acc


@CRITERIA.register("activation")
@torch.no_grad()
def activation(model: nn.Module, sg: SpaceGraph, spaces: list[Space], x, y=None, batch_size: int = 64):
    """The mean norm of each unit's contribution to the next layer's output."""
    modules = dict(model.named_modules())
    wanted = {s.id for s in spaces}
    readers: dict[str, list[tuple[int, ax.Atom]]] = defaultdict(list)  # module -> (weight axis, atom)
    for s in spaces:
        for m in s.members:
            path = m.tensor.removesuffix(".weight")
            mod = modules.get(path)
            if m.role == "in" and m.tensor.endswith(".weight") and _dense(mod):
                entry = (m.axis, sg.tensor_axes[m.tensor][m.axis])
                if entry not in readers[path]:
                    readers[path].append(entry)
    unread = [s.name for s in spaces if not any(m.tensor.removesuffix(".weight") in readers for m in s.members
                                                if m.role == "in")]
    if unread:
        raise CompressError("activation importance needs a Linear or Conv reading each space",
                            expected="spaces consumed by a dense layer",
                            found=f"none for {', '.join(unread[:3])}", hint="use --importance magnitude")
    sums: dict[int, torch.Tensor] = defaultdict(float)

    def hook(path):
        def fn(module, args, output):
            a = args[0]
            if isinstance(module, nn.Linear):
                xs, w = a.reshape(-1, a.shape[-1]), module.weight
            else:  # a conv: positions are samples, (out, kh, kw) are the outputs a channel writes to
                xs = a.movedim(1, -1).reshape(-1, a.shape[1])
                w = module.weight.movedim(1, -1).reshape(-1, module.weight.shape[1])
            for _, atom in readers[path]:
                for leaf, v in _contributions(xs.float(), w.float(), atom, wanted):
                    if leaf.id in wanted:
                        sums[leaf.id] = sums[leaf.id] + v * len(a)  # per-image weighting
        return fn

    with hooks(model, post={p: hook(p) for p in readers}), evaluating(model):
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    return {s.id: torch.as_tensor(sums[s.id]) / len(x) for s in spaces}


def _dense(m) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1)


def _contributions(xs: torch.Tensor, w: torch.Tensor, atom: ax.Atom, wanted: set[int]):
    """(leaf, mean over samples of || the leaf unit's part of xs @ w.T ||) for the leaves on the input axis."""
    r = ax.find(atom)
    if r.kind == "leaf":
        if r.size > 1 and not r.pinned:
            yield r, xs.abs().mean(0) * w.norm(dim=0)  # rank one: |x_j| * ||w_j|| exactly
        return
    if r.kind == "sum":
        sizes = [c.size for c in r.children]
        for xp, wp, c in zip(xs.split(sizes, 1), w.split(sizes, 1), r.children):
            yield from _contributions(xp, wp, c, wanted)
        return
    dims = [c.size for c in r.children]
    xr, wr = xs.reshape(len(xs), *dims), w.reshape(len(w), *dims)
    elementwise = (xs.abs().mean(0) * w.norm(dim=0)).reshape(dims)
    for k, c in enumerate(r.children):
        leaf = ax.find(c)
        if leaf.kind != "leaf":  # nested structure under a factor: per-unit sums of the rank-one scores
            yield from ax.unit_sums(elementwise, k, c)
        elif leaf.id in wanted:  # a head: the norm of its whole block's product, in row chunks
            xk = xr.movedim(k + 1, 1).reshape(len(xs), dims[k], -1)
            wk = wr.movedim(k + 1, 1).reshape(len(w), dims[k], -1)
            norms = [torch.einsum("nkr,okr->nko", part, wk).norm(dim=-1).sum(0) for part in xk.split(1024)]
            yield leaf, torch.stack(norms).sum(0) / len(xs)
