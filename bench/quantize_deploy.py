"""The real int8 artifacts against FP32 on the same runtime, for two backends side by side (PT2E + x86
Inductor, ONNX Runtime QDQ; `--deploy` auto, batch 1 and 32, 2 threads): latency, file size and test top-1 of
each deployed program, for trained digits models.

Models: a DeiT of ViT-S width (384, depth 4, 6 heads, 7.1 M parameters) trained by
`compress train --arch deit --arch-args embed_dim=384,depth=4,num_heads=6 --data digits --epochs 20 --lr 5e-4
--threads 2` (trained first when missing), the 0.46 M digits ViT and the trained mobilevit of
bench/quantize_digits.py, and `efficientformer-l1-224`: EfficientFormer-L1's widths and depths (11.4 M) at the
224 px users deploy at, trained by `compress train --arch efficientformer --arch-args
img_size=224,depths=3x2x6x4,embed_dims=48x96x224x448 --data digits --epochs 6 --threads 2` (trained first when
missing; its fake-quantized model is calibrated with min-max, the deploy search is the same for every method).
Results: bench/results/quantize_deploy.json.

Run: .venv/bin/python bench/quantize_deploy.py [--models deit384 vit mobilevit efficientformer]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_digits import RESULTS, ROOT, checkpoint  # noqa: E402  (trains vit / mobilevit when missing)

COMPRESS = str(ROOT / ".venv" / "bin" / "compress")
DEIT384 = RESULTS / "q" / "deit384-lr5e-4.pt"
TRAINED = {  # name: (checkpoint, `compress train` arguments, `compress quantize --method`)
    "deit384": (DEIT384, ["--arch", "deit", "--arch-args", "embed_dim=384,depth=4,num_heads=6", "--epochs", "20",
                          "--lr", "5e-4"], "qhyvit"),
    "efficientformer-l1-224": (RESULTS / "q" / "efficientformer-l1-224.pt",
                               ["--arch", "efficientformer", "--arch-args",
                                "img_size=224,depths=3x2x6x4,embed_dims=48x96x224x448", "--epochs", "6"], "minmax"),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="*", default=["deit384", "vit", "mobilevit", "efficientformer"])
    args = p.parse_args()
    out = RESULTS / "quantize_deploy.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.models:
        ckpt, train_args, method = TRAINED.get(name, (None, None, "qhyvit"))
        if ckpt is None:
            ckpt = checkpoint(name)
        elif not ckpt.exists():
            subprocess.run([COMPRESS, "train", *train_args, "--data", "digits", "--threads", "2", "--out", str(ckpt)],
                           check=True, cwd=ROOT)
        js = RESULTS / "q" / f"{name}-deploy.json"
        js.unlink(missing_ok=True)
        subprocess.run([COMPRESS, "quantize", str(ckpt), "--method", method, "--bits", "w8a8", "--threads", "2",
                        "--deploy", str(RESULTS / "q" / f"{name}.int8"), "--json", str(js)], check=True, cwd=ROOT)
        r = json.loads(js.read_text())
        row = {"chosen": r["deploy_backend"], "deployments": r["deployments"]}
        best_fp32 = min(v["fp32_latency_ms"] for v in r["deployments"].values())
        for d in r["deployments"].values():
            d["vs_best_fp32"] = round(best_fp32 / d["int8_latency_ms"], 2)
            d["size_ratio"] = round(d["int8_size_bytes"] / d["fp32_size_bytes"], 3)
        results[name] = row
        out.write_text(json.dumps(results, indent=1))
        print(name, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
