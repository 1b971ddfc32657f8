"""`compress quantize` as a function: calibrate (simulated PTQ), per-site sensitivity, and optionally a real
int8 program measured against FP32 on the same backend.

Example:
    >>> ckpt, result = run("vit.pt", "digits", QuantizeRun(bits="w8a8", deploy="vit.int8.pt2"))
    >>> result["top1"], result["int8_top1"], result["int8_speedup"]
"""

from __future__ import annotations

import copy
import time

import torch

from compress.checkpoint import Checkpoint, as_checkpoints
from compress.data import data_for, spec_of
from compress.errors import CompressError
from compress.measure import file_size, top1
from compress.result import Result, batch_of, measure_rows

from .calibrate import calibrate, sensitivity
from .config import QuantConfig, QuantizeRun
from .engine import sites_to_json

__all__ = ["run", "QuantizeRun"]


def run(inputs, data, cfg: QuantizeRun, **_) -> tuple[Checkpoint, Result]:
    """Quantize the input checkpoint (a classifier) with `cfg`; the checkpoint returned holds the
    fake-quantized model (`compress eval` rebuilds it), `cfg.deploy` also writes the int8 program.

    Example:
        >>> ckpt, result = run("vit.pt", "digits", QuantizeRun(method="qhyvit", bits="w6a6"))
        >>> result["fp32_top1"], result["top1"]
    """
    (ckpt,) = as_checkpoints(inputs, at_most=1, at_least=1)
    d = data_for(ckpt, data, "quantize", classifier=True, subset=cfg.subset)
    images = batch_of(d.train, cfg.calib)
    expected = (len(ckpt.input.mean), ckpt.input.size, ckpt.input.size)
    if tuple(images.shape[1:]) != expected:
        raise CompressError("calibration images do not fit the model", expected=f"inputs of shape {expected}",
                            found=f"{tuple(images.shape[1:])} from {d.name}")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    original = ckpt.build()
    model = copy.deepcopy(original)
    qm, info = calibrate(model, images, QuantConfig(**{k: getattr(cfg, k) for k in QuantConfig.__dataclass_fields__
                                                       if k not in ("w_bits", "a_bits")}))
    values = {"checkpoint": ckpt.source, "arch": ckpt.arch, "method": cfg.method, "bits": cfg.bits,
              "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "calib": cfg.calib, "data": d.name,
              "fp32_top1": top1(original, d.test), "top1": top1(qm, d.test),
              "calib_seconds": round(info["calib_seconds"], 2), "sites": len(info["sites"]),
              "site_quantizers": info["sites"], "float_sites": info["skipped"], "bridge_blocks": info["bridges"],
              "reconstruction": info["reconstruction"], "folded_norms": info["folded_norms"]}
    sens = sensitivity(qm, images)
    values["sensitivity_db"] = {k: round(v, 2) for k, v in sens.items()}
    notes = []
    if info["skipped"]:
        notes.append(f"kept in float: {len(info['skipped'])} sites, e.g. "
                     + ", ".join(f"{k} ({v})" for k, v in list(info["skipped"].items())[:3]))
    if cfg.sensitivity_plot:
        plot_sensitivity(sens, cfg.sensitivity_plot, f"{ckpt.arch} {cfg.method} {cfg.bits}")
    named = [("fp32", original), (f"{cfg.method} {cfg.bits} (simulated)", qm)]
    scores = {"fp32": values["fp32_top1"], named[1][0]: values["top1"]}
    runtime = {named[1][0]: "simulated"}
    seconds = {named[1][0]: info["calib_seconds"]}
    sizes = {}
    if cfg.deploy:
        dep, deployed = deploy_int8(original, images, qm, info, cfg.deploy, d.test)
        values.update(deployed)
        named += [("fp32 compiled (Inductor)", dep.fp32_compiled), ("int8 program (PT2E, Inductor)", dep.compiled)]
        scores |= {"fp32 compiled (Inductor)": values["fp32_top1"], "int8 program (PT2E, Inductor)": values["int8_top1"]}
        runtime |= {"fp32 compiled (Inductor)": "inductor", "int8 program (PT2E, Inductor)": "inductor"}
        sizes = {"fp32 compiled (Inductor)": values["fp32_size_bytes"],
                 "int8 program (PT2E, Inductor)": values["int8_size_bytes"]}
        if values["int8_speedup"] < 1:
            notes.append(f"the int8 program is {1 / values['int8_speedup']:.2f}x slower than FP32 on this backend "
                         "with every variant tried: deploy the FP32 model here")
    rows = measure_rows(named, d.test, d.num_classes, ckpt.input.size, d.task, len(ckpt.input.mean), seconds=seconds,
                        scores=scores, sizes=sizes, runtime=runtime)
    op = {"op": "quantize", "method": cfg.method, "bits": cfg.bits, "sites": sites_to_json(list(qm.sites.values())),
          "quantizers": qm.specs()}
    out = ckpt.derive(qm, "quantize", [ckpt], spec_of(data), cfg,
                      {"fp32_top1": values["fp32_top1"], "top1": values["top1"]}, structure=[*ckpt.structure, op])
    worst = sorted(sens.items(), key=lambda kv: kv[1])[:10]
    tables = {f"most sensitive sites of {ckpt.arch} ({cfg.method} {cfg.bits}; logit SQNR with only that site "
              "quantized; low = sensitive)": [{"site": k, "quantizers": info["sites"][k], "SQNR dB": round(v, 2)}
                                             for k, v in worst]}
    return out, Result("quantize", "top1", values["top1"], values, rows, notes, time.perf_counter() - t0, tables)


