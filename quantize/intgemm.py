"""Exact integer products for the range search of a linear site.

A linear site whose input is quantized per tensor and whose weight is quantized symmetrically (per tensor or
per output channel), both in at most 8 bits, computes Q(x) Q(W)^T + b. Both operands are integer codes times
scales, so the product is the integer product of the codes, scaled once per output channel. oneDNN's
u8 x s8 -> s32 kernels (VNNI / AMX) compute it exactly, where the float32 product of the dequantized tensors
rounds, and faster: 1.7-6.6x on DeiT-S's four linear shapes at 32 x 197 tokens (2 threads, one measurement).
The search runs such products hundreds of times per site.

Used only on CPUs where `available()`'s check finds the kernel exact (hardware without VNNI can saturate
int16 partial sums); elsewhere the search computes the same values in float32 (`engine.run_op`).

Example:
    >>> x = input_codes(qa, rec.inputs["a"]); w = weight_codes(qw, rec.inputs["w"])
    >>> out = linear(x, w, bias)   # == F.linear(qa(x), qw(w), bias) up to float32 rounding
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .quantizers import Quantizer, Uniform

SHIFT = 128  # symmetric activation codes (-2^(b-1) .. 2^(b-1)-1) move into u8 with this zero point


@dataclass
class InputCodes:
    codes: torch.Tensor  # uint8, (rows, features)
    scale: float
    zero_point: int
    shape: tuple  # the input's leading dims, restored on the output


@dataclass
class WeightCodes:
    packed: torch.Tensor  # oneDNN's prepacked int8 weight
    scale: torch.Tensor  # float32, one per output channel
    zero_point: torch.Tensor  # int64 zeros (symmetric)


def _ops_present() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "qlinear_pointwise") and hasattr(ops, "qlinear_prepack"))


@lru_cache(maxsize=1)
def available() -> bool:
    """Whether this CPU's int8 kernel is exact: a product with the largest codes (which saturate 16-bit
    partial sums on hardware without VNNI) and random ones must equal the integer product."""
    if not _ops_present():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (16, 512), generator=g, dtype=torch.int64)
        w = torch.randint(-128, 128, (24, 512), generator=g, dtype=torch.int64)
        x[:4], w[:4] = 255, 127
        x[4:8], w[4:8] = 0, -128
        out = _gemm(x.to(torch.uint8), 1.0, SHIFT, torch.ops.onednn.qlinear_prepack(w.to(torch.int8), None),
                    torch.ones(24), torch.zeros(24, dtype=torch.int64), None)
        exact = (x - SHIFT) @ w.t()
        return bool(torch.equal(out.double(), exact.double()))
    except (RuntimeError, NotImplementedError):
        return False


def eligible(quant: dict[str, Quantizer], inputs: dict[str, torch.Tensor]) -> bool:
    """Whether a linear site's output under `quant` can be computed from integer codes here."""
    qa, qw, x = quant.get("a"), quant.get("w"), inputs.get("a")
    return (isinstance(qa, Uniform) and isinstance(qw, Uniform) and x is not None
            and x.device.type == "cpu" and x.dtype == torch.float32
            and bool(qa.calibrated) and bool(qw.calibrated) and qa.axis is None and qa.bits <= 8
            and qw.symmetric and qw.axis in (None, 0) and qw.bits <= 8 and available())


def input_codes(q: Uniform, x: torch.Tensor) -> InputCodes:
    """u8 codes of `x` under a per-tensor quantizer: the same rounding and clamping as its fake quantization."""
    qmin, qmax = q.qrange
    y = torch.div(x.reshape(-1, x.shape[-1]), q.scale).round_()
    zero_point = SHIFT if q.symmetric else int(q.zero_point)
    if not q.symmetric:
        y.add_(zero_point)
    y.clamp_(qmin, qmax)
    if q.symmetric:
        y.add_(SHIFT)
    return InputCodes(y.to(torch.uint8), float(q.scale), zero_point, tuple(x.shape[:-1]))


def weight_codes(q: Uniform, w: torch.Tensor) -> WeightCodes:
    """s8 codes of a weight (out, in) under a symmetric quantizer, prepacked for the kernel."""
    qmin, qmax = q.qrange
    scale = q.scale.reshape(-1, 1) if q.axis == 0 else q.scale
    codes = torch.div(w, scale).round_().clamp_(qmin, qmax).to(torch.int8)
    per_channel = q.scale.expand(w.shape[0]).float().contiguous()
    return WeightCodes(torch.ops.onednn.qlinear_prepack(codes, None), per_channel,
                       torch.zeros(w.shape[0], dtype=torch.int64))


def linear(x: InputCodes, w: WeightCodes, bias: torch.Tensor | None) -> torch.Tensor:
    """Q(x) Q(W)^T + bias in float32, from the codes."""
    out = _gemm(x.codes, x.scale, x.zero_point, w.packed, w.scale, w.zero_point, bias)
    return out.reshape(*x.shape, out.shape[-1])


def _gemm(codes, scale, zero_point, packed, w_scale, w_zero_point, bias) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(codes, scale, zero_point, packed, w_scale, w_zero_point, bias,
                                              1.0, 0, torch.float32, "none", [], "")
