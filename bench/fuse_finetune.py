"""Where the finetuned OT-fused ViT lands, against the same finetune given to a parent.

The acceptance bar of issue 6 asks the fused ViT + 10% of a parent's budget to reach the best parent. This
bench separates the fusion from the finetune: each row is one finetune recipe, applied either to the
OT-fused model (`ot`) or to the pair's first parent (`parent`), mean of the seed pairs (0,1), (2,3), (4,5).

Rows are `kind[:key=value...]`, keys: lr, ep (epochs), bs (batch size), ls (label smoothing), repair (1),
paper (1: Sinkhorn 0.02, per-sublayer mean, full attention, activations), ground (wts | acts), merge
(mean, the default here as when the rows were recorded | regmean),
kd (weight of the KL term towards the parents' output ensemble; T its temperature).

Needs the parents of bench/train_digits.py (vit-s0..s5), or of another width (`--prefix vit48`, trained by
`compress train --recipe recipes/train-vit.yaml --arch-args embed_dim=48 --seed S --out bench/results/vit48-sS.pt`).
Run: .venv/bin/python bench/fuse_finetune.py [--prefix vit] [--pairs 01,23,45] ROW [ROW ...]
     (merges into bench/results/fuse_finetune.json, prints a table)
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compress import load  # noqa: E402
from compress.data import load_data  # noqa: E402
from compress.ensemble import Ensemble, LogEnsemble  # noqa: E402
from compress.losses import distillation_objective  # noqa: E402
from compress.measure import top1  # noqa: E402
from compress.train import TrainConfig, train  # noqa: E402
from fuse import FuseConfig, fuse_models  # noqa: E402

R = Path("bench/results")
# the paper's maps; every token in the statistics, as when docs/BENCHMARKS.md recorded the rows (the paper: a window)
PAPER = dict(ground="acts", solver="sinkhorn", softness=0.02, residual="mean", attention="full", tokens="all")


def parse(row: str) -> tuple[str, dict]:
    kind, *opts = row.split(":")
    if kind not in ("ot", "parent"):
        raise SystemExit(f"row {row!r}: expected ot[:k=v...] or parent[:k=v...]")
    return kind, dict(o.split("=", 1) for o in opts)


def run_row(kind: str, kw: dict, ckpts, models, data, images) -> tuple[float, float, float]:
    """(one-shot top-1, finetuned top-1, finetune seconds) for one row on one pair."""
    if kind == "parent":
        model = copy.deepcopy(models[0])
    else:
        cfg = FuseConfig(**(PAPER if kw.get("paper") == "1" else dict(ground=kw.get("ground", "wts"), solver="emd")),
                         calib=len(images), repair=kw.get("repair") == "1", merge=kw.get("merge", "mean"))
        state, _ = fuse_models(models, images, cfg)
        model = ckpts[0].build()
        model.load_state_dict(state)
    before = top1(model, data.test)
    ls = float(kw.get("ls", 0.1))
    cfg = TrainConfig(epochs=int(kw.get("ep", 4)), lr=float(kw.get("lr", 2e-3)), batch_size=int(kw.get("bs", 64)),
                      label_smoothing=ls, seed=0)
    loss = (distillation_objective(LogEnsemble(models), float(kw["kd"]), float(kw.get("T", 1)), ls)
            if "kd" in kw else None)
    t = time.perf_counter()
    train(model.train(), data.train, cfg, loss_fn=loss, description=f"{kind} {kw}")
    return before, top1(model, data.test), time.perf_counter() - t


def main_bench(prefix: str, pairs: list[tuple[int, int]], rows: list[str]) -> dict:
    torch.set_num_threads(2)
    per_pair = []
    for a, b in pairs:
        ckpts = [load(R / f"{prefix}-s{a}.pt"), load(R / f"{prefix}-s{b}.pt")]
        models = [c.build() for c in ckpts]
        data = load_data("digits", ckpts[0].input)
        images = data.train.tensors[0][:256]
        res = {"pair": [a, b], "parents": [top1(m, data.test) for m in models],
               "ensemble": top1(Ensemble(models), data.test)}
        for row in rows:
            res[row] = run_row(*parse(row), ckpts, models, data, images)
        per_pair.append(res)
        print(json.dumps(res), flush=True)
    mean = statistics.mean
    out = {f"{prefix} | {row}": {"one_shot": mean(p[row][0] for p in per_pair),
                                 "finetuned": mean(p[row][1] for p in per_pair),
                                 "seconds": mean(p[row][2] for p in per_pair),
                                 "best_parent": mean(max(p["parents"]) for p in per_pair),
                                 "ensemble": mean(p["ensemble"] for p in per_pair),
                                 "pairs": [{"pair": p["pair"], "parents": p["parents"], "ensemble": p["ensemble"],
                                            "one_shot": p[row][0], "finetuned": p[row][1]} for p in per_pair]}
           for row in rows}
    path = R / "fuse_finetune.json"
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **out}, indent=2))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--prefix", default="vit")
    ap.add_argument("--pairs", default="01,23,45")
    args = ap.parse_args()
    for row in args.rows:
        parse(row)  # every row is checked before any work
    res = main_bench(args.prefix, [(int(p[0]), int(p[1])) for p in args.pairs.split(",")], args.rows)
    print("| parents | row | best parent | ensemble | one-shot | + finetune |\n|---|---|---|---|---|---|")
    for key, r in res.items():
        prefix, row = (k.strip() for k in key.split("|"))
        print(f"| {prefix} | {row} | {r['best_parent']:.2f} | {r['ensemble']:.2f} | {r['one_shot']:.2f} | "
              f"{r['finetuned']:.2f} |")
