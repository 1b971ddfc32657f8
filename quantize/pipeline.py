"""`compress quantize` as a function: calibrate (simulated PTQ), per-site sensitivity, and optionally a real
int8 program measured against FP32 on the same backend.

Example:
    >>> ckpt, result = run("vit.pt", "digits", QuantizeRun(bits="w8a8", deploy="vit.int8.pt2"))
    >>> result["top1"], result["int8_top1"], result["int8_speedup"]
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.checkpoint import Checkpoint, as_checkpoints
from compress.data import data_for, spec_of
from compress.device import resolve_device
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
    device = resolve_device(cfg.device)  # a missing device is refused before any work
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    original = ckpt.build()  # stays on the CPU: the int8 backends start from it
    model = copy.deepcopy(original).to(device)
    qm, info = calibrate(model, images, QuantConfig(**{k: getattr(cfg, k) for k in QuantConfig.__dataclass_fields__
                                                       if k not in ("w_bits", "a_bits")}))
    values = {"checkpoint": ckpt.source, "arch": ckpt.arch, "method": cfg.method, "bits": cfg.bits,
              "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "calib": cfg.calib, "data": d.name,
              "fp32_top1": top1(original, d.test), "top1": top1(qm, d.test),
              "calib_seconds": round(info["calib_seconds"], 2), "sites": len(info["sites"]),
              "site_quantizers": info["sites"], "float_sites": info["skipped"], "bridge_blocks": info["bridges"],
              "reconstruction": info["reconstruction"], "folded_norms": info["folded_norms"],
              "device": str(device)}
    sens = sensitivity(qm, images)
    values["sensitivity_db"] = {k: round(v, 2) for k, v in sens.items()}
    notes = []
    if info["skipped"]:
        notes.append(f"kept in float: {len(info['skipped'])} sites, e.g. "
                     + ", ".join(f"{k} ({v})" for k, v in list(info["skipped"].items())[:3]))
    if info.get("minmax_sites"):
        values["minmax_sites"] = info["minmax_sites"]
        notes.append(f"{cfg.method}: min-max's quantizers kept at {len(info['minmax_sites'])} site(s) where they gave "
                     f"the logits a higher SQNR, e.g. {info['minmax_sites'][0]}")
    recon = info["reconstruction"]
    if recon and cfg.recon_iters > 0:
        kept = [k for k, v in recon.items() if v["mse_after"] < v["mse_before"]]
        notes.append(f"bridge reconstruction: learned rounding kept on {len(kept)} of {len(recon)} bridge blocks (where "
                     "it lowered the block's error on held-out calibration images); the others keep nearest rounding")
    ruinous = {k: v for k, v in sens.items() if v < 10}
    if ruinous:  # one site that alone takes the logits below 10 dB SQNR is the first thing a user must see
        worst_site = min(ruinous, key=ruinous.get)
        notes.append(f"{len(ruinous)} site(s) alone bring the logit SQNR below 10 dB; worst: {worst_site} "
                     f"({ruinous[worst_site]:.1f} dB, quantizers {info['sites'].get(worst_site, '?')}): keep it in "
                     f"float (--exclude) or use a method that chooses its granularity (qhyvit)")
    if cfg.sensitivity_plot:
        plot_sensitivity(sens, cfg.sensitivity_plot, f"{ckpt.arch} {cfg.method} {cfg.bits}")
    named = [("fp32", original), (f"{cfg.method} {cfg.bits} (simulated)", qm)]
    scores = {"fp32": values["fp32_top1"], named[1][0]: values["top1"]}
    runtime = {named[1][0]: "simulated"}
    seconds = {named[1][0]: info["calib_seconds"]}
    sizes = {}
    deployments = []
    if cfg.deploy:
        meta = ckpt.derive(original, "quantize", [ckpt], spec_of(data), cfg).metadata()
        targets = deploy_targets(cfg.deploy)
        with tempfile.TemporaryDirectory() as tmp:
            for backend, final in targets.items():  # with several backends, candidates wait in a scratch folder
                path = Path(tmp) / f"candidate{final.suffix}" if len(targets) > 1 else final
                build = deploy_pt2e if backend == "pt2e" else deploy_onnxruntime
                deployments.append(build(original, images, qm, info, path, d.test, meta, cfg))
                if deployments[-1].extra.get("weights") == "u8" and cfg.ort_weights == "auto":
                    notes.append("ONNX Runtime: weights u8, since this x86 CPU has no VNNI and ORT's s8-weight kernels "
                                 "saturate on it; for a VNNI target build with --ort-weights s8")
                if deployments[-1].backend == "onnxruntime":
                    v = deployments[-1].extra["deploy_variants"]
                    notes.append(f"ONNX Runtime: int8 on {deployments[-1].extra['deploy_choice']}, the fastest at batch 1 "
                                 "that agrees with FP32 (" + ", ".join(f"{k} {x['latency_ms']:.2f} ms" for k, x in v.items())
                                 + f"; FP32 {next(iter(v.values()))['fp32_latency_ms']:.2f} ms)")
            for dep in deployments:
                for which in ("fp32", "int8"):
                    name = f"{which} ({dep.label})"
                    named.append((name, getattr(dep, which)))
                    scores[name], runtime[name] = getattr(dep, f"{which}_top1"), dep.runtime
                    sizes[name] = getattr(dep, f"{which}_size")
            rows = measure_rows(named, d.test, d.num_classes, ckpt.input.size, d.task, len(ckpt.input.mean),
                                seconds=seconds, scores=scores, sizes=sizes, runtime=runtime)
            by_name = {r.name: r for r in rows}
            chosen = choose(deployments, by_name, notes)
            if len(targets) == 1:  # the backend the user named: its file stays, the notes say what it missed
                chosen = deployments[0]
            elif chosen is not None:
                keep(chosen, targets[chosen.backend])
        values.update(deployed_values(deployments, by_name, chosen, targets))
    else:
        rows = measure_rows(named, d.test, d.num_classes, ckpt.input.size, d.task, len(ckpt.input.mean),
                            seconds=seconds, scores=scores, sizes=sizes, runtime=runtime)
    op = {"op": "quantize", "method": cfg.method, "bits": cfg.bits, "sites": sites_to_json(list(qm.sites.values())),
          "quantizers": qm.specs()}
    out = ckpt.derive(qm, "quantize", [ckpt], spec_of(data), cfg,
                      {"fp32_top1": values["fp32_top1"], "top1": values["top1"]}, structure=[*ckpt.structure, op])
    worst = sorted(sens.items(), key=lambda kv: kv[1])[:10]
    tables = {f"most sensitive sites of {ckpt.arch} ({cfg.method} {cfg.bits}; logit SQNR with only that site "
              "quantized; low = sensitive)": [{"site": k, "quantizers": info["sites"][k], "SQNR dB": round(v, 2)}
                                             for k, v in worst]}
    return out, Result("quantize", "top1", values["top1"], values, rows, notes, time.perf_counter() - t0, tables)


BACKENDS = {".pt2": "pt2e", ".onnx": "onnxruntime"}


def deploy_targets(deploy: str) -> dict[str, Path]:
    """Backend -> output path. A `.pt2` path names PT2E / Inductor, an `.onnx` path ONNX Runtime; any other path
    is a base for both (`--deploy auto`): both are built and measured and the fastest int8 program that keeps
    top-1 within a point of FP32 is written as `<base>.pt2` or `<base>.onnx`.

    Example:
        >>> deploy_targets("out/model.int8")
        {'pt2e': PosixPath('out/model.int8.pt2'), 'onnxruntime': PosixPath('out/model.int8.onnx')}
    """
    path = Path(deploy)
    if path.suffix in BACKENDS:
        return {BACKENDS[path.suffix]: path}
    return {backend: path.with_name(path.name + suffix) for suffix, backend in BACKENDS.items()}


@dataclass
class Deployment:
    """One backend's int8 program beside its float model, both ready to run fast and scored."""

    backend: str
    label: str
    runtime: str
    path: Path
    fp32: nn.Module
    int8: nn.Module
    fp32_top1: float
    int8_top1: float
    fp32_size: int
    int8_size: int
    extra: dict = field(default_factory=dict)


