"""`compress eval` as a function: the test metric, parameters, MACs, file size and latency of a checkpoint.

Example:
    >>> ckpt, result = run("a.pt", "digits", EvalRun())
    >>> result["top1"], result["latency_ms"]
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .checkpoint import Checkpoint, as_checkpoints
from .data import data_for
from .device import hardware
from .errors import CompressError
from .measure import file_size, latency_ms, macs, param_count, score
from .programs import fast, is_program, load_program, program_metadata
from .result import Result, Row, state_bytes
from .steps import EvalRun

__all__ = ["EvalRun", "run"]


def run(inputs, data, cfg: EvalRun, **_) -> tuple[Checkpoint, Result]:
    """Measure one checkpoint on `data`; the checkpoint is returned unchanged (a chain passes it on).

    Example:
        >>> _, result = run("a.pt", "digits", EvalRun(split="val"))
        >>> result["top1"], result["latency_ms"]
    """
    if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
        inputs = inputs[0]
    if isinstance(inputs, (str, Path)) and is_program(inputs):
        return run_program(Path(inputs), data, cfg)
    (ckpt,) = as_checkpoints(inputs, at_most=1, at_least=1)
    start = time.perf_counter()
    device, _ = hardware(cfg)
    model = ckpt.build().to(device)
    d = data_for(ckpt, data, "eval", subset=cfg.subset)
    metric = "miou" if ckpt.task == "segmentation" else "top1"
    value = score(model, getattr(d, cfg.split), d.num_classes, ckpt.task)
    size, chans = ckpt.input.size, len(ckpt.input.mean)
    values = {"checkpoint": ckpt.source, "arch": ckpt.arch, "task": ckpt.task, "data": d.name, "split": cfg.split,
              metric: value, "params": param_count(model), "macs": macs(model, size, chans),
              "size_bytes": file_size(ckpt.source) if ckpt.source else state_bytes(model),
              "latency_ms": latency_ms(model, size, 1, runs=cfg.latency_runs, in_chans=chans),
              "latency_ms_batch32": latency_ms(model, size, 32, runs=max(cfg.latency_runs // 3, 5), in_chans=chans),
              "threads": torch.get_num_threads(), "device": str(device)}
    row = Row(ckpt.source or ckpt.arch, metric, value, values["params"], values["macs"], values["size_bytes"],
              round(values["latency_ms"], 3), round(values["latency_ms_batch32"], 3))
    seconds = time.perf_counter() - start
    return ckpt, Result("eval", metric, value, values, [row], seconds=seconds)


def run_program(path: Path, data, cfg: EvalRun) -> tuple[Checkpoint, Result]:
    """A deployed program (.pt2 or .onnx) scored and timed as it runs fast, fed as its description says.

    Example:
        >>> _, result = run_program(Path("model.int8.onnx"), "digits", EvalRun())
    """
    start = time.perf_counter()
    meta = program_metadata(path)
    if not meta:
        raise CompressError(f"'{path}' carries no description", expected="a program written by compress quantize "
                            "--deploy (it stores the input size, normalisation and classes)")
    meta.pop("format", None)
    ckpt = Checkpoint(**meta, source=str(path))
    d = data_for(ckpt, data, "eval", subset=cfg.subset)
    program = load_program(path)
    metric = "miou" if ckpt.task == "segmentation" else "top1"
    value = score(program, getattr(d, cfg.split), d.num_classes, ckpt.task)
    runner, size, chans = fast(program), ckpt.input.size, len(ckpt.input.mean)
    values = {"checkpoint": str(path), "arch": ckpt.arch, "task": ckpt.task, "data": d.name, "split": cfg.split,
              metric: value, "size_bytes": file_size(path), "runtime": "onnxruntime" if path.suffix == ".onnx"
              else "inductor", "latency_ms": latency_ms(runner, size, 1, runs=cfg.latency_runs, in_chans=chans),
              "latency_ms_batch32": latency_ms(runner, size, 32, runs=max(cfg.latency_runs // 3, 5), in_chans=chans),
              "threads": torch.get_num_threads()}
    row = Row(str(path), metric, value, size_bytes=values["size_bytes"], latency_ms=round(values["latency_ms"], 3),
              latency_ms_b32=round(values["latency_ms_batch32"], 3), runtime=values["runtime"])
    return ckpt, Result("eval", metric, value, values, [row], seconds=time.perf_counter() - start)
