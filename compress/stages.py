"""The stages of a run measured side by side: each step's output checkpoint (and each int8 program a step
deployed), scored on its data's test split and timed in one process, in interleaved rounds, at batch 1 and
32, each at its own input size.

Example:
    >>> rows = measure_stages([("fused", Path("run/fused/model.pt"), "digits", 35.2, None)])
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load
from .data import load_data
from .errors import CompressError
from .measure import compare_latency, file_size, macs, param_count, score
from .programs import compile_frozen, fast, load_program
from .result import Row


def measure_stages(stages: list[tuple]) -> list[Row]:
    """`stages`: (name, checkpoint path, data spec, seconds the step took, int8 program path or None, the
    program's float model: an .onnx path or a checkpoint). A fake-quantized checkpoint is scored but not
    timed (simulation is slower than either real program); a deployed program is timed as it runs fast
    (Inductor for .pt2, ONNX Runtime for .onnx), beside its float model on the same runtime."""
    data_cache: dict = {}
    rows: list[Row] = []
    timed: list[tuple[int, object, int, int]] = []  # (row index, model, input size, channels)

    def test_set(spec: str, ckpt):
        key = (spec, ckpt.input.size, ckpt.input.mean, ckpt.input.std, ckpt.task)
        if key not in data_cache:
            data_cache[key] = load_data(spec, ckpt.input, ckpt.task)
        return data_cache[key]

    for name, path, spec, secs, program_path, float_path in stages:
        ckpt = load(path)
        model = ckpt.build()
        d = test_set(spec, ckpt)
        metric = "miou" if ckpt.task == "segmentation" else "top1"
        size, chans = ckpt.input.size, len(ckpt.input.mean)
        simulated = any(op.get("op") == "quantize" for op in ckpt.structure)
        rows.append(Row(name, metric, score(model, d.test, d.num_classes, ckpt.task), param_count(model),
                        None if simulated else macs(model, size, chans), file_size(path), seconds=secs,
                        runtime="simulated" if simulated else "eager",
                        note="fake-quant: scored, not timed" if simulated else ""))
        if not simulated:
            timed.append((len(rows) - 1, model, size, chans))
        if program_path:
            program = load_program(program_path)
            onnx = Path(program_path).suffix == ".onnx"
            where = "onnxruntime" if onnx else "inductor"
            rows.append(Row(f"{name} int8 program", metric, score(program, d.test, d.num_classes, ckpt.task),
                            size_bytes=file_size(program_path), runtime=where, note=f"from {Path(program_path).name}"))
            timed.append((len(rows) - 1, fast(program), size, chans))
            if onnx != (Path(float_path).suffix == ".onnx"):  # else an eager model would be timed as the program's twin
                raise CompressError(f"the float model beside {program_path} runs on another runtime",
                                    expected="an .onnx float model for an ONNX program, a checkpoint for a .pt2 one",
                                    found=str(float_path))
            fp32 = load_program(float_path) if onnx else load(float_path).build()
            rows.append(Row(f"{name} fp32 program", metric, score(fp32, d.test, d.num_classes, ckpt.task),
                            size_bytes=file_size(float_path) if onnx else None, runtime=where,
                            note="its float model, same runtime"))
            timed.append((len(rows) - 1, fp32 if onnx else compile_frozen(fp32), size, chans))
    if timed:
        models, sizes, chans = [t[1] for t in timed], [t[2] for t in timed], [t[3] for t in timed]
        b1 = compare_latency(models, sizes, 1, in_chans=chans)
        b32 = compare_latency(models, sizes, 32, runs=5, in_chans=chans)
        for (i, *_), a, b in zip(timed, b1, b32):
            rows[i].latency_ms, rows[i].latency_ms_b32 = round(a, 3), round(b, 3)
    return rows