def deploy_pt2e(original, images, qm, info, path: Path, test, metadata: dict, cfg: QuantizeRun) -> Deployment:
    """PT2E / x86 Inductor: the variant search of `deploy.py`, the program written (with the checkpoint's
    description) and reloaded from its file, as a user will run it."""
    from compress.alignment import align
    from compress.programs import fast, load_program

    from .deploy import deploy, fp32_size_bytes, save_program

    blocks = align(original, images.shape[-1], images.shape[1]).blocks
    dense = [s for s in qm.sites.values() if s.op in ("conv", "linear")]
    convs = [s.module for s in dense if s.op == "conv" and s.groups > 1]
    in_bridges = [s.module for s in dense if any(s.inside(b.name) for b in blocks if b.kind == "bridge")]
    excluded = sorted({s.module for s in dense if s.name in info["skipped"]})
    groups = {"grouped convs": sorted(set(convs)), "bridge blocks": sorted(set(in_bridges))}
    units = {b.name: sorted({s.module for s in dense if s.inside(b.name)}) for b in blocks}
    dep = deploy(original, images, groups, base_float=excluded, units=units)
    save_program(dep.program, images, path, metadata)
    program = load_program(path)
    return Deployment("pt2e", "PT2E, Inductor", "inductor", path, dep.fp32_compiled, fast(program),
                      top1(original, test), top1(program, test), fp32_size_bytes(original, images), file_size(path),
                      {"deploy_choice": dep.choice, "deploy_variants": dep.variants, "float_modules": dep.float_modules})


