"""Pruning on digits, mean of 3 seeds: width to half the MACs with recovery, training-free depth, low rank,
and the accuracy-vs-ratio sweeps.

Needs vit-s{0,1,2} and resnet-s{0,1,2} from bench/train_digits.py; trains the depth-8 ViTs it lacks
(recipes/train-vit.yaml with depth=8, about 3 minutes each).
Run: .venv/bin/python bench/prune_digits.py   (writes bench/results/prune_digits.json, prints markdown tables)
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import main  # noqa: E402

R = Path("bench/results")


def run(args: list[str], tag: str) -> dict:
    js = R / f"prune-{tag}.json"
    code = main(["prune", *args, "--threads", "2", "--json", str(js)])
    if code:
        raise SystemExit(code)
    return json.loads(js.read_text())


def checkpoint(name: str, seed: int) -> str:
    path = R / f"{name}-s{seed}.pt"
    if not path.exists():
        extra = ["--arch-args", "depth=8"] if name == "vit8" else []
        recipe = "recipes/train-vit.yaml" if name.startswith("vit") else "recipes/train-resnet.yaml"
        if main(["train", "--recipe", recipe, *extra, "--seed", str(seed), "--threads", "2", "--out", str(path)]):
            raise SystemExit(f"training {path} failed")
    return str(path)


def mean(rows, key):
    return round(statistics.mean(r[key] for r in rows), 3)


def summary(rows: list[dict]) -> dict:
    out = {k: mean(rows, k) for k in ("ratio", "top1_before", "top1_pruned", "top1_after", "params_before",
                                      "params_after", "macs_before", "macs_after")}
    out["macs_removed"] = round(1 - out["macs_after"] / out["macs_before"], 3)
    out["speedup_b1"] = round(statistics.mean(r["latency_before_ms"] / r["latency_after_ms"] for r in rows), 3)
    out["speedup_b32"] = round(statistics.mean(
        r["latency_before_ms_batch32"] / r["latency_after_ms_batch32"] for r in rows), 3)
    out["runs"] = rows
    return out


def main_bench(seeds: list[int]) -> dict:
    out = {}
    for arch, recipe in (("vit", "recipes/prune-vit.yaml"), ("resnet", "recipes/prune-cnn.yaml")):
        out[f"width | {arch} | 50% MACs + recovery"] = summary([run(
            [checkpoint(arch, s), "--recipe", recipe, "--seed", str(s), "--out", str(R / f"prune-{arch}-w-s{s}.pt")],
            f"{arch}-w-s{s}") for s in seeds])
    out["depth | vit | 50% of blocks by loss + recovery"] = summary([run(
        [checkpoint("vit", s), "--recipe", "recipes/prune-vit.yaml", "--method", "depth", "--score", "loss",
         "--ratio", "0.5", "--target-macs", "0", "--seed", str(s), "--out", str(R / f"prune-vit-d50-s{s}.pt")],
        f"vit-d50-s{s}") for s in seeds])
    depth = [("vit", "block", "cos"), ("vit", "block", "loss"), ("vit8", "block", "cos"), ("vit8", "block", "loss"),
             ("vit", "mlp", "cos"), ("resnet", "block", "cos"), ("resnet", "block", "loss")]
    for arch, unit, score in depth:
        out[f"depth | {arch} | 25% of {unit}s by {score}"] = summary([run(
            [checkpoint(arch, s), "--method", "depth", "--unit", unit, "--score", score, "--ratio", "0.25",
             "--out", str(R / f"prune-{arch}-d{unit}{score}-s{s}.pt")], f"{arch}-d{unit}{score}-s{s}") for s in seeds])
    for whiten in ([], ["--whiten"]):
        out[f"lowrank | vit | 50% of linear params{' whitened' if whiten else ''}"] = summary([run(
            [checkpoint("vit", s), "--method", "lowrank", "--ratio", "0.5", *whiten,
             "--out", str(R / f"prune-vit-lr{len(whiten)}-s{s}.pt")], f"vit-lr{len(whiten)}-s{s}") for s in seeds])
    for arch in ("vit", "resnet"):
        for criterion in ("activation", "magnitude", "taylor", "hessian"):
            out[f"sweep | {arch} | width {criterion}"] = run(
                [checkpoint(arch, seeds[0]), "--importance", criterion, "--sweep",
                 "--plot", str(R / f"prune-sweep-{arch}-{criterion}.png")], f"sweep-{arch}-{criterion}")["sweep"]
    for score in ("cos", "loss"):
        out[f"sweep | vit8 | depth {score}"] = run([checkpoint("vit8", seeds[0]), "--method", "depth", "--score", score,
                                                    "--sweep", "0", "0.125", "0.25", "0.375", "0.5"],
                                                   f"sweep-vit8-depth-{score}")["sweep"]
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    res = main_bench(ap.parse_args().seeds)
    (R / "prune_digits.json").write_text(json.dumps(res, indent=1))
    print("| case | ratio | MACs removed | top1 before | top1 pruned | top1 after | speed-up b1 | speed-up b32 |")
    print("|---|---|---|---|---|---|---|---|")
    for k, v in res.items():
        if not k.startswith("sweep"):
            print(f"| {k} | {v['ratio']} | {v['macs_removed']:.1%} | {v['top1_before']:.2f} | {v['top1_pruned']:.2f} "
                  f"| {v['top1_after']:.2f} | {v['speedup_b1']:.2f}x | {v['speedup_b32']:.2f}x |")
    for k, rows in res.items():
        if k.startswith("sweep"):
            print(f"\n{k}: " + ", ".join(f"{r['ratio']}: {r['top1']:.1f}% ({r['macs'] / rows[0]['macs']:.0%} MACs, "
                                          f"{r['speedup_b1']:.2f}x)" for r in rows))
