"""Low-rank factorisation of Linear layers: W (m x n) ~ up (m x r) @ down (r x n), kept only where it
saves something (r < mn / (m + n), the break-even rank).

Plain SVD minimises ||W - W_r||; with `whiten`, the SVD is taken of W S, where S S^T = X^T X is the
Cholesky factor of the calibration inputs' second moment (SVD-LLM), so the dropped singular values are
exactly the output error on that data.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from compress.alignment.hooks import evaluating, hooks
from compress.alignment.surgery import factorize_linears


def rank_for(m: int, n: int, ratio: float) -> int:
    """The rank that removes `ratio` of a (m x n) layer's parameters; 0 when it would save nothing.

    Example:
        >>> rank_for(384, 96, 0.5), rank_for(384, 96, 0.0)
        (38, 0)
    """
    even = m * n / (m + n)
    r = int((1 - ratio) * even)
    return r if 1 <= r < int(even) else 0


def candidates(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Linear layers that may be factorised: all but the classifier and the `exclude` patterns."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and not any(fnmatch(n, p) for p in exclude)]


@torch.no_grad()
def _second_moments(model: nn.Module, names: list[str], x: torch.Tensor, batch_size: int = 64):
    modules = dict(model.named_modules())
    acc = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64) for n in names}

    def hook(name):
        def fn(mod, args):
            a = args[0].reshape(-1, args[0].shape[-1]).double()
            acc[name] += a.T @ a
        return fn

    with hooks(model, pre={n: hook(n) for n in names}), evaluating(model):
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    return acc


@torch.no_grad()
def factorize(w: torch.Tensor, rank: int, gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with up @ down the best rank-`rank` approximation of `w` (in the inputs' metric when the
    Gram matrix X^T X is given). Singular values are split evenly between the factors."""
    w64 = w.double()
    if gram is None:
        u, s, vh = torch.linalg.svd(w64, full_matrices=False)
        down = vh[:rank]
    else:
        eps = 1e-6 * gram.diagonal().mean().clamp_min(1e-12)  # keeps S invertible for dead inputs
        S = torch.linalg.cholesky(gram + eps * torch.eye(len(gram), dtype=gram.dtype))
        u, s, vh = torch.linalg.svd(w64 @ S, full_matrices=False)
        down = torch.linalg.solve_triangular(S.T, vh[:rank].T, upper=True).T  # vh_r S^-1
    root = s[:rank].sqrt()
    return (root[:, None] * down).to(w.dtype), (u[:, :rank] * root).to(w.dtype)


def prune_lowrank(model: nn.Module, x: torch.Tensor, ratio: float, whiten: bool = False,
                  exclude: tuple[str, ...] = ()) -> tuple[nn.Module, dict, list[dict]]:
    """Factorise every candidate Linear to the rank removing `ratio` of its parameters, in place.

    Example:
        >>> model, op, rows = prune_lowrank(vit, images, ratio=0.5, whiten=True)
        >>> op["layers"]["blocks.0.mlp.fc1"]
        38
    """
    modules = dict(model.named_modules())
    names = candidates(model, exclude)
    ranks = {n: rank_for(*modules[n].weight.shape, ratio) for n in names}
    ranks = {n: r for n, r in ranks.items() if r}
    grams = _second_moments(model, list(ranks), x) if whiten and ranks else {}
    factors = {n: factorize(modules[n].weight, r, grams.get(n)) for n, r in ranks.items()}
    rows = [{"layer": n, "shape": list(modules[n].weight.shape), "rank": ranks.get(n, "full")} for n in names]
    factorize_linears(model, ranks, factors)
    return model, {"op": "factorize", "layers": ranks}, rows
