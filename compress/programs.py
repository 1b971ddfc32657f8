"""Deployed programs: torch.export archives (`.pt2`, run with Inductor) and ONNX models (`.onnx`, run with
ONNX Runtime), written by deployment, read, scored and timed like any model.

Neither format holds pickled code. Each carries the checkpoint's description (architecture, classes, task,
input spec, provenance) beside the graph (`compress.json` in the archive, `metadata_props` in the ONNX model),
so `compress eval model.onnx --data digits` knows how to feed it. `Program` and `OrtProgram` let evaluation
code treat a program like a module; `fast(program)` is how each runs fast on a CPU.

Example:
    >>> program = load_program("model.int8.onnx")
    >>> top1(fast(program), data.test), program_metadata("model.int8.onnx")["input"]
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import CompressError

SUFFIXES = (".pt2", ".onnx")
_KEY = "compress.json"


def is_program(path: str | os.PathLike) -> bool:
    return Path(path).suffix in SUFFIXES


def exported(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch when the model allows it (batch 1 otherwise: `Program` then runs
    larger batches image by image). The examples are cloned: an archive keeps them, and a slice would drag
    its whole storage (the data set) into the file."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        return torch.export.export(model, (example[:2].clone(),), dynamic_shapes=({0: batch},))
    except Exception:  # some models specialise the batch
        return torch.export.export(model, (example[:1].clone(),))


def compile_frozen(model: nn.Module, backend: str = "inductor"):
    """Inductor with weight freezing: constant-folds the int8 weights into oneDNN kernels.

    A `Program` is compiled inside its wrapper: every wrapper runs the same `Program.forward`, whose compiled
    versions torch caches together, and past its recompile limit (8) each further program would silently
    run eager (the variant search of `quantize/deploy.py` compiles a dozen). Each exported graph has code of
    its own.

    Example:
        >>> fast = compile_frozen(load_program("model.int8.pt2"))
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    if isinstance(model, Program):
        inner = Program(torch.compile(model.graph, backend=backend))
        inner.per_sample = model.per_sample
        return inner
    return torch.compile(model, backend=backend)


class Program(nn.Module):
    """An exported program as a module that evaluation code can treat like any model (exported graphs refuse
    `.eval()`; they have no training mode to switch)."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph
        self.per_sample: bool | None = None  # learnt on the first batch: some exports specialise batch 1

    def train(self, mode: bool = True):
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_sample is None and x.shape[0] > 1:
            try:
                out = self.graph(x)
                self.per_sample = False
                return out
            except (AssertionError, RuntimeError):
                self.per_sample = True
        if self.per_sample:
            return torch.cat([self.graph(xi) for xi in x.split(1)])
        return self.graph(x)


class OrtProgram(nn.Module):
    """An ONNX model in an ONNX Runtime CPU session, called like a module (tensors in, tensors out).
    `threads` is the session's intra-op thread count (default: torch's, so timings compare like for like);
    `optimize=False` runs the graph as written (a QDQ model then computes in float between its Q/DQ pairs: the
    reference its fused int8 kernels should reproduce)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, optimize: bool = True):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        level = ort.GraphOptimizationLevel
        opts.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def train(self, mode: bool = True):
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().contiguous().numpy()})[0])


def save_pt2(ep: torch.export.ExportedProgram, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write an exported program as a `.pt2` archive, atomically, with the checkpoint's description."""
    from .checkpoint import atomic_write

    extra = {_KEY: json.dumps(metadata, default=list)} if metadata else None
    return atomic_write(Path(path), lambda tmp: torch.export.save(ep, str(tmp), extra_files=extra))


def save_onnx(model_proto, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write an ONNX model, atomically, with the checkpoint's description in its metadata."""
    import onnx

    from .checkpoint import atomic_write

    if metadata:
        del model_proto.metadata_props[:]
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = _KEY, json.dumps(metadata, default=list)
    return atomic_write(Path(path), lambda tmp: onnx.save(model_proto, str(tmp)))


def program_metadata(path: str | os.PathLike) -> dict | None:
    """The checkpoint description stored with a program, or None."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[_KEY]) if _KEY in props else None
    with zipfile.ZipFile(path) as z:  # an archive's extra files, read without deserialising the graph
        entry = next((n for n in z.namelist() if n.endswith(f"/extra/{_KEY}")), None)
        return json.loads(z.read(entry)) if entry else None


def load_program(path: str | os.PathLike, threads: int | None = None) -> nn.Module:
    """A `.pt2` archive as a `Program` (eager; `fast` compiles it) or an `.onnx` model as an `OrtProgram`."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"program '{path}' not found", expected="an existing .pt2 or .onnx file")
    if path.suffix == ".onnx":
        return OrtProgram(path, threads)
    if path.suffix != ".pt2":
        raise CompressError(f"cannot run '{path}'", expected="a .pt2 archive or an .onnx model")
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the int8 ops a PT2E graph calls)

    return Program(torch.export.load(str(path)).module())


def fast(program: nn.Module) -> nn.Module:
    """How a program runs fast on a CPU: a `.pt2` program compiled with Inductor (frozen weights); ONNX
    Runtime sessions already optimise their graph."""
    return program if isinstance(program, OrtProgram) else compile_frozen(program)
