"""RepQ-ViT's scale reparameterisation of post-LayerNorm activations (Li et al., ICCV 2023).

Post-LayerNorm activations vary a lot between channels, so they want per-channel quantizers, which int8
kernels do not run. RepQ-ViT calibrates them per channel (s_c, z_c), then moves the per-channel part into the
weights: with s~ = mean(s), z~ = round(mean(z)), r = s / s~ and b = s~ (z - z~), the activation
x' = x / r + b quantized per tensor with (s~, z~) gives exactly the per-channel codes of x. The LayerNorm
produces x' directly (gamma / r, beta / r + b) and the next Linear undoes it (W r, c - (W r) b), so the float
function is unchanged and a plain per-tensor quantizer sees the easy activation.

Example:
    >>> readers = norm_readers(sites)                # LayerNorm -> the linear sites reading its output
    >>> folded = reparameterize(model, readers, {n: x_n for n in readers}, a_bits=8)
"""

from __future__ import annotations

import torch
from torch import nn

from .engine import Site
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


def norm_readers(sites: list[Site]) -> dict[str, list[Site]]:
    """Per normalisation module, the linear sites that read its output (in model order)."""
    groups: dict[str, list[Site]] = {}
    for s in sites:
        if s.after_norm and s.op == "linear":
            groups.setdefault(s.after_norm, []).append(s)
    return groups


def reparameterize(model: nn.Module, readers: dict[str, list[Site]], inputs: dict[str, torch.Tensor],
                   a_bits: int) -> list[str]:
    """Fold per-channel scales of every post-LayerNorm input into the LayerNorm and every Linear reading it.
    `inputs[norm]` is what the norm's readers received on the calibration batch; a norm without one (its
    readers did not run on the data) is left as it is."""
    folded = []
    for norm_name, consumers in readers.items():
        norm = model.get_submodule(norm_name)
        linears = [model.get_submodule(s.module) for s in consumers]
        if norm_name not in inputs or not (
                isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None
                and all(isinstance(m, nn.Linear) for m in linears)):
            continue
        x = inputs[norm_name]
        q = best_percentile_range(uniform_for(consumers[0], "a", x, a_bits, False, "channel"), x)
        s, z = q.scale, q.zero_point
        s_mean, z_mean = s.mean(), torch.round(z.mean())
        fold(norm, linears, s / s_mean, s_mean * (z - z_mean))
        folded.append(norm_name)
    return folded
