"""Training target: a small ViT and a small CNN each reach >= 95% top-1 on digits in <= 3 minutes (2 cores).

Run: .venv/bin/python bench/train_digits.py [--seeds 0 1] [--threads 2]
Writes bench/results/train_digits.json and prints a markdown table for docs/BENCHMARKS.md.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import main  # noqa: E402

RECIPES = {"vit": "recipes/train-vit.yaml", "resnet": "recipes/train-resnet.yaml"}


def run(seeds: list[int], threads: int) -> list[dict]:
    out = Path("bench/results")
    rows = []
    for arch, recipe in RECIPES.items():
        for seed in seeds:
            ckpt, js = out / f"{arch}-s{seed}.pt", out / f"{arch}-s{seed}.json"
            code = main(["train", "--recipe", recipe, "--seed", str(seed), "--threads", str(threads),
                         "--out", str(ckpt), "--json", str(js)])
            if code:
                raise SystemExit(code)
            r = json.loads(js.read_text())
            rows.append({"arch": arch, "seed": seed, "top1": r["top1"], "seconds": r["train_seconds"],
                         "params": r["params"], "meets_target": r["top1"] >= 95 and r["train_seconds"] <= 180})
    path = out / "train_digits.json"  # merged with earlier runs, keyed by (arch, seed)
    old = [r for r in (json.loads(path.read_text()) if path.exists() else [])
           if (r["arch"], r["seed"]) not in {(n["arch"], n["seed"]) for n in rows}]
    path.write_text(json.dumps(old + rows, indent=2))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rows = run(a.seeds, a.threads)
    print("| model | seed | params | test top-1 | train seconds | target met |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['seed']} | {r['params']:,} | {r['top1']:.2f}% | {r['seconds']:.1f} | "
              f"{'yes' if r['meets_target'] else 'NO'} |")
