"""OFA alone (no baselines) on the distillation bench's pairs, budgets and seeds: run it from two trees (e.g. the
previous commit in a git worktree, and this one) to compare a change of OFA's branches side by side.

Needs vit-s0.pt and resnet-s0.pt in this checkout's bench/results (bench/train_digits.py).
Run: cd TREE && /path/to/.venv/bin/python /path/to/bench/ofa_reference_ab.py TAG [--results DIR]
(writes DIR/ofa_ab-TAG.json and prints the mean and per-seed top-1 of each pair)
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))  # the tree being measured
from cli import main  # noqa: E402

PAIRS = {"vit -> resnet": ("vit-s0.pt", "resnet", 2), "resnet -> vit": ("resnet-s0.pt", "vit", 8)}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("tag")
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    out = {}
    for label, (teacher, student, epochs) in PAIRS.items():
        tops = []
        for seed in (0, 1, 2):
            js = args.results / f"ofa_ab-{args.tag}-{student}-s{seed}.json"
            if not js.exists():
                if main(["distill", "--teacher", str(args.results / teacher), "--student", student, "--method", "ofa",
                         "--epochs", str(epochs), "--seed", str(seed), "--threads", "2", "--no-baselines",
                         "--out", str(js.with_suffix(".pt")), "--json", str(js)]):
                    raise SystemExit(f"{label} seed {seed} failed")
            tops.append(json.loads(js.read_text())["top1"])
        out[label] = {"mean": round(statistics.mean(tops), 2), "seeds": [round(t, 2) for t in tops]}
        print(args.tag, label, out[label], flush=True)
    (args.results / f"ofa_ab-{args.tag}.json").write_text(json.dumps(out, indent=1))
