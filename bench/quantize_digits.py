"""Every PTQ method x bit width x model, on models trained on digits (simulated top-1 on the test split,
and the SQNR of the test logits against FP32, which separates methods where 397 test images cannot;
32 calibration images from the training split, 2 threads).

Models: the checkpoints `compress train --arch A --data digits --epochs 30 --threads 1 --out
bench/results/q/A.pt` for mobilevit, mobilevitv2, efficientformer, efficientformerv2, swin and deit, plus the
ViT of `bench/train_digits.py` (bench/results/vit-s0.pt); missing ones are trained first.
Results are appended to bench/results/quantize_digits.json as they come (a rerun skips what is there).

Run: .venv/bin/python bench/quantize_digits.py [--bits w8a8 w6a6 w4a8 w4a4] [--models ...] [--methods ...]
     [--recon-iters N --out OTHER.json]   (Q-HyViT's bridge reconstruction, side by side in another file)
     [--stride S --out OTHER.json]        (the range grid searched coarse to fine, or whole with --stride 1)
"""

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from compress import load  # noqa: E402
from compress.data import load_data  # noqa: E402
from compress.measure import top1  # noqa: E402
from quantize import QuantConfig, calibrate  # noqa: E402
from quantize.calibrate import sqnr  # noqa: E402
from quantize.config import SearchConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODELS = ["vit", "deit", "swin", "mobilevit", "mobilevitv2", "efficientformer", "efficientformerv2"]
METHODS = ["minmax", "percentile", "ptq4vit", "repq", "qhyvit"]
BITS = ["w8a8", "w6a6", "w4a8", "w4a4"]


def checkpoint(arch: str) -> Path:
    path = RESULTS / "vit-s0.pt" if arch == "vit" else RESULTS / "q" / f"{arch}.pt"
    if not path.exists():
        subprocess.run([str(ROOT / ".venv" / "bin" / "compress"), "train", "--arch", arch, "--data", "digits",
                        "--epochs", "40" if arch == "vit" else "30", "--out", str(path)], check=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", nargs="*", default=BITS)
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--out", default=str(RESULTS / "quantize_digits.json"))
    p.add_argument("--recon-iters", type=int, default=QuantConfig().recon_iters,
                   help="qhyvit: learned-rounding steps per bridge block (0: none, as the Q-HyViT code)")
    p.add_argument("--stride", type=int, default=SearchConfig().stride,
                   help="ptq4vit / qhyvit: score every S-th grid point, then the points around the best (1: all)")
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {(r["model"], r["method"], r["bits"]) for r in rows}
    for bits in args.bits:
        for arch in args.models:
            ckpt = load(checkpoint(arch))
            data = load_data("digits", ckpt.input)
            images = torch.stack([data.train[i][0] for i in range(32)])
            original = ckpt.build().eval()
            fp32 = top1(original, data.test)
            with torch.no_grad():
                reference = original(data.test.tensors[0])
            for method in args.methods:
                if (arch, method, bits) in done:
                    continue
                torch.manual_seed(0)
                model = copy.deepcopy(original)
                qm, info = calibrate(model, images, QuantConfig(method=method, bits=bits, recon_iters=args.recon_iters,
                                                              search_stride=args.stride))
                with torch.no_grad():
                    logits = qm(data.test.tensors[0])
                row = {"model": arch, "method": method, "bits": bits, "fp32_top1": fp32, "top1": top1(qm, data.test),
                       "sqnr_db": round(sqnr(reference, logits), 2),
                       "calib_seconds": round(info["calib_seconds"], 2), "bridges": info["bridges"],
                       "reconstruction": info["reconstruction"], "stride": args.stride}
                rows.append(row)
                out.write_text(json.dumps(rows, indent=1))
                print(json.dumps({k: row[k] for k in ("model", "method", "bits", "fp32_top1", "top1", "sqnr_db",
                                                      "calib_seconds")}), flush=True)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """One table: a row per model x bits, a column per method: simulated top-1 / logit SQNR in dB."""
    lines = ["| model | bits | FP32 | " + " | ".join(METHODS) + " |", "|" + "---|" * (3 + len(METHODS))]
    keys = sorted({(r["model"], r["bits"]) for r in rows}, key=lambda k: (MODELS.index(k[0]), BITS.index(k[1])))
    for model, bits in keys:
        got = {r["method"]: r for r in rows if r["model"] == model and r["bits"] == bits}
        fp = next(iter(got.values()))["fp32_top1"]
        cells = [f"{got[m]['top1']:.2f} / {got[m]['sqnr_db']:.1f}" if m in got else "-" for m in METHODS]
        lines.append(f"| {model} | {bits} | {fp:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
