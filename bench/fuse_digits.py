"""OT fusion on digits: pairs of independently trained parents, every solver option, mean of seed pairs.

Needs the parents from bench/train_digits.py (seeds 0-5) and, for the heterogeneous row, ViTs of width 48:
    .venv/bin/python bench/train_digits.py --seeds 0 1 2 3 4 5
    for s in 0 1; do compress train --recipe recipes/train-vit.yaml --arch-args embed_dim=48 --seed $s \\
        --out bench/results/vit48-s$s.pt; done
Run: .venv/bin/python bench/fuse_digits.py   (writes bench/results/fuse_digits.json, prints markdown tables)
     .venv/bin/python bench/fuse_digits.py --width [--repair]   (only the --width 0.5 rows: two width-96 ViTs fused into
     width 48, against the anchor narrowed alone and the width-48 ViT from scratch; merged into the JSON)
     .venv/bin/python bench/fuse_digits.py --only residual,attention   (only the rows whose flags mention
     one of the words, merged into the JSON)
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import main  # noqa: E402

R = Path("bench/results")
PAIRS = [(0, 1), (2, 3), (4, 5)]
OPTIONS = {  # every row names its ground cost, so the recipes' defaults do not change the table
    "vit": [("emd", ["--ground", "acts"]), ("hungarian", ["--ground", "acts"]),
            ("sinkhorn", ["--ground", "acts", "--softness", "0.002"]),
            ("sinkhorn", ["--ground", "acts", "--softness", "0.02"]),
            ("emd", ["--ground", "acts", "--tokens", "window"]), ("emd", ["--ground", "wts"]),
            ("emd", ["--ground", "acts", "--residual", "mean"]), ("emd", ["--ground", "acts", "--residual", "weighted"]),
            ("emd", ["--ground", "acts", "--attention", "full"]),
            ("emd", ["--ground", "acts", "--attention", "shared_qk"]),
            ("sinkhorn", ["--ground", "acts", "--softness", "0.02", "--residual", "mean", "--attention", "full"]),
            ("emd", ["--ground", "wts", "--repair"]), ("emd", ["--ground", "acts", "--repair"]),
            ("sinkhorn", ["--ground", "acts", "--softness", "0.02", "--residual", "mean", "--attention", "full",
                          "--repair"]),
            ("emd", ["--ground", "wts", "--no-repair", "--merge", "regmean"]),
            ("emd", ["--ground", "wts", "--repair", "--merge", "regmean"])],
    "resnet": [("emd", ["--ground", "acts"]), ("hungarian", ["--ground", "acts"]),
               ("sinkhorn", ["--ground", "acts", "--softness", "0.002"]), ("emd", ["--ground", "wts"]),
               ("emd", ["--ground", "acts", "--residual", "mean"]), ("emd", ["--ground", "acts", "--residual", "weighted"])],
}
RECIPES = {"vit": "recipes/fuse-vit.yaml", "resnet": "recipes/fuse-cnn.yaml"}


def fuse(models: list[str], recipe: str, solver: str, extra: list[str], tag: str) -> dict:
    js = R / f"fuse-{tag}.json"
    if "acts" in extra and "--tokens" not in extra:  # the rows were recorded with every token (the default then)
        extra = [*extra, "--tokens", "all"]
    if "--merge" not in extra:  # and with the plain average (the only merge until 2026-12-07)
        extra = [*extra, "--merge", "mean"]
    code = main(["fuse", "--recipe", recipe, "--models", *models, "--solver", solver, *extra, "--threads", "2",
                 "--out", str(R / f"fuse-{tag}.pt"), "--json", str(js)])
    if code:
        raise SystemExit(code)
    return json.loads(js.read_text())


def words(flags: list[str]) -> list[str]:
    """A row's label: each flag's value, or the bare flag's name ("--ground wts --repair" -> wts repair)."""
    out, i = [], 0
    while i < len(flags):
        bare = i + 1 == len(flags) or flags[i + 1].startswith("--")
        out.append(flags[i][2:] if bare else flags[i + 1])
        i += 1 if bare else 2
    return out


