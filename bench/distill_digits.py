"""Distillation on digits, mean of 3 seeds, the same budget for every row: a transformer teacher into a
CNN student and a CNN teacher into a transformer student; rows: teacher, student from scratch, KD, OFA.

Needs vit-s0 and resnet-s0 from bench/train_digits.py (the teachers).
Run: .venv/bin/python bench/distill_digits.py   (writes bench/results/distill_digits.json, prints a table)
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import main  # noqa: E402

R = Path("bench/results")
PAIRS = {  # (teacher checkpoint, student alias, epochs): budgets short enough that the student has headroom
    "vit -> resnet": ("vit-s0.pt", "resnet", 2),
    "resnet -> vit": ("resnet-s0.pt", "vit", 8),
}


def main_bench(seeds: list[int], pairs: list[str]) -> dict:
    out = {}
    for label in pairs:
        teacher, student, epochs = PAIRS[label]
        runs = []
        for s in seeds:
            tag = f"distill-{student}-from-{teacher.split('-')[0]}-s{s}"
            js = R / f"{tag}.json"
            if main(["distill", "--teacher", str(R / teacher), "--student", student, "--method", "ofa", "--epochs",
                     str(epochs), "--seed", str(s), "--threads", "2", "--out", str(R / f"{tag}.pt"),
                     "--json", str(js)]):
                raise SystemExit(f"{tag} failed")
            runs.append(json.loads(js.read_text()))
        keys = ("teacher_top1", "scratch_top1", "kd_top1", "top1", "scratch_seconds", "kd_seconds", "train_seconds")
        out[label] = {k: round(statistics.mean(r[k] for r in runs), 3) for k in keys}
        out[label]["epochs"] = epochs
        out[label]["runs"] = runs
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    args = ap.parse_args()
    path = R / "distill_digits.json"  # rows of pairs not rerun are kept
    res = {**(json.loads(path.read_text()) if path.exists() else {}), **main_bench(args.seeds, args.pairs)}
    path.write_text(json.dumps(res, indent=1))
    print("| pair | epochs | teacher | scratch | KD | OFA | OFA - KD | KD - scratch | s scratch / KD / OFA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v['epochs']} | {v['teacher_top1']:.2f} | {v['scratch_top1']:.2f} | {v['kd_top1']:.2f} | "
              f"{v['top1']:.2f} | {v['top1'] - v['kd_top1']:+.2f} | {v['kd_top1'] - v['scratch_top1']:+.2f} | "
              f"{v['scratch_seconds']:.0f} / {v['kd_seconds']:.0f} / {v.get('train_seconds', v.get('seconds', 0)):.0f} |")
