"""Per-site range setting: min-max, percentile, and the Hessian-guided grid search of PTQ4ViT / Q-HyViT.

Pure functions of one site's `Record` (what it saw on the calibration batch). The search score is PTQ4ViT's
Hessian-guided metric, the output error weighted by the gradient of the task loss at the site's output,
mean((dL/dO * (O - O_hat))^2); without a gradient it is the plain output MSE. A linear site whose both operands
are on integer grids is re-run as an exact integer product where the CPU allows (`intgemm.py`).

Example:
    >>> q = Uniform(8, symmetric=True, axis=0, channels=w.shape[0])
    >>> search(site, rec, {"w": q, "a": qa}, "w", SearchConfig())
"""

from __future__ import annotations

import torch

from . import intgemm
from .config import SearchConfig
from .engine import Record, Site, run_op
from .quantizers import Log, Quantizer, TwinUniform, Uniform, channel_minmax, channel_quantile


def role_axis(site: Site, role: str, granularity: str, ndim: int) -> int | None:
    """The quantization axis of a role at a granularity: weights per output channel, conv inputs per
    channel, linear / norm inputs per feature, attention operands per head (4-D matmul operands)."""
    if granularity == "tensor" or role == "out":
        return None
    if role == "w":
        return 0
    if site.op == "matmul":
        return 1 if ndim == 4 else None
    if site.op == "conv" or (site.op == "norm" and ndim == 4):
        return 1
    return -1


def uniform_for(site: Site, role: str, x: torch.Tensor, bits: int, symmetric: bool, granularity: str,
                tight: bool = False) -> Uniform:
    axis = role_axis(site, role, granularity, x.ndim)
    return Uniform(bits, symmetric, axis, 1 if axis is None else x.shape[axis], tight)


def set_minmax(q: Uniform, x: torch.Tensor, percentile: float | None = None) -> Uniform:
    lo, hi = channel_minmax(x, q.axis) if percentile is None else channel_quantile(x, percentile, q.axis)
    return q.set_range(lo, hi)


def output(site: Site, rec: Record, quant: dict[str, Quantizer]) -> torch.Tensor:
    """The site's output on its record under `quant`: exact integer products where `intgemm` allows."""
    if site.op == "linear" and intgemm.eligible(quant, rec.inputs):
        return intgemm.linear(intgemm.input_codes(quant["a"], rec.inputs["a"]),
                              intgemm.weight_codes(quant["w"], rec.inputs["w"]), rec.extra[0])
    return run_op(site, rec.inputs, rec.extra, quant)


