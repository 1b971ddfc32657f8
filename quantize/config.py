"""Quantization's configs and registry (no torch: the command line reads them for its flags and help).

Example:
    >>> QuantizeRun(method="qhyvit", bits="w6a6").w_bits
    6
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from compress.config import DataOptions, check_device_name, option, validate_choices
from compress.errors import CompressError
from compress.registry import Registry
from compress.steps import Step

METHODS = Registry("quantization method",
                   lazy={name: "quantize.methods" for name in ("minmax", "percentile", "ptq4vit", "repq", "qhyvit")})
HESSIAN = {"ptq4vit", "qhyvit"}  # methods whose search reads output gradients
GUARDED = {"qhyvit"}  # the method we recommend: never worse than min-max at any site (calibrate.keep_better)
BRIDGES = {"qhyvit"}  # methods that calibrate bridge blocks sequentially and reconstruct them


def parse_bits(text: str) -> tuple[int, int]:
    """`w6a6` -> (6, 6); anything else, or bits outside 2..8, is a clear error.

    Example:
        >>> parse_bits("w4a8")
        (4, 8)
    """
    m = re.fullmatch(r"w(\d+)a(\d+)", str(text).strip().lower())
    if not m:
        raise CompressError(f"bad --bits '{text}'", expected="wXaY, e.g. w8a8, w6a6, w4a8")
    w, a = int(m.group(1)), int(m.group(2))
    bad = [f"{n}={b}" for n, b in (("weights", w), ("activations", a)) if not 2 <= b <= 8]
    if bad:
        raise CompressError(f"bits out of range in '{text}'", expected="2 to 8 bits", found=", ".join(bad))
    return w, a


@dataclass
class SearchConfig:
    """PTQ4ViT's grid: multipliers alpha..beta of the min-max interval in `points` steps, `rounds` of
    alternating weight / activation search. `stride` > 1 searches the grid coarse to fine: every stride-th
    point, then the points within stride - 1 of the best (per channel for weights); 1 scores every point, as
    the PTQ4ViT and Q-HyViT code does (3.4x the op runs for the same grid)."""
    alpha: float = 0.01
    beta: float = 1.2
    points: int = 100
    stride: int = 5
    rounds: int = 3
    percentile: float = 0.9999


@dataclass
class QuantConfig:
    """What `calibrate` does. `bits` is `wXaY` with X, Y in 2..8, parsed once into `w_bits` / `a_bits`.

    Example:
        >>> QuantConfig(method="qhyvit", bits="w6a6")
    """

    method: str = option("qhyvit", "PTQ method", choices=METHODS)
    bits: str = option("w8a8", "wXaY, X and Y from 2 to 8 (w8a8, w6a6, w4a8, w4a4)")
    calib: int = option(32, "calibration images from the training split")
    exclude: list[str] = option([], "fnmatch patterns of sites / modules kept in float")
    search: SearchConfig = option(cli=False, default_factory=SearchConfig)  # its stride is set from search_stride
    search_stride: int = option(5, "ptq4vit / qhyvit: score every Nth point of the 101-point range grid, then the "
                                   "points around the best (1: every point, as the papers' code, 3.4x slower)")
    recon_iters: int = option(200, "qhyvit: learned-rounding steps per bridge block (learned on half the calibration "
                                   "images, kept only where it helps on the other half; 0: none, as the Q-HyViT code)")
    recon_lr: float = option(1e-2, "qhyvit: learned-rounding learning rate (above AdaRound's 1e-3: our "
                                   "schedules are ~100x shorter than its 20k steps)", cli=False)
    seed: int = option(0, "random seed")
    w_bits: int = field(init=False, repr=False)
    a_bits: int = field(init=False, repr=False)

    def __post_init__(self):
        validate_choices(self)
        self.w_bits, self.a_bits = parse_bits(self.bits)
        self.bits = f"w{self.w_bits}a{self.a_bits}"
        if self.calib < 1 or self.recon_iters < 0 or self.search_stride < 1:
            raise CompressError("invalid --calib, --recon-iters or --search-stride",
                                expected="calib >= 1, recon_iters >= 0, search_stride >= 1",
                                found=f"{self.calib}, {self.recon_iters}, {self.search_stride}")
        self.search = replace(self.search, stride=self.search_stride)
        self.exclude = list(self.exclude)


@dataclass
class QuantizeRun(DataOptions, QuantConfig):
    """`compress quantize`: calibrate (simulated PTQ), sensitivity, and optionally a real int8 program
    (PT2E / Inductor, ONNX Runtime, or the faster of the two). Calibration, the simulated model's scores and the
    sensitivity table run on `--device`; the int8 programs are built and timed on the CPU, the only device
    both int8 backends target. There is no `--precision`: a quantization error is measured against the float
    model in fp32, and autocast would add its own rounding to what is being measured.

    Example:
        >>> ckpt, result = quantize.run("vit.pt", "digits", QuantizeRun(bits="w8a8", deploy="vit.int8.pt2"))
    """

    deploy: str | None = option(None, "also write a real int8 program: PATH.pt2 (PT2E, x86 Inductor), PATH.onnx "
                                      "(ONNX Runtime, with PATH.fp32.onnx beside it), or auto / a path without those "
                                      "suffixes: both measured, the fastest within a point of FP32 written",
                                artifact="model.int8")
    sensitivity_plot: str | None = option(None, "per-site sensitivity (SQNR when alone quantized) as a PNG",
                                          artifact="sensitivity.png")
    ort_weights: str = option("auto", "ONNX Runtime weights: s8, u8, or auto (u8 on an x86 CPU without VNNI, where "
                                      "ORT's s8 kernels saturate; s8 elsewhere); set s8 when building on such a CPU "
                                      "for a VNNI server", choices=("auto", "s8", "u8"))
    device: str = option("auto", "where calibration runs: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps; "
                                 "int8 programs are built and timed on the CPU")

    def __post_init__(self):
        super().__post_init__()
        self.check_subset()
        check_device_name(self.device)


STEP = Step("quantize", QuantizeRun, "quantize.pipeline:run", "one", "",
            "post-training quantization (simulated) and a real int8 artifact")
