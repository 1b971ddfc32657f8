"""A real int8 artifact: PT2E with the x86 Inductor quantizer (torchao), measured against FP32 on the same
backend (both through `torch.compile` with Inductor freezing, batch 1, interleaved runs).

The simulation engine says how accurate a scheme can be; this says what a CPU actually runs. Linear and conv
weights become s8 per channel, activations u8 per tensor (HistogramObserver), calibrated on the same images.
int8 is not always faster on CPU (depthwise / grouped convs and the reshapes around bridge blocks can be
slower than float), so groups of layers are tried in float in turn and the fastest variant whose predictions
agree with FP32 is kept; the report lists what stayed float.

Example:
    >>> dep = deploy(model, images, skip_groups={"grouped convs": [...]})
    >>> save_program(dep.program, images[:1], "model.int8.pt2")
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError
from compress.measure import compare_latency
from compress.programs import Program, compile_frozen, exported, load_program, save_pt2

__all__ = ["Deployed", "deploy", "quantize_pt2e", "save_program", "load_program", "fp32_size_bytes", "Program"]


def _torchao():
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:  # pragma: no cover - torchao is a dependency
        raise CompressError("int8 deployment needs torchao", expected="torchao installed",
                            found=str(e)) from e
    return prepare_pt2e, convert_pt2e, xiq


@dataclass
class Deployed:
    program: nn.Module                 # the converted int8 graph (eager; compile it to run fast)
    float_modules: list[str]           # Linear / conv modules left in float
    choice: str                        # which variant won
    fp32_latency_ms: float
    int8_latency_ms: float
    variants: dict = field(default_factory=dict)  # variant -> {"latency_ms", "agreement"}
    compiled: nn.Module | None = field(default=None, repr=False)  # the winner, compiled (what was timed)
    fp32_compiled: nn.Module | None = field(default=None, repr=False)  # FP32 on the same backend


def quantize_pt2e(model: nn.Module, images: torch.Tensor, float_modules: list[str]) -> nn.Module:
    """Export, insert observers (x86 Inductor config), calibrate on `images`, convert to int8."""
    prepare_pt2e, convert_pt2e, xiq = _torchao()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    for name in float_modules:
        quantizer.set_module_name_qconfig(name, None)
    graph = exported(model.eval(), images).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in images.split(1):
            prepared(x)
    return convert_pt2e(prepared)


def fastest_agreeing(variants: dict[str, dict], speed, min_agreement: float = 0.97) -> str:
    """The variant with the lowest `speed(label)` among those whose `agreement` with FP32 is at least
    `min_agreement` (among all of them when none is)."""
    ok = [k for k, v in variants.items() if v["agreement"] >= min_agreement] or list(variants)
    return min(ok, key=speed)


def agreement(a: nn.Module, b: nn.Module, images: torch.Tensor) -> float:
    """Fraction of images on which two models predict the same class."""
    with torch.no_grad():
        return float((a(images).argmax(1) == b(images).argmax(1)).float().mean())


def deploy(model: nn.Module, images: torch.Tensor, skip_groups: dict[str, list[str]] | None = None,
           base_float: list[str] = (), units: dict[str, list[str]] | None = None,
           min_agreement: float = 0.97) -> Deployed:
    """int8 variants (everything int8 but `base_float`, then each group of `skip_groups` kept float in
    addition), compiled and timed at batch 1 against the compiled FP32 model; the fastest agreeing one wins.
    Then, per unit of `units` (the alignment layer's blocks: name -> its Linear / conv modules), the winner
    with that unit also in float is timed; the units whose int8 was measurably slower (> 3%) stay float
    together, when that combination is faster still."""
    model = model.eval()
    x = images[:1]
    fp32 = compile_frozen(model)
    variants, programs = {}, {}

    def ratio(label: str) -> float:
        return variants[label]["latency_ms"] / variants[label]["fp32_latency_ms"]

    def measure(label: str, float_modules: list[str]) -> float:
        program = quantize_pt2e(model, images, float_modules)
        fast = compile_frozen(Program(program))  # the wrapper: timing switches modes, exported graphs refuse to
        fp_ms, q_ms = compare_latency([fp32, fast], x.shape[-1], rounds=5, in_chans=x.shape[1])
        variants[label] = {"latency_ms": q_ms, "fp32_latency_ms": fp_ms, "float_modules": len(float_modules),
                           "agreement": agreement(model, Program(program), images)}
        programs[label] = (program, float_modules, fast)
        return ratio(label)

    def best() -> str:
        return fastest_agreeing(variants, ratio, min_agreement)

    kept: list[str] = list(base_float)
    measure("all int8" if not kept else "int8 except --exclude", list(kept))
    for group, modules in (skip_groups or {}).items():
        if modules:
            kept = kept + modules
            measure(f"{group} in float", list(kept))
    start = best()
    base = programs[start][1]
    slower: dict[str, list[str]] = {}
    for name, modules in (units or {}).items():
        extra = [m for m in modules if m not in base]
        if extra and measure(f"{start} + {name} in float", base + extra) < 0.97 * ratio(start):
            slower[name] = extra
    if len(slower) > 1:  # with one, its own variant is already the combination
        measure(f"{start} + {', '.join(slower)} in float", base + [m for ms in slower.values() for m in ms])
    choice = best()
    program, float_modules, fast = programs[choice]
    return Deployed(program, float_modules, choice, variants[choice]["fp32_latency_ms"],
                    variants[choice]["latency_ms"], variants, fast, fp32)


def strip_unused(program: nn.Module) -> nn.Module:
    """Drop the float parameters convert_pt2e leaves attached but no longer reads (they would double the file)."""
    used = {n.target for n in program.graph.nodes if n.op == "get_attr"}
    for name, _ in list(program.named_parameters()) + list(program.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            mod = program.get_submodule(owner) if owner else program
            delattr(mod, attr)
    return program


def save_program(program: nn.Module, example: torch.Tensor, path: str | os.PathLike, metadata: dict | None = None
                 ) -> Path:
    """Write the int8 program as a `torch.export` archive (.pt2), atomically, with the checkpoint's description."""
    return save_pt2(exported(strip_unused(program), example), path, metadata)


def fp32_size_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Size of the float model written as a torch.export archive: the like-for-like file to compare with."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fp32.pt2"
        torch.export.save(exported(model.eval(), example), str(path))
        return path.stat().st_size
