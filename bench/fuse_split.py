"""Fusion of parents trained on different data (issue 18): does OT fusion + a short finetune on a small shared
set compound what each parent knows, against what a user would do instead?

Per seed set s and architecture (the small ViT, 40 epochs; resnet18, 15 epochs):
- split "5/5": parent A on all of classes 0-4 + 10% of the others, parent B on classes 5-9 + 10% of the others;
- split "quarters": 4 parents on the 4 disjoint random quarters of the training split;
- split "5/5 strict": as 5/5 with 5% of the other classes (about 6 images of each), parents that miss half the classes;
- split "5/5 nearly disjoint": as 5/5 with 2.5% of the other classes (16 images, 1 to 9 of each: the least that
  leaves both halves every class), parents that know almost nothing of the other half;
- split "class quarters": 4 parents on classes 0-2, 3-4, 5-7 and 8-9, each + 10% of the others.
Then `compress fuse --baselines` with the family's default fusion settings (and, where that default merges by
RegMean, the same fusion with the plain average beside it) and a finetune on a shared 10% of
the training split (`--subset fraction=0.1`, 129 images, which is at most 10% of the parents' union): each
parent + the same finetune, each parent with its classifier re-fit on the shared set (a linear probe), the
vanilla average + the finetune, the parents' output ensemble (N x the cost), and the ensemble distilled into a
fresh model with the same budget. Test top-1 on the full test split.
With `--start mim` the ViT parents are not trained from their own random inits but finetuned from one shared
start, an MAE pretrained on the unlabelled training split (a real user's parents often share public weights).

Run: .venv/bin/python bench/fuse_split.py [--seeds 0 1 2] [--archs vit resnet] [--splits 5/5 quarters]
     [--start scratch|mim]
     (writes bench/results/fuse_split.json and prints the markdown tables)
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import main  # noqa: E402
from compress.checkpoint import load  # noqa: E402
from compress.data import as_data  # noqa: E402
from compress.measure import top1  # noqa: E402
from compress.probe import refit_classifier  # noqa: E402

R = Path("bench/results/split")
TRAIN = {"vit": ["--recipe", "recipes/train-vit.yaml"], "resnet": ["--recipe", "recipes/train-resnet.yaml"]}
SPLITS = {"5/5": ["classes=0-4,others=0.1", "classes=5-9,others=0.1"],
          "quarters": [f"shard={i}/4" for i in range(1, 5)],
          # each parent sees about 6 images of each class it does not own (32 in all): in practice it misses half
          # the classes
          "5/5 strict": ["classes=0-4,others=0.05", "classes=5-9,others=0.05"],
          # 2.5% of the others: 16 images, 1 of some classes (with 2% some class of 0-4 has none, which is refused)
          "5/5 nearly disjoint": ["classes=0-4,others=0.025", "classes=5-9,others=0.025"],
          # 4 sites with their own class mix: each parent owns 2-3 classes and sees 10% of the others
          "class quarters": [f"classes={c},others=0.1" for c in ("0-2", "3-4", "5-7", "8-9")]}


def slug(split: str) -> str:
    return split.replace("/", "").replace(" ", "-")


def run(argv: list[str]) -> None:
    if main([*argv, "--threads", "2"]):
        raise SystemExit(f"failed: {' '.join(argv)}")


def start(arch: str, s: int) -> Path:
    """The parents' shared start for `--start mim`: an MAE of the same shape pretrained on the whole training
    split without its labels (what public self-supervised weights are to a real user), one per seed set."""
    path = R / f"{arch}-mim-s{s}.pt"
    if not path.exists():
        run(["train", "--arch", arch, "--objective", "mim", "--epochs", "30", "--data", "digits", "--seed", str(s),
             "--out", str(path)])
    return path


def parents(arch: str, split: str, s: int, from_mim: bool = False) -> list[str]:
    paths = []
    for i, subset in enumerate(SPLITS[split]):
        tag = f"{arch}-{slug(split)}-s{s}{'-mim' if from_mim else ''}-p{i}"
        path = R / f"{tag}.pt"
        if not path.exists():  # shards are drawn with the seed set's seed; parents get their own seeds
            shard_seed = f",seed={s}" if subset.startswith("shard") else ""
            init = ["--init", str(start(arch, s))] if from_mim else []
            run(["train", *TRAIN[arch], *init, "--subset", subset + shard_seed, "--seed", str(10 * s + i),
                 "--out", str(path)])
        paths.append(str(path))
    return paths


def fuse(arch: str, split: str, s: int, epochs: int, lr: float, shared: float = 0.1, from_mim: bool = False) -> dict:
    tag = (f"{arch}-{slug(split)}-s{s}{'-mim' if from_mim else ''}-fused-e{epochs}"
           + ("" if shared == 0.1 else f"-shared{shared:g}"))

    def fused(name: str, *flags: str) -> dict:  # one `compress fuse` on the parents, cached by its JSON
        js = R / f"{name}.json"
        if not js.exists():
            run(["fuse", "--models", *parents(arch, split, s, from_mim), "--subset", f"fraction={shared:g},seed={s}",
                 "--finetune-epochs", str(epochs), "--finetune-batch-size", "16", "--finetune-lr", str(lr),
                 *flags, "--out", str(R / f"{name}.pt"), "--json", str(js)])
        return json.loads(js.read_text())

    r = fused(tag, "--baselines")
    if r["auto"].startswith("attention"):  # the default's other merge, side by side (no baselines: they are shared)
        other = "mean" if r["merge"] == "regmean" else "regmean"
        m = fused(f"{tag}-{other}", "--merge", other)
        r[f"ot_{other}"], r[f"ot_{other}_ft"] = m["ot"], m["ot_finetuned"]
    # fusions cached before the pipeline measured the re-fit get it from the same checkpoints
    refit = r.get("parents_refit") or [refit_top1(p, shared, s) for p in parents(arch, split, s, from_mim)]
    rows = {row["name"]: row for row in r["rows"]}
    lat = {k: v["latency_ms"] for k, v in rows.items()}
    return {"parents": r["parents"], "best_parent": max(r["parents"]),
            "best_parent_ft": max(r["parents_finetuned"]), "best_parent_refit": max(refit), "vanilla": r["vanilla"],
            "vanilla_ft": r["vanilla_finetuned"], "ensemble": r["ensemble"],
            "ensemble_distilled": r["ensemble_distilled"], "ot": r["ot"], "ot_ft": r["ot_finetuned"],
            "merge": r.get("merge", "mean"), **{k: r.get(k) for k in OTHER},
            "ensemble_latency_ratio": lat["output ensemble"] / lat[f"OT + {epochs} ep"],
            "groups": {name: {model: round(statistics.mean(acc[c] for c in cs), 2)
                              for model, acc in r["per_class"].items()}
                       for name, cs in r.get("class_groups", {}).items()}, "auto": r["auto"],
            "finetune_images": r["finetune_images"], "per_class": r["per_class"]}


def refit_top1(path: str, shared: float, s: int) -> float:
    """A parent with its classifier re-fit on the shared set (`compress.probe`), as `compress fuse --baselines`
    measures it since 2026-12-07: for fusions run before, from the same checkpoint and shared set."""
    ckpt = load(path)
    d = as_data("digits", ckpt.input, subset=f"fraction={shared:g},seed={s}")
    return top1(refit_classifier(ckpt.build(), d.train), d.test)


OTHER = ["ot_mean", "ot_mean_ft", "ot_regmean", "ot_regmean_ft"]  # the other merge's one-shot / finetuned
KEYS = ["best_parent", "best_parent_ft", "best_parent_refit", "vanilla", "vanilla_ft", "ensemble",
        "ensemble_distilled", "ot", "ot_ft", "ensemble_latency_ratio"]


def main_bench(seeds, archs, splits, epochs, lr, shared=0.1, from_mim=False) -> dict:
    R.mkdir(parents=True, exist_ok=True)
    out = {}
    for arch in archs:
        for split in splits:
            runs = [fuse(arch, split, s, epochs[arch], lr, shared, from_mim) for s in seeds]
            # the table's finetune: 10 epochs; another length gets its own key, on any shared set
            budget = f", {epochs[arch]} finetune epochs" if epochs[arch] != 10 else ""
            origin = ", from a shared MAE" if from_mim else ""
            out[f"{arch} {split}{origin}" + ("" if shared == 0.1 else f", shared {shared:g}") + budget] = {
                **{k: round(statistics.mean(r[k] for r in runs), 2) for k in KEYS},
                **{k: round(statistics.mean(r[k] for r in runs), 2) for k in OTHER if runs[0][k] is not None},
                "runs": runs, "seeds": seeds, "finetune_epochs": epochs[arch]}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--archs", nargs="+", default=["vit", "resnet"])
    ap.add_argument("--splits", nargs="+", default=["5/5", "quarters"], choices=list(SPLITS))
    ap.add_argument("--vit-epochs", type=int, default=10, help="finetune epochs on the shared set (batch 16)")
    ap.add_argument("--resnet-epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--shared", type=float, default=0.1,
                    help="the shared finetune set: this fraction of each class of the training split")
    ap.add_argument("--start", choices=["scratch", "mim"], default="scratch",
                    help="the parents' start: each its own random init, or one shared MAE pretrained on the "
                         "unlabelled training split (ViT only)")
    a = ap.parse_args()
    if a.start == "mim" and a.archs != ["vit"]:
        ap.error("--start mim pretrains an MAE, which needs a ViT: use --archs vit")
    res = main_bench(a.seeds, a.archs, a.splits, {"vit": a.vit_epochs, "resnet": a.resnet_epochs}, a.lr, a.shared,
                     a.start == "mim")
    path = Path("bench/results/fuse_split.json")
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **res}, indent=1))
    print("| model, split | best parent | best parent + FT | best parent, classifier re-fit | vanilla | vanilla + FT | "
          "ensemble (N x cost) | ensemble distilled | OT one-shot | **OT + FT** | ensemble / fused latency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | " + " | ".join(f"{v[c]:.2f}" for c in KEYS[:-2]) + f" | **{v['ot_ft']:.2f}** | "
              f"{v['ensemble_latency_ratio']:.2f}x |")
    for k, v in res.items():
        for other, what in (("mean", "the plain average"), ("regmean", "RegMean")):
            if f"ot_{other}" in v:
                print(f"{k}: the same fusion with {what} (--merge {other}): one-shot {v[f'ot_{other}']:.2f}, "
                      f"+ FT {v[f'ot_{other}_ft']:.2f}")
