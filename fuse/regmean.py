"""RegMean (Jin et al., ICLR 2023, "Dataless knowledge fusion by merging weights of language models"): merge
the Linear layers of aligned models by regression instead of averaging.

For a Linear layer with weight W_i in model i and input Gram matrix G_i = X_i^T X_i (X_i: the inputs that
layer sees in model i), the merged weight minimises sum_i ||X_i W^T - X_i W_i^T||^2:

    W = (sum_i W_i G_i) (sum_i G_i)^-1

so each model keeps the outputs it produces on the inputs it produces, which is what a plain average loses
when the models were trained on different data. As the reference (bloomberg/dataless-model-merging), the
Grams' off-diagonal entries are scaled by `alpha` (0.9) and biases are averaged. Here the models are first
aligned into one basis by optimal transport (fuse/fusion.py), and the Grams come from the calibration images.

Example:
    >>> state, merged = regmean_state([a_aligned, b_aligned], average(states, like), images)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress.alignment.hooks import evaluating, hooks


def linear_grams(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """{Linear module name: X^T X} over every row its input has on `images` (tokens count as rows), float32
    (two ViT-B/16 hold 1 GiB of them; the merge solves in float64).

    Example:
        >>> linear_grams(vit, torch.randn(8, 3, 32, 32))["blocks.0.mlp.fc1"].shape
        torch.Size([96, 96])
    """
    grams: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output):  # every call counts: a shared layer is fitted on all its inputs
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            grams[name] = grams.get(name, 0) + x.T @ x
        return hook

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with hooks(model, post={n: record(n) for n in names}), evaluating(model), torch.no_grad():
        for x in images.split(batch_size):
            model(x)
    return grams


def regmean_weight(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float = 0.9) -> torch.Tensor:
    """The RegMean merge of one layer's weights (out, in) given each model's input Gram (in, in).

    Inputs no model ever drives (a zero diagonal in every Gram) leave their weight columns free in the
    regression: those columns are averaged.

    Example:
        >>> regmean_weight([w_a, w_b], [g_a, g_b])   # == (w_a + w_b) / 2 when g_a == g_b
    """
    gs = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in (g.double() for g in grams)]
    total = sum(gs)
    live = torch.diagonal(total) > 1e-12 * torch.diagonal(total).max().clamp_min(1e-300)
    out = torch.stack(weights).double().mean(0)
    if live.any():
        g_live = total[live][:, live]
        rhs = sum(w.double()[:, live] @ g[live][:, live] for w, g in zip(weights, gs))
        out[:, live] = torch.linalg.solve(g_live, rhs.T).T  # G symmetric: (rhs G^-1)^T = G^-1 rhs^T
    return out.to(weights[0].dtype)


def regmean_state(models: list[nn.Module], state: dict[str, torch.Tensor], images: torch.Tensor,
                  alpha: float = 0.9) -> tuple[dict[str, torch.Tensor], int]:
    """`state` (the average of `models`, all in one basis) with every Linear weight replaced by its RegMean
    merge over `models`, the Grams measured on `images`; returns the state and the layers merged.

    Example:
        >>> state, n = regmean_state([a_aligned, b_aligned], average(states, like), calib_images)
    """
    grams = [linear_grams(m, images) for m in models]
    params = [dict(m.named_parameters()) for m in models]
    state = copy.copy(state)
    for name in grams[0]:
        key = f"{name}.weight"
        state[key] = regmean_weight([p[key].detach() for p in params], [g[name] for g in grams], alpha)
    return state, len(grams[0])