def deploy_onnxruntime(original, images, qm, info, path: Path, test, metadata: dict, cfg: QuantizeRun) -> Deployment:
    """ONNX Runtime: the float model exported (kept beside the int8 one as `<name>.fp32.onnx`) and statically
    quantized on the same calibration images (weights as `cfg.ort_weights` resolves), once per op set of
    `ORT_VARIANTS`; the variants are timed at batch 1 side by side with FP32, and the fastest whose
    predictions agree with FP32 on the calibration images (>= 97%, as for PT2E) is written to `path`."""
    from compress.measure import compare_latency
    from compress.programs import OrtProgram

    from .deploy import agreement, fastest_agreeing
    from .ort import ORT_VARIANTS, export_onnx, float_ops, quantize_onnx, weight_type

    fp32_path = path.with_name(path.name.removesuffix(path.suffix) + ".fp32.onnx")
    export_onnx(original, images, fp32_path, metadata)
    weights = weight_type(cfg.ort_weights)
    fp32 = OrtProgram(fp32_path)
    # the candidates wait in a scratch folder beside the output (same file system: the winner's move is atomic,
    # and an interrupted run leaves no candidate behind)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".ort-variants-") as scratch:
        paths = {label: Path(scratch) / f"{i}.onnx" for i, label in enumerate(ORT_VARIANTS)}
        programs = {}
        for label, ops in ORT_VARIANTS.items():
            quantize_onnx(fp32_path, images, paths[label], metadata, weights, ops)
            programs[label] = OrtProgram(paths[label])
        ms = compare_latency([fp32, *programs.values()], images.shape[-1], rounds=5, in_chans=images.shape[1])
        variants = {label: {"latency_ms": round(t, 3), "fp32_latency_ms": round(ms[0], 3),
                            "agreement": agreement(fp32, programs[label], images)}
                    for label, t in zip(programs, ms[1:])}
        choice = fastest_agreeing(variants, lambda k: variants[k]["latency_ms"])
        del programs  # the sessions hold the files open on some systems
        os.replace(paths[choice], path)
    int8 = OrtProgram(path)
    return Deployment("onnxruntime", "ONNX Runtime", "onnxruntime", path, fp32, int8, top1(fp32, test),
                      top1(int8, test), file_size(fp32_path), file_size(path),
                      {"fp32_path": str(fp32_path), "float_ops": float_ops(path), "weights": weights,
                       "deploy_choice": choice, "deploy_variants": variants})