def deploy_int8(original, images, qm, info, path: str, test) -> tuple:
    """Write the int8 program to `path` and measure it against FP32 on the same backend (torch's threads)."""
    from compress.alignment import align

    from .deploy import deploy, fp32_size_bytes, load_program, save_program

    blocks = align(original, images.shape[-1], images.shape[1]).blocks
    dense = [s for s in qm.sites.values() if s.op in ("conv", "linear")]
    convs = [s.module for s in dense if s.op == "conv" and s.groups > 1]
    in_bridges = [s.module for s in dense if any(s.inside(b.name) for b in blocks if b.kind == "bridge")]
    excluded = sorted({s.module for s in dense if s.name in info["skipped"]})
    groups = {"grouped convs": sorted(set(convs)), "bridge blocks": sorted(set(in_bridges))}
    units = {b.name: sorted({s.module for s in dense if s.inside(b.name)}) for b in blocks}
    dep = deploy(original, images, groups, base_float=excluded, units=units)
    save_program(dep.program, images, path)
    program = load_program(path)
    return dep, {"deploy": path, "deploy_choice": dep.choice, "deploy_variants": dep.variants,
                 "float_modules": dep.float_modules, "fp32_latency_ms": round(dep.fp32_latency_ms, 3),
                 "int8_latency_ms": round(dep.int8_latency_ms, 3),
                 "int8_speedup": round(dep.fp32_latency_ms / dep.int8_latency_ms, 2),
                 "fp32_size_bytes": fp32_size_bytes(original, images), "int8_size_bytes": file_size(path),
                 "int8_top1": top1(program, test), "deploy_threads": torch.get_num_threads()}


def plot_sensitivity(sens: dict, path: str, title: str) -> None:
    """Per-site logit SQNR with only that site quantized (PNG)."""
    from compress.plots import figure, save_figure

    names = list(sens)
    fig, ax = figure(max(6, len(names) * 0.12), 3.5)
    ax.bar(range(len(names)), [sens[n] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
    ax.set_ylabel("logit SQNR (dB), only this site quantized")
    ax.set_title(title)
    save_figure(fig, path)
