"""Quantizers: pure functions on tensors, and small modules that hold a calibrated scale.

Three schemes, each with straight-through rounding so reconstruction can train through them:

- `Uniform`: symmetric (signed, zero point 0) or asymmetric (unsigned with a zero point), per tensor or
  per channel along one axis (channel or attention head);
- `TwinUniform` (PTQ4ViT): two uniform ranges sharing one code, for post-softmax values in [0, 1] (a fine
  range below a searched split, a coarse one above) and post-GELU values (a fixed negative range);
- `Log` (log2 or log-sqrt2, RepQ-ViT / FQ-ViT): for post-softmax values, dense near 0.

Every scale has a floor (`EPS`): a channel that is constant over the calibration data would otherwise get a
zero interval and produce NaN or overflow (Q-HyViT's guard).

Example:
    >>> q = Uniform(bits=8, symmetric=True, axis=0)
    >>> q.set_range(w.amin(dim=1), w.amax(dim=1))   # per output channel
    >>> w_hat = q(w)
"""

from __future__ import annotations

import math

import torch
from torch import nn

EPS = 1e-8
GELU_MIN = 0.16997  # |min GELU(x)|; PTQ4ViT fixes the negative post-GELU range to it


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def uniform_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, tight: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Scale, zero point, and whether the zero point overflowed, for the range [lo, hi].

    Symmetric: scale = max|x| / (2^(b-1) - 0.5) (PTQ4ViT's initial interval), zero point 0. Asymmetric: scale =
    (hi - lo) / (2^b - 1), zero point = round(-lo / scale), which leaves [0, 2^b - 1] when the range does not
    contain 0 (a one-sided bridge activation): the zero point is then clamped, which shifts every value by
    the clamped amount. That is Q-HyViT's zero-point overflow; `overflow` reports it so a method can refuse
    the candidate. Unless `tight`, the range is first widened to contain 0 (what production observers do),
    which avoids the overflow at the price of resolution.
    """
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / (2 ** (bits - 1) - 0.5)
        return scale.clamp_min(EPS), torch.zeros_like(scale), False
    qmin, qmax = int_range(bits, signed=False)
    if not tight:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zp = torch.round(qmin - lo / scale)
    overflow = bool(((zp < qmin) | (zp > qmax)).any())
    return scale, zp.clamp(qmin, qmax), overflow


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int
               ) -> torch.Tensor:
    """Quantize then dequantize: (clamp(round(x / s) + z, qmin, qmax) - z) * s (z = 0 when None)."""
    if torch.is_grad_enabled() and (x.requires_grad or getattr(scale, "requires_grad", False)):
        z = 0 if zero_point is None else zero_point
        return (torch.clamp(round_ste(x / scale) + z, qmin, qmax) - z) * scale
    # nothing to differentiate (calibration's range search runs this hundreds of times per site): the same
    # values, computed in one buffer instead of seven
    y = torch.div(x, scale).round_()
    if zero_point is not None:
        y.add_(zero_point)
    y.clamp_(qmin, qmax)
    if zero_point is not None:
        y.sub_(zero_point)
    return y.mul_(scale)


def _shape(t: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """Broadcast a per-channel vector along `axis` of an `ndim` tensor (negative axes count from the end)."""
    if axis is None or t.ndim == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def channel_minmax(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over everything but `axis` (all of it when None)."""
    if axis is None:
        return x.min(), x.max()
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def channel_quantile(x: torch.Tensor, q: float, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1-q) and q quantiles over everything but `axis` (subsampled beyond 2^24 values, torch's limit)."""
    flat = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if flat.shape[1] > 2 ** 24 // max(1, flat.shape[0]):
        idx = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))
        flat = flat[:, idx[: 2 ** 24 // flat.shape[0]]]
    lo, hi = torch.quantile(flat, 1 - q, dim=1), torch.quantile(flat, q, dim=1)
    return (lo[0], hi[0]) if axis is None else (lo, hi)


class Quantizer(nn.Module):
    """Base: `bits`, a `calibrated` flag (an uncalibrated quantizer passes values through), `spec()` for the
    checkpoint. `deployable` says whether an int8 backend (u8 per-tensor activations, s8 per-channel weights)
    can run the scheme as is."""

    kind = "base"
    deployable = False

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("calibrated", torch.tensor(False))

    def spec(self) -> dict:
        return {"kind": self.kind, "bits": self.bits}


class Uniform(Quantizer):
    """Uniform quantizer, symmetric or asymmetric, per tensor (`axis=None`) or per channel / head (`axis`)."""

    kind = "uniform"

    def __init__(self, bits: int, symmetric: bool = True, axis: int | None = None, channels: int = 1,
                 tight: bool = False):
        super().__init__(bits)
        self.symmetric, self.axis, self.tight = symmetric, axis, tight
        size = () if axis is None else (channels,)
        self.register_buffer("scale", torch.ones(size))
        self.register_buffer("zero_point", torch.zeros(size))
        self.overflow = False

    @property
    def deployable(self) -> bool:
        return self.bits <= 8

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, signed=self.symmetric)

    def spec(self) -> dict:
        return {**super().spec(), "symmetric": self.symmetric, "axis": self.axis, "channels": int(self.scale.numel())}

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> Uniform:
        scale, zp, self.overflow = uniform_params(lo.detach().float(), hi.detach().float(), self.bits, self.symmetric,
                                                  self.tight)
        self.scale, self.zero_point = scale.reshape(self.scale.shape), zp.reshape(self.scale.shape)
        self.calibrated.fill_(True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            return x
        qmin, qmax = self.qrange
        zero_point = None if self.symmetric else _shape(self.zero_point, x.ndim, self.axis)
        return fake_quant(x, _shape(self.scale, x.ndim, self.axis), zero_point, qmin, qmax)


class TwinUniform(Quantizer):
    """PTQ4ViT's twin uniform quantizer for post-softmax (`mode="softmax"`) or post-GELU (`mode="gelu"`) values.

    softmax: values below the split s use scale s / (2^(b-1) - 1), values above use 1 / (2^(b-1) - 1); both
    unsigned, the top bit of the code picks the range. gelu: positives use a searched scale over 2^(b-1) - 1
    levels, negatives the fixed scale GELU_MIN / 2^(b-1).
    """

    kind = "twin"

    def __init__(self, bits: int, mode: str = "softmax"):
        super().__init__(bits)
        self.mode = mode
        self.register_buffer("split", torch.tensor(1.0))  # softmax: the split s; gelu: positive range max

    def spec(self) -> dict:
        return {**super().spec(), "mode": self.mode}

    def set_split(self, s: float | torch.Tensor) -> TwinUniform:
        self.split.fill_(float(s))
        self.calibrated.fill_(True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            return x
        levels = 2 ** (self.bits - 1) - 1
        if self.mode == "softmax":
            fine, coarse = self.split / levels, 1.0 / levels
            small = fake_quant(x, fine, None, 0, levels)
            large = fake_quant(x, coarse, None, 0, levels)
            return torch.where(x < self.split, small, large)
        pos = fake_quant(x, (self.split / levels).clamp_min(EPS), None, 0, levels)
        neg = fake_quant(x, torch.tensor(GELU_MIN / 2 ** (self.bits - 1)), None, -levels - 1, 0)
        return torch.where(x >= 0, pos, neg)


class Log(Quantizer):
    """Log quantizer for values in [0, scale]: q = clamp(round(-base_log(x / scale)), 0, 2^b - 1),
    x_hat = scale * base^(-q), with base 2 (`sqrt2=False`) or sqrt(2) (RepQ-ViT's log-sqrt2). Codes past the
    last level are zero."""

    kind = "log"

    def __init__(self, bits: int, sqrt2: bool = True):
        super().__init__(bits)
        self.sqrt2 = sqrt2
        self.register_buffer("scale", torch.tensor(1.0))

    def spec(self) -> dict:
        return {**super().spec(), "sqrt2": self.sqrt2}

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> Log:
        self.scale.fill_(max(float(hi), EPS))
        self.calibrated.fill_(True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            return x
        base_log = 0.5 * math.log(2) if self.sqrt2 else math.log(2)
        ratio = (x / self.scale).clamp_min(1e-30)
        code = round_ste(-torch.log(ratio) / base_log)
        levels = 2 ** self.bits - 1
        out = self.scale * torch.exp(-code.clamp(0, levels) * base_log)
        return torch.where(code > levels, torch.zeros_like(out), out)


def snapshot(quant: dict[str, Quantizer]) -> dict:
    """What a role -> quantizer map computes: each one's settings and calibrated state, copied, for `same`.

    Example:
        >>> before = snapshot(quant); search(site, rec, quant, "w", cfg); same(before, snapshot(quant))
    """
    return {role: (q.spec(), {k: v.clone() for k, v in q.state_dict().items()}) for role, q in quant.items()}


def same(a: dict, b: dict) -> bool:
    """Whether two snapshots compute the same thing (same roles, kinds, settings and state)."""
    return a.keys() == b.keys() and all(
        a[r][0] == b[r][0] and a[r][1].keys() == b[r][1].keys()
        and all(torch.equal(a[r][1][k], b[r][1][k]) for k in a[r][1]) for r in a)


def make(spec: dict) -> Quantizer:
    """A quantizer from its `spec()` (for reloading a quantized checkpoint)."""
    kind = spec["kind"]
    if kind == "uniform":
        return Uniform(spec["bits"], spec["symmetric"], spec["axis"], spec["channels"])
    if kind == "twin":
        return TwinUniform(spec["bits"], spec["mode"])
    if kind == "log":
        return Log(spec["bits"], spec["sqrt2"])
    raise ValueError(f"unknown quantizer kind {kind}")
