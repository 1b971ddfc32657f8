"""Is int8 slower than FP32 on the hybrids because they are small? The same hybrids at real widths (random
weights: only speed is measured), FP32 against int8 at batch 1 (or --batch), 2 threads, on this machine:

- ONNX Runtime: FP32, and static QDQ int8 (per-channel weights, u8 activations, 16 calibration images) with
  every op quantized (what `compress quantize --deploy X.onnx` writes), with only Conv / MatMul / Gemm, with
  only Conv / Gemm, in the QOperator format (QLinearConv / QLinearMatMul), and with uint8 weights (what
  `--deploy` writes on an x86 CPU without VNNI);
- PT2E: x86 Inductor FP32 against all-int8 (torchao's X86InductorQuantizer), both compiled with freezing.

The ONNX Runtime sessions are timed in interleaved rounds (median of 15 rounds of 20 runs each); PT2E's pair is
timed side by side by `quantize.deploy`.

Run: .venv/bin/python bench/int8_width.py [--models efficientformer-l1:64 mobilevit_s:64 levit_128s:224 ...]
     [--no-pt2e] [--batch N]   (a name outside MODELS is a timm name, built at its own widths; :N is the px)
(writes bench/results/int8_width.json)
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from compress.registry import create_model  # noqa: E402
from quantize.ort import export_onnx  # noqa: E402

L1 = {"depths": (3, 2, 6, 4), "embed_dims": (48, 96, 224, 448)}  # EfficientFormer-L1's widths and depths
MODELS = {"efficientformer-digits": ("efficientformer", {}), "efficientformer-l1": ("efficientformer", L1),
          "mobilevit_xxs": ("mobilevit_xxs", {}), "mobilevit_s": ("mobilevit_s", {})}
VARIANTS = {"qdq all ops": (None, "QDQ", "s8"), "qdq conv/matmul/gemm": (["Conv", "MatMul", "Gemm"], "QDQ", "s8"),
            "qdq conv/gemm": (["Conv", "Gemm"], "QDQ", "s8"),
            "qoperator conv/matmul/gemm": (["Conv", "MatMul", "Gemm"], "QOperator", "s8"),
            "qdq all ops, u8 weights": (None, "QDQ", "u8"), "qdq conv/gemm, u8 weights": (["Conv", "Gemm"], "QDQ", "u8")}


def session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def interleaved_ms(sessions: dict, x, rounds: int = 15, runs: int = 20) -> dict[str, float]:
    """Median ms per run of each session, timed in interleaved rounds (each round runs every session in
    turn), so that a slow spell of the machine falls on all of them alike, not on whichever ran then."""
    feed = {"input": x}
    for sess in sessions.values():
        for _ in range(10):
            sess.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, sess in sessions.items():
            t = time.perf_counter()
            for _ in range(runs):
                sess.run(None, feed)
            times[k].append((time.perf_counter() - t) / runs * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def quantize_variant(fp32: str, images: torch.Tensor, out: str, ops, fmt: str, weights: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x.numpy()} for x in images.split(1)])

        def get_next(self):
            return next(self.batches, None)

    pre = out + ".pre.onnx"
    quant_pre_process(fp32, pre)
    kw = {} if ops is None else {"op_types_to_quantize": ops}
    quantize_static(pre, out, Images(), quant_format=getattr(QuantFormat, fmt), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=getattr(QuantType, {"s8": "QInt8", "u8": "QUInt8"}[weights]),
                    **kw)


def measure(name: str, size: int, pt2e: bool, batch: int = 1) -> dict:
    arch, kwargs = MODELS.get(name, (name, {}))  # any other timm name at its own widths
    kwargs = {**kwargs, "img_size": size} if arch == "efficientformer" else kwargs
    model = create_model(arch, num_classes=10, **kwargs).eval()
    images = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
    row = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "size": size, "batch": batch}
    with tempfile.TemporaryDirectory() as d:
        fp32 = f"{d}/fp32.onnx"
        export_onnx(model, images, fp32)
        x = torch.randn(batch, 3, size, size).numpy()
        sessions = {"ort fp32": session(fp32)}
        for label, (ops, fmt, weights) in VARIANTS.items():
            out = f"{d}/{label.replace(' ', '_').replace('/', '-').replace(',', '')}.onnx"
            quantize_variant(fp32, images, out, ops, fmt, weights)
            sessions[f"ort int8, {label}"] = session(out)
        row.update(interleaved_ms(sessions, x))
    if pt2e:
        from quantize.deploy import deploy

        dep = deploy(model, images)
        row["pt2e fp32 (inductor)"], row["pt2e int8"] = dep.fp32_latency_ms, dep.int8_latency_ms
    best_fp32 = min(v for k, v in row.items() if "fp32" in k)
    row["best int8 vs best fp32"] = round(best_fp32 / min(v for k, v in row.items() if "int8" in k and
                                                          isinstance(v, float)), 2)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["efficientformer-digits:64", "efficientformer-l1:64",
                                                    "efficientformer-l1:128", "mobilevit_xxs:64", "mobilevit_s:64"])
    p.add_argument("--no-pt2e", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(2)
    out = ROOT / "bench" / "results" / "int8_width.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for spec in args.models:
        name, _, size = spec.partition(":")
        key = spec if args.batch == 1 else f"{spec} batch {args.batch}"
        results[key] = measure(name, int(size or 64), not args.no_pt2e, args.batch)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(key, json.dumps(results[key]), flush=True)


if __name__ == "__main__":
    main()
