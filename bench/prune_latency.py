"""Latency of width pruning to half the MACs on full-size models (random weights: latency does not depend
on the values), batch 1 and 32, 2 threads, original and pruned measured in interleaved rounds.

The digits models are so small that batch-1 latency is mostly per-op overhead; this shows how the same
cut behaves on DeiT-S and ResNet-50 at 224 px.
Run: .venv/bin/python bench/prune_latency.py   (writes bench/results/prune_latency.json)
"""

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compress import create_model  # noqa: E402
from compress.measure import compare_latency, macs, param_count  # noqa: E402
from prune import PruneConfig, prune, ratio_for_macs  # noqa: E402

MODELS = {"deit_small_patch16_224": 224, "resnet50": 224}


def main() -> dict:
    torch.set_num_threads(2)
    out = {}
    for name, size in MODELS.items():
        torch.manual_seed(0)
        model = create_model(name, num_classes=10).eval()
        x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
        cfg = PruneConfig("width", importance="magnitude")
        ratio = ratio_for_macs(model, x, y, cfg, 0.5, size, steps=8)
        pruned = prune(copy.deepcopy(model), x, y, PruneConfig("width", ratio, importance="magnitude")).model.eval()
        b1 = compare_latency([model, pruned], size, 1, rounds=3, runs=10)
        b32 = compare_latency([model, pruned], size, 32, rounds=2, runs=2)
        out[name] = {"ratio": ratio, "params": [param_count(model), param_count(pruned)],
                     "macs": [macs(model, size), macs(pruned, size)], "latency_b1_ms": b1, "latency_b32_ms": b32,
                     "speedup_b1": b1[0] / b1[1], "speedup_b32": b32[0] / b32[1]}
        print(name, json.dumps(out[name]))
    return out


if __name__ == "__main__":
    res = main()
    Path("bench/results/prune_latency.json").write_text(json.dumps(res, indent=1))