def mean(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def main_bench(only: str | None = None) -> dict:
    """Every option row (or those whose flags mention `only`), merged into bench/results/fuse_digits.json."""
    out = {}
    for arch, options in OPTIONS.items():
        for solver, extra in options:
            if only and not any(word in " ".join(extra) for word in only.split(",")):
                continue
            label = f"{solver} {' '.join(words(extra))}"
            rows = [fuse([str(R / f"{arch}-s{a}.pt"), str(R / f"{arch}-s{b}.pt")], RECIPES[arch], solver, extra,
                         f"{arch}-{a}{b}-{label.replace(' ', '')}") for a, b in PAIRS]
            for r in rows:
                r["best_parent"] = max(r["parents"])
            out[f"{arch} | {label}"] = {k: mean(rows, k) for k in (
                "best_parent", "ensemble", "vanilla", "ot", "vanilla_finetuned", "ot_finetuned", "partners", "seconds")}
            out[f"{arch} | {label}"]["pairs"] = rows
    if only:
        return merge(out)
    # heterogeneous: a width-96 and a width-48 ViT fused into width 48 (the anchor), vs the narrow alone
    het = fuse([str(R / "vit-s0.pt"), str(R / "vit48-s1.pt")], RECIPES["vit"], "emd", ["--ground", "acts"],
               "vit-het")
    scratch = R / "vit48-scratch84.json"
    if not scratch.exists():  # the narrow model alone, given the epochs that went into the fused one (40+40+4)
        main(["train", "--recipe", "recipes/train-vit.yaml", "--arch-args", "embed_dim=48", "--epochs", "84",
              "--threads", "2", "--out", str(R / "vit48-scratch84.pt"), "--json", str(scratch)])
    het["narrow_from_scratch_84_epochs"] = json.loads(scratch.read_text())["top1"]
    out["vit heterogeneous 96+48 -> 48"] = het
    (R / "fuse_digits.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def merge(rows: dict) -> dict:
    """Write `rows` into bench/results/fuse_digits.json beside the rows already there; returns `rows`."""
    path = R / "fuse_digits.json"
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **rows}, indent=2,
                               default=str))
    return rows


def width_bench(repair: bool = False) -> dict:
    """Two width-96 ViTs fused into half the channels (`--width 0.5`, the shape of the width-48 ViT), against
    the anchor narrowed alone (activation importance, no fusion), both finetuned alike, and the width-48
    ViT from scratch given the epochs that went into the fused model (40 + 40 + 4). With `repair`, the
    fused model is REPAIRed (`--repair`); the narrowed anchor is the same either way."""
    flags = ["--ground", "acts", "--width", "0.5"] + (["--repair"] if repair else [])
    rows = [fuse([str(R / f"vit-s{a}.pt"), str(R / f"vit-s{b}.pt")], RECIPES["vit"], "emd", flags,
                 f"vit-{a}{b}-width0.5" + ("-repair" if repair else "")) for a, b in PAIRS]
    res = {k: mean(rows, k) for k in ("narrowed", "ot", "narrowed_finetuned", "ot_finetuned", "seconds")}
    res["narrow_from_scratch_84_epochs"] = json.loads((R / "vit48-scratch84.json").read_text())["top1"]
    res["pairs"] = rows
    merge({"vit width 0.5 (96+96 -> 48)" + (" repair" if repair else ""): res})
    return res


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    if "--width" in sys.argv:
        w = width_bench(repair="--repair" in sys.argv)
        print(" | ".join(f"{k} {fmt(w[k])}" for k in ("narrowed", "ot", "narrowed_finetuned", "ot_finetuned",
                                                       "narrow_from_scratch_84_epochs")))
        raise SystemExit(0)
    res = main_bench(sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None)
    print("| model | solver | best parent | ensemble | vanilla | OT one-shot | vanilla + FT | OT + FT | partners | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, r in res.items():
        if "|" not in key:
            continue
        arch, label = (k.strip() for k in key.split("|"))
        print(f"| {arch} | {label} | {fmt(r['best_parent'])} | {fmt(r['ensemble'])} | {fmt(r['vanilla'])} | "
              f"{fmt(r['ot'])} | {fmt(r['vanilla_finetuned'])} | {fmt(r['ot_finetuned'])} | {r['partners']:.2f} | "
              f"{r['seconds']:.1f} |")
    h = res.get("vit heterogeneous 96+48 -> 48")
    if h:
        print(f"\nheterogeneous: parents {', '.join(fmt(p) for p in h['parents'])}; OT one-shot {fmt(h['ot'])}; "
              f"OT + FT {fmt(h['ot_finetuned'])}; narrow from scratch, 84 epochs {fmt(h['narrow_from_scratch_84_epochs'])}")
