"""TransKD on digit-scenes (segmentation, 11 classes, 64 px): a trained teacher (once, 30 epochs) into an
EfficientFormer student; the student alone vs TransKD on the same budget, mean of 3 seeds, test mIoU.

The default teacher is the student's own family at EfficientFormer-L3 shape, as the paper pairs MiT-B2 with
MiT-B0 (equal stage grids, only the widths differ); `--teacher resnet` keeps the resnet18 teacher of the
first measurements.

Run: .venv/bin/python bench/transkd_digits.py   (writes bench/results/transkd_digits_*.json, prints a table)
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import main  # noqa: E402

R = Path("bench/results")
TEACHERS = {  # name -> (file, compress train arguments)
    "efficientformer-l3": ("transkd-teacher-ef-l3.pt",
                           ["--arch", "efficientformer", "--arch-args", "depths=4x4x12x6,embed_dims=64x128x320x512"]),
    "resnet": ("transkd-teacher.pt", ["--arch", "resnet"]),
}


def teacher_checkpoint(name: str) -> Path:
    """The teacher, trained on the first run (30 epochs) and reused after."""
    file, arch = TEACHERS[name]
    path = R / file
    if not path.exists() and main(["train", *arch, "--data", "digit-scenes", "--epochs", "30", "--threads", "2",
                                   "--out", str(path)]):
        raise SystemExit(f"training the {name} teacher failed")
    return path


def main_bench(seeds: list[int], epochs: int, variant: str, weight: float, teacher: str) -> dict:
    runs = []
    path = teacher_checkpoint(teacher)
    for s in seeds:
        tag = f"transkd-{teacher}-{variant}-w{weight:g}-e{epochs}-s{s}"
        if main(["distill", "--teacher", str(path), "--student", "efficientformer", "--data", "digit-scenes",
                 "--method", "transkd", "--transkd-variant", variant, "--transkd-weight", str(weight),
                 "--epochs", str(epochs), "--seed", str(s), "--threads", "2", "--out", str(R / f"{tag}.pt"),
                 "--json", str(R / f"{tag}.json")]):
            raise SystemExit(f"{tag} failed")
        runs.append(json.loads((R / f"{tag}.json").read_text()))
    keys = ("teacher_miou", "scratch_miou", "miou", "teacher_macs", "student_macs", "scratch_seconds", "train_seconds")
    out = {k: round(statistics.mean(r[k] for r in runs), 3) for k in keys}
    out.update(teacher=teacher, epochs=epochs, variant=variant, weight=weight,
               macs_ratio=round(out["student_macs"] / out["teacher_macs"], 4), runs=runs)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--variant", default="base", choices=["base", "gl", "ea"])
    ap.add_argument("--weight", type=float, default=1.0, help="--transkd-weight (the reference: 1)")
    ap.add_argument("--teacher", default="efficientformer-l3", choices=sorted(TEACHERS))
    a = ap.parse_args()
    res = main_bench(a.seeds, a.epochs, a.variant, a.weight, a.teacher)
    (R / f"transkd_digits_{a.teacher}_{a.variant}_w{a.weight:g}_e{a.epochs}.json").write_text(json.dumps(res, indent=1))
    print("| teacher | variant | weight | epochs | teacher mIoU | student alone | TransKD | gain | student / teacher MACs |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {res['teacher']} | {res['variant']} | {res['weight']:g} | {res['epochs']} | {res['teacher_miou']:.2f} | "
          f"{res['scratch_miou']:.2f} | {res['miou']:.2f} | {res['miou'] - res['scratch_miou']:+.2f} | "
          f"{res['macs_ratio']:.1%} |")