@torch.no_grad()
def score(site: Site, rec: Record, quant: dict[str, Quantizer], per_channel: bool = False,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """Hessian-guided output error of the site under `quant` (per output channel when asked). `out` is the
    output under `quant` where the caller computed it already (a search varying one role)."""
    out = output(site, rec, quant) if out is None else out
    # in place where the op made a new tensor (an unquantized softmax / GELU output is the record's own)
    err = out - rec.out if site.op in ("softmax", "gelu") else out.sub_(rec.out)
    if rec.grad is not None:
        err.mul_(rec.grad)
    err.square_()
    if not per_channel:
        return err.mean()
    if site.op == "conv":  # (N, C, *spatial): every dim but the channel's
        return err.mean(dim=[d for d in range(err.ndim) if d != 1])
    return err.reshape(-1, err.shape[-1]).mean(dim=0)


def _varying(site: Site, rec: Record, quant: dict[str, Quantizer], role: str):
    """A function giving the site's output as `quant[role]`'s range varies, the other roles fixed: their
    integer codes (`intgemm`) or their quantized inputs computed once, not once per candidate."""
    if site.op == "linear" and role in ("a", "w") and intgemm.eligible(quant, rec.inputs):
        bias = rec.extra[0]
        if role == "w":
            x = intgemm.input_codes(quant["a"], rec.inputs["a"])
            return lambda: intgemm.linear(x, intgemm.weight_codes(quant["w"], rec.inputs["w"]), bias)
        w = intgemm.weight_codes(quant["w"], rec.inputs["w"])
        return lambda: intgemm.linear(intgemm.input_codes(quant["a"], rec.inputs["a"]), w, bias)
    inputs, only = _fixed_inputs(rec, quant, role), {role: quant[role]}
    return lambda: run_op(site, inputs, rec.extra, only)


def _fixed_inputs(rec: Record, quant: dict[str, Quantizer], role: str) -> dict[str, torch.Tensor]:
    """The record's inputs with every role but `role` quantized once, for a search that only varies `role`
    (softmax / GELU sites quantize their output, which is the one role they have)."""
    with torch.no_grad():
        return {r: t if r == role or r not in quant else quant[r](t) for r, t in rec.inputs.items()}


@torch.no_grad()
def search(site: Site, rec: Record, quant: dict[str, Quantizer], role: str, cfg: SearchConfig) -> float:
    """Grid-search the range of `quant[role]` (others fixed) by the Hessian-guided score; returns the best
    score. Per-output-channel weight ranges are searched channel by channel in one pass, since each output
    channel's error depends on its own weight row only. With a stride above 1 the grid is searched coarse to
    fine (`SearchConfig`)."""
    q = quant[role]
    x = rec.inputs[role]
    if isinstance(q, TwinUniform):
        return _search_twin(site, rec, quant, role, q, x, cfg)
    if isinstance(q, Log):  # its range is the data's maximum; nothing to search
        q.set_range(x.min(), x.max())
        return float(score(site, rec, quant))
    lo, hi = channel_minmax(x, q.axis)
    if q.symmetric:
        lo, hi = -torch.maximum(lo.abs(), hi.abs()), torch.maximum(lo.abs(), hi.abs())
    per_channel = role == "w" and q.axis == 0
    forward = _varying(site, rec, quant, role)
    grid = torch.linspace(cfg.alpha, cfg.beta, cfg.points + 1)
    best, best_i = None, None

    def consider(i: torch.Tensor) -> None:  # grid indices, -1 for min-max; a zero-point overflow is skipped
        nonlocal best, best_i
        q.set_range(lo * _multiplier(grid, i), hi * _multiplier(grid, i))
        if not q.symmetric and q.overflow:
            return
        s = score(site, rec, quant, per_channel, forward())
        if best is None:
            best, best_i = s, i.expand(s.shape).clone()
        else:
            better = s < best  # strict: earlier candidates win ties
            best, best_i = torch.where(better, s, best), torch.where(better, i, best_i)

    # the min-max range (1.0) is tried first and kept on ties: a channel whose Hessian-weighted error is flat
    # (zero gradient on the calibration images) must not fall to the grid's floor (alpha, 1% of its range)
    for i in [-1] + _coarse(cfg.points, cfg.stride):
        consider(torch.tensor(i))
    if best is None:  # every candidate overflowed (asymmetric over a one-sided range): plain min-max
        q.set_range(lo, hi)
        return float(score(site, rec, quant))
    # the grid points around each channel's coarse best (the grid point nearest 1.0 where min-max won)
    centre = torch.where(best_i < 0, int(torch.argmin((grid - 1.0).abs())), best_i)
    for step in [o for k in range(1, cfg.stride) for o in (-k, k)]:
        consider((centre + step).clamp(0, cfg.points))
    q.set_range(lo * _multiplier(grid, best_i), hi * _multiplier(grid, best_i))
    return float(score(site, rec, quant))


def _coarse(points: int, stride: int) -> list[int]:
    """Every `stride`-th index of a grid of `points + 1`, both ends included."""
    return sorted(set(range(0, points + 1, stride)) | {points})


def _multiplier(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.where(index < 0, torch.ones(()), grid[index.clamp_min(0)])


def _search_twin(site, rec, quant, role, q: TwinUniform, x, cfg) -> float:
    if q.mode == "softmax":
        candidates = [2.0 ** -i for i in range(20)]  # PTQ4ViT: split at a power of two
    else:
        top = float(x.max().clamp_min(1e-8))
        candidates = [float(m) * top for m in torch.linspace(cfg.alpha, cfg.beta, cfg.points + 1)]
    scores = []
    for c in candidates:
        q.set_split(c)
        scores.append(float(score(site, rec, quant)))
    best = min(range(len(candidates)), key=scores.__getitem__)
    q.set_split(candidates[best])
    return scores[best]


def best_percentile_range(q: Uniform, x: torch.Tensor, percentiles=(0.999, 0.9999, 0.99999, 1.0)) -> Uniform:
    """RepQ-ViT's range setting: the clipping percentile whose quantization MSE of `x` is lowest."""
    best = None
    for p in percentiles:
        set_minmax(q, x, None if p >= 1.0 else p)
        with torch.no_grad():
            err = float((q(x) - x).pow(2).mean())
        if best is None or err < best[0]:
            best = (err, q.scale.clone(), q.zero_point.clone())
    q.scale, q.zero_point = best[1], best[2]
    return q