def keep(chosen: Deployment, final: Path) -> None:
    """Move the chosen candidate's files (the int8 program, and ONNX's float model beside it) to `final`."""
    stem = final.name.removesuffix(final.suffix)
    for src in chosen.path.parent.glob(f"candidate*{final.suffix}"):
        shutil.move(src, final.with_name(stem + src.name.removeprefix("candidate")))
    if "fp32_path" in chosen.extra:
        chosen.extra["fp32_path"] = str(final.with_name(stem + ".fp32.onnx"))
    chosen.path = final


def choose(deployments: list[Deployment], rows: dict, notes: list[str]) -> Deployment | None:
    """The fastest int8 program (batch 1, timed side by side) whose top-1 is within a point of FP32; notes
    for every bound missed and for an int8 program slower than the fastest float one."""
    ok = []
    for dep in deployments:
        if dep.int8_top1 < dep.fp32_top1 - 1:
            notes.append(f"{dep.label}: int8 top-1 {dep.int8_top1:.2f} is more than a point under FP32 "
                         f"{dep.fp32_top1:.2f}")
        else:
            ok.append(dep)
        if dep.extra.get("float_ops"):
            notes.append(f"{dep.label}: {len(dep.extra['float_ops'])} compute ops stayed float "
                         f"(e.g. {', '.join(dep.extra['float_ops'][:3])})")
    if not ok:
        return None
    ms = {d.backend: rows[f"int8 ({d.label})"].latency_ms for d in ok}
    best = min(ok, key=lambda d: ms[d.backend])
    floats = {d.label: rows[f"fp32 ({d.label})"].latency_ms for d in deployments}
    fastest_float = min(floats, key=floats.get)
    if ms[best.backend] > floats[fastest_float]:
        notes.append(f"the fastest int8 program ({best.label}, {ms[best.backend]:.2f} ms) is slower than FP32 in "
                     f"{fastest_float} ({floats[fastest_float]:.2f} ms) at batch 1: deploy that FP32 model here")
    return best


def deployed_values(deployments: list[Deployment], rows: dict, chosen: Deployment | None, targets: dict) -> dict:
    """The JSON of the deployment: every backend measured, and the chosen one's numbers at the top level."""
    per = {}
    for dep in deployments:
        f, q = rows[f"fp32 ({dep.label})"], rows[f"int8 ({dep.label})"]
        per[dep.backend] = {"fp32_top1": dep.fp32_top1, "int8_top1": dep.int8_top1, "fp32_latency_ms": f.latency_ms,
                            "int8_latency_ms": q.latency_ms, "fp32_latency_ms_batch32": f.latency_ms_b32,
                            "int8_latency_ms_batch32": q.latency_ms_b32, "fp32_size_bytes": dep.fp32_size,
                            "int8_size_bytes": dep.int8_size,
                            "int8_speedup": round(f.latency_ms / q.latency_ms, 2), **dep.extra}
    out = {"deployments": per, "deploy_threads": torch.get_num_threads(),
           "deploy_backend": chosen.backend if chosen else None,
           "deploy": str(targets[chosen.backend]) if chosen else None}
    if chosen:
        out.update({k: v for k, v in per[chosen.backend].items() if k not in ("fp32_path",)})
    return out


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
