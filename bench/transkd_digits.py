"""TransKD on digit-scenes (segmentation, 11 classes, 64 px): a resnet18 teacher (trained once, 30 epochs)
into an EfficientFormer student (about 14% of its MACs); the student alone vs TransKD on the same
budget, mean of 3 seeds, test mIoU.

Run: .venv/bin/python bench/transkd_digits.py   (writes bench/results/transkd_digits.json, prints a table)
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import main  # noqa: E402

R = Path("bench/results")


def main_bench(seeds: list[int], epochs: int, variant: str, weight: float) -> dict:
    runs = []
    teacher = R / "transkd-teacher.pt"
    for s in seeds:
        tag = f"transkd-{variant}-w{weight:g}-s{s}"
        # the first run ever trains the teacher (30 epochs, beside its output); every later run reuses it
        source = ["--teacher", str(teacher)] if teacher.exists() else \
            ["--teacher", "resnet", "--train-teacher", "--teacher-epochs", "30"]
        if main(["distill", *source, "--student", "efficientformer", "--data", "digit-scenes", "--method", "transkd",
                 "--transkd-variant", variant, "--transkd-weight", str(weight), "--epochs", str(epochs),
                 "--seed", str(s), "--threads", "2", "--out", str(R / f"{tag}.pt"), "--json", str(R / f"{tag}.json")]):
            raise SystemExit(f"{tag} failed")
        if not teacher.exists():
            Path(f"{R / tag}.pt.teacher.pt").rename(teacher)
        runs.append(json.loads((R / f"{tag}.json").read_text()))
    keys = ("teacher_miou", "scratch_miou", "miou", "teacher_macs", "student_macs", "scratch_seconds", "seconds")
    out = {k: round(statistics.mean(r[k] for r in runs), 3) for k in keys}
    out.update(epochs=epochs, variant=variant, weight=weight,
               macs_ratio=round(out["student_macs"] / out["teacher_macs"], 4), runs=runs)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--variant", default="base", choices=["base", "gl", "ea"])
    ap.add_argument("--weight", type=float, default=1.0, help="--transkd-weight (the reference: 1)")
    a = ap.parse_args()
    res = main_bench(a.seeds, a.epochs, a.variant, a.weight)
    (R / f"transkd_digits_{a.variant}_w{a.weight:g}.json").write_text(json.dumps(res, indent=1))
    print("| variant | weight | epochs | teacher mIoU | student alone | TransKD | gain | student / teacher MACs |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {res['variant']} | {res['weight']:g} | {res['epochs']} | {res['teacher_miou']:.2f} | {res['scratch_miou']:.2f} | "
          f"{res['miou']:.2f} | {res['miou'] - res['scratch_miou']:+.2f} | {res['macs_ratio']:.1%} |")
