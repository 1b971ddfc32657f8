"""int8 for ONNX Runtime: the float model exported to ONNX, then ONNX Runtime's static quantization (QDQ,
weights 8-bit per output channel, activations uint8 per tensor) calibrated on the same images as our PTQ, both
run and timed in ONNX Runtime side by side.

Weights are int8 (u8s8 kernels) where the CPU has VNNI or is not x86, and uint8 (u8u8) on an x86 CPU without
VNNI: there ORT's u8s8 kernels use VPMADDUBSW, whose 16-bit pair sums saturate (ORT's quantization guide says
so), and the program then answers differently from its own QDQ graph. Measured on a 3-epoch digits ResNet
(AVX2, no VNNI): u8s8 int8 kernels 90.93 top-1, the same QDQ graph run unfused 91.69, u8u8 91.69 (both),
FP32 92.19.

ONNX Runtime quantizes the ops it has int8 kernels for and leaves the others in float; `float_ops` lists the
compute ops that stayed float, and the report says so.

Example:
    >>> fp32, int8 = export_onnx(model, images, "m.fp32.onnx", meta), quantize_onnx("m.fp32.onnx", images, "m.onnx", meta)
    >>> top1(OrtProgram("m.onnx"), data.test)
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError
from compress.programs import save_onnx

COMPUTE_OPS = {"Conv", "MatMul", "Gemm", "ConvTranspose"}
WEIGHT_TYPES = ("auto", "s8", "u8")


def saturating_cpu() -> bool:
    """True on an x86 CPU without VNNI (AVX512-VNNI, AVX-VNNI or AMX), where ORT's u8s8 kernels saturate.
    Unknown flags (no /proc/cpuinfo) count as saturating: u8u8 is exact everywhere, only sometimes slower."""
    if platform.machine().lower() not in {"x86_64", "amd64", "i386", "i686", "x86"}:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", flags) is None


def weight_type(choice: str = "auto") -> str:
    """`s8` or `u8` for ORT's weights: `auto` picks u8 where s8 would saturate (see `saturating_cpu`)."""
    if choice not in WEIGHT_TYPES:
        raise CompressError("unknown ONNX Runtime weight type", expected=" / ".join(WEIGHT_TYPES), found=choice)
    if choice == "auto":
        return "u8" if saturating_cpu() else "s8"
    return choice


def export_onnx(model: nn.Module, images: torch.Tensor, path: str | os.PathLike, metadata: dict | None = None,
                opset: int = 17) -> Path:
    """The float model as ONNX with a dynamic batch (TorchScript-based exporter, opset 17); an op the
    exporter cannot write is a one-line error."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / "model.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model.eval(), (images[:2].clone(),), str(tmp), input_names=["input"],
                                  output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                                  opset_version=opset, dynamo=False)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; the message is what matters
            raise CompressError("cannot export the model to ONNX", expected=f"ops that ONNX opset {opset} has",
                                found=str(e).splitlines()[0][:200]) from None
        return save_onnx(onnx.load(str(tmp)), path, metadata)


# Which ops the QDQ graph quantizes: every op ONNX Runtime can (the default), or only the dense ones. Leaving
# MatMul / the element-wise ops float avoids Q/DQ pairs around the attention and reshapes of hybrids, which at
# batch 1 can cost more than int8 saves (EfficientFormer-L1 widths: docs/BENCHMARKS.md, int8 width).
ORT_VARIANTS = {"all ops": None, "conv/matmul/gemm": ("Conv", "MatMul", "Gemm"), "conv/gemm": ("Conv", "Gemm")}


def quantize_onnx(fp32_path: str | os.PathLike, images: torch.Tensor, path: str | os.PathLike,
                  metadata: dict | None = None, weights: str = "s8", ops: tuple[str, ...] | None = None) -> Path:
    """ONNX Runtime static quantization (QDQ, per-channel `weights`: s8 or u8; activations u8 per tensor)
    calibrated on `images`, one by one; `ops` limits it to those op types (default: every op it can)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x.numpy()} for x in images.split(1)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as d:
        pre, out = Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre))  # shape inference + graph optimisation, as ORT advises
        quantize_static(str(pre), str(out), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8,
                        weight_type={"s8": QuantType.QInt8, "u8": QuantType.QUInt8}[weights],
                        **({} if ops is None else {"op_types_to_quantize": list(ops)}))
        return save_onnx(onnx.load(str(out)), path, metadata)


def float_ops(path: str | os.PathLike) -> list[str]:
    """Compute nodes (Conv, MatMul, Gemm) of a QDQ model whose inputs are not dequantized: left in float."""
    import onnx

    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [f"{n.op_type} {n.name}" for n in graph.node
            if n.op_type in COMPUTE_OPS and not any(i in dequantized for i in n.input[:1])]
