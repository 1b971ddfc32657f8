"""RepQ-ViT's scale reparameterisation of post-LayerNorm activations (Li et al., ICCV 2023).

Post-LayerNorm activations vary a lot between channels, so they want per-channel quantizers, which int8
kernels do not run. RepQ-ViT calibrates them per channel (s_c, z_c), then moves the per-channel part into the
weights: with s~ = mean(s), z~ = round(mean(z)), r = s / s~ and b = s~ (z - z~), the activation
x' = x / r + b quantized per tensor with (s~, z~) gives exactly the per-channel codes of x. The LayerNorm
produces x' directly (gamma / r, beta / r + b) and the next Linear undoes it (W r, c - (W r) b), so the float
function is unchanged and a plain per-tensor quantizer sees the easy activation.

Example:
    >>> folded = reparameterize(model, sites, records, a_bits=8)   # names of the folded LayerNorms
"""

from __future__ import annotations

import torch
from torch import nn

from .engine import Record, Site
from .search import best_percentile_range, uniform_for


def fold(norm: nn.LayerNorm, linears: list[nn.Linear], r: torch.Tensor, b: torch.Tensor) -> None:
    """Make `norm` output x / r + b and every Linear reading it compensate, leaving the function unchanged."""
    with torch.no_grad():
        norm.weight.div_(r)
        norm.bias.div_(r).add_(b)
        for lin in linears:
            lin.weight.mul_(r)
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype))
            lin.bias.sub_(lin.weight @ b)


def reparameterize(model: nn.Module, sites: list[Site], records: dict[str, Record], a_bits: int) -> list[str]:
    """Fold per-channel scales of every post-LayerNorm input into the LayerNorm and its Linears."""
    groups: dict[str, list[Site]] = {}
    for s in sites:
        if s.after_norm and s.op == "linear" and s.name in records:
            groups.setdefault(s.after_norm, []).append(s)
    folded = []
    for norm_name, consumers in groups.items():
        norm = model.get_submodule(norm_name)
        linears = [model.get_submodule(s.module) for s in consumers]
        if not (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None
                and all(isinstance(m, nn.Linear) for m in linears)):
            continue
        x = records[consumers[0].name].inputs["a"]
        q = best_percentile_range(uniform_for(consumers[0], "a", x, a_bits, False, "channel"), x)
        s, z = q.scale, q.zero_point
        s_mean, z_mean = s.mean(), torch.round(z.mean())
        fold(norm, linears, s / s_mean, s_mean * (z - z_mean))
        folded.append(norm_name)
    return folded
