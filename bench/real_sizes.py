"""The pipelines at the sizes users compress (issue 19): time and peak memory on 2 cores, random weights at
224 px (cost does not depend on training). Each task runs in its own process, so its peak RSS is its own.

- fuse-acts: two ViT-B/16 fused on activation correlations, 256 calibration images (target < 3 min, < 6 GiB);
- fuse-acts-all: the same with every token in the statistics (`--tokens all`; the default until 2026-12-07);
- fuse-acts-bf16: fuse-acts with `--stats-precision bf16` (cross products from bfloat16 operands);
- fuse-auto: the same with the family default (weight matching, RegMean on 32 images, REPAIR);
- fuse-auto-mean: the family default before RegMean (weight matching + REPAIR; the default until 2026-12-07);
- qhyvit: Q-HyViT W8A8 calibration of DeiT-S, 32 calibration images (target < 5 min);
- qhyvit-float: the same with the search's integer products off (every linear candidate scored in float32,
  as before `quantize/intgemm.py`);
- prune: ViT-B/16 width-pruned to half its MACs (magnitude importance), latency before / after side by side.

Run: .venv/bin/python bench/real_sizes.py [--tasks fuse-acts fuse-acts-all fuse-acts-bf16 fuse-auto fuse-auto-mean qhyvit qhyvit-float prune]
     (writes bench/results/real_sizes.json)
"""

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = ("fuse-acts", "fuse-acts-all", "fuse-acts-bf16", "fuse-auto", "fuse-auto-mean", "qhyvit", "qhyvit-float",
         "prune")


def peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)


def run(task: str) -> dict:
    from compress import create_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if task.startswith("fuse"):
        from fuse import FuseConfig, fuse_models

        models = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            models.append(create_model("vit_base_patch16_224", num_classes=10).eval())
        images = torch.randn(256, 3, 224, 224)
        cfg = {"fuse-acts": FuseConfig(ground="acts", repair=False, merge="mean"),
               "fuse-acts-all": FuseConfig(ground="acts", repair=False, tokens="all", merge="mean"),
               "fuse-acts-bf16": FuseConfig(ground="acts", repair=False, stats_precision="bf16", merge="mean"),
               "fuse-auto-mean": FuseConfig(merge="mean")}.get(task, FuseConfig())
        t = time.perf_counter()
        _, report = fuse_models(models, images, cfg)
        return {"seconds": round(time.perf_counter() - t, 1), "peak_gib": peak_gib(),
                "stages": {k: round(getattr(report, f"seconds_{k}"), 1) for k in
                           ("trace", "stats", "solve", "apply", "regmean", "repair")}, "repaired_layers": report.repaired}
    if task.startswith("qhyvit"):
        from quantize import QuantConfig, calibrate, intgemm

        if task == "qhyvit-float":
            intgemm.available = lambda: False

        model = create_model("deit_small_patch16_224", num_classes=10).eval()
        images = torch.randn(32, 3, 224, 224)
        t = time.perf_counter()
        _, info = calibrate(model, images, QuantConfig(method="qhyvit", bits="w8a8"))
        return {"seconds": round(time.perf_counter() - t, 1), "peak_gib": peak_gib(), "sites": len(info["sites"]),
                "bridges": info["bridges"], "integer_products": intgemm.available()}
    from compress.measure import compare_latency, macs, param_count
    from prune import PruneConfig, prune, ratio_for_macs

    model = create_model("vit_base_patch16_224", num_classes=10).eval()
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 10, (8,))
    cfg = PruneConfig("width", importance="magnitude")
    t = time.perf_counter()
    ratio = ratio_for_macs(model, x, y, cfg, 0.5, 224, steps=8)
    pruned = prune(copy.deepcopy(model), x, y, PruneConfig("width", ratio, importance="magnitude")).model.eval()
    seconds = time.perf_counter() - t
    b1 = compare_latency([model, pruned], 224, 1, rounds=3, runs=5)
    b32 = compare_latency([model, pruned], 224, 32, rounds=2, runs=2)
    return {"seconds": round(seconds, 1), "peak_gib": peak_gib(), "ratio": ratio,
            "params": [param_count(model), param_count(pruned)], "macs": [macs(model, 224), macs(pruned, 224)],
            "latency_b1_ms": [round(v, 1) for v in b1], "latency_b32_ms": [round(v, 1) for v in b32],
            "speedup_b1": round(b1[0] / b1[1], 2), "speedup_b32": round(b32[0] / b32[1], 2)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--one", choices=TASKS, help=argparse.SUPPRESS)  # a task in this process
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run(a.one)))
        sys.exit(0)
    path = Path("bench/results/real_sizes.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    for task in a.tasks:
        out = subprocess.run([sys.executable, __file__, "--one", task], capture_output=True, text=True, check=True)
        results[task] = json.loads(out.stdout.strip().splitlines()[-1])
        print(task, json.dumps(results[task]), flush=True)
        path.write_text(json.dumps(results, indent=1))
