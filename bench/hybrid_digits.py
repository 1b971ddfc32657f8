"""Hybrid Distill and CNN-ViT collaborative learning on the embedded data, mean of 3 seeds, the same budget
for every row of a table.

hybrid (digits): a supervised ViT teacher (bench/results/vit-s0.pt from bench/train_digits.py) and an MAE
teacher of the same shape (trained here once: compress train --objective mim) into a ViT student of the same
shape. Rows: alone, KD, features only (fd), hybrid without masking, hybrid with progressive masking; the
mean attention distance per head at the relation layers; the masking's training-time and FLOPs saving.

collab (digits and digit-scenes): a slim ResNet-18 (0.7 M) and the small ViT trained together from
scratch. Rows: each alone, plain mutual learning (dml), collab; the share of regions / positions
transferred in each direction; the two alone models' output ensemble and the share of labelled test positions
each alone gets right where the other is wrong (what the peer could teach at all).

Run: .venv/bin/python bench/hybrid_digits.py [--only hybrid|hybrid-layer|collab] [--collab-data digits digit-scenes]
     [--scenes-peer vit|swin|pvt] [--pixel-temperature TAU] [--resnet-channels 8x16x32x64] [--seeds ...] [--cached]
     [--start digits|scenes-mae]
     (writes bench/results/hybrid_digits.json; collab prints each peer's per-seed differences to its baselines)
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import main  # noqa: E402

R = Path("bench/results")
SLIM = "16x32x64x128"  # the slim ResNet-18's stage widths


def run(tag: str, argv: list[str], cached: bool = False) -> dict:
    """One command, its result read from its JSON; with `cached`, a JSON already there is taken as it is (the
    runs are deterministic on a machine: seeds 0-2 of digit-scenes re-ran to the same values)."""
    js = R / f"{tag}.json"
    if not (cached and js.exists()) and main([*argv, "--threads", "2", "--out", str(R / f"{tag}.pt"),
                                              "--json", str(js)]):
        raise SystemExit(f"{tag} failed")
    return json.loads(js.read_text())


def mim_teacher(epochs: int) -> Path:
    path = R / f"mim-vit-e{epochs}.pt"
    if not path.exists():
        run(path.stem, ["train", "--arch", "vit", "--objective", "mim", "--epochs", str(epochs), "--data", "digits"])
    return path


def mean(runs: list[dict], key: str) -> float:
    return round(statistics.mean(r[key] for r in runs), 3)


def hybrid(seeds: list[int], epochs: int, mim_epochs: int) -> dict:
    teacher, mim = R / "vit-s0.pt", mim_teacher(mim_epochs)
    if not teacher.exists():
        raise SystemExit("needs bench/results/vit-s0.pt: run bench/train_digits.py first")
    base = ["distill", "--teacher", str(teacher), "--mim-teacher", str(mim), "--student", "vit", "--method",
            "hybrid", "--epochs", str(epochs), "--data", "digits"]
    masked, plain = [], []
    for s in seeds:
        masked.append(run(f"hybrid-e{epochs}-s{s}", [*base, "--seed", str(s)]))
        plain.append(run(f"hybrid-nomask-e{epochs}-s{s}", [*base, "--seed", str(s), "--mask-max", "0",
                                                           "--no-baselines"]))
    out = {k: mean(masked, k) for k in ("teacher_top1", "scratch_top1", "kd_top1", "fd_top1", "top1",
                                        "scratch_seconds", "fd_seconds", "train_seconds", "masking_flops_saving")}
    out.update(nomask_top1=mean(plain, "top1"), nomask_seconds=mean(plain, "train_seconds"), epochs=epochs,
               mim_epochs=mim_epochs, seeds=seeds)
    out["time_saving"] = round(1 - out["train_seconds"] / out["nomask_seconds"], 4)
    for key in ("attention_distance", "attention_nmi"):  # per head at the relation layers, then over runs
        div = {}
        for who in ("student", "fd_student", "mim_teacher"):
            heads = [[v for layer in r[key][who].values() for v in layer] for r in masked]
            div[who] = {"mean": round(statistics.mean(statistics.mean(h) for h in heads), 3),
                        "spread_across_heads": round(statistics.mean(statistics.pstdev(h) for h in heads), 3)}
        div["nomask_student"] = {"mean": round(statistics.mean(
            statistics.mean(v for layer in r[key]["student"].values() for v in layer) for r in plain), 3)}
        out[key] = div
    out["runs"] = masked + plain
    return out


def hybrid_layer(seeds: list[int], epochs: int, mim_epochs: int) -> dict:
    """The layer schedule (`--mask-schedule layer`: tokens pruned block by block inside the student, every
    masked epoch) beside no masking, timed side by side in this run."""
    teacher, mim = R / "vit-s0.pt", mim_teacher(mim_epochs)
    base = ["distill", "--teacher", str(teacher), "--mim-teacher", str(mim), "--student", "vit", "--method",
            "hybrid", "--epochs", str(epochs), "--data", "digits", "--no-baselines"]
    layer, plain = [], []
    for s in seeds:
        layer.append(run(f"hybrid-layer-e{epochs}-s{s}", [*base, "--seed", str(s), "--mask-schedule", "layer"]))
        plain.append(run(f"hybrid-nomask-e{epochs}-s{s}", [*base, "--seed", str(s), "--mask-max", "0"]))
    out = {"layer_top1": mean(layer, "top1"), "layer_seconds": mean(layer, "train_seconds"),
           "layer_flops_saving": mean(layer, "masking_flops_saving"), "layer_nomask_top1": mean(plain, "top1"),
           "layer_nomask_seconds": mean(plain, "train_seconds"),
           "layer_attention_nmi": round(statistics.mean(statistics.mean(
               v for layer_ in r["attention_nmi"]["student"].values() for v in layer_) for r in layer), 3),
           "layer_attention_distance": round(statistics.mean(statistics.mean(
               v for layer_ in r["attention_distance"]["student"].values() for v in layer_) for r in layer), 3)}
    out["layer_time_saving"] = round(1 - out["layer_seconds"] / out["layer_nomask_seconds"], 4)
    out["layer_runs"] = layer
    return out


def pretrained_peers(peer_arch: str, channels: str, start: str) -> tuple[Path, Path]:
    """The two peers' starts, made once (seed 0): the ResNet trained on digits classification (15 epochs at 32
    px); the transformer trained on digits classification (`digits`: 30 epochs at 64 px, the size of the
    scenes) or pretrained as an MAE on the digit-scenes training images, labels unused (`scenes-mae`: 30
    epochs). What a user starts a segmentation pair from, as the paper starts from ImageNet weights; each collab
    seed then starts both peers' backbones from them, heads fresh."""
    pre = R / "pre"
    mae = start == "scenes-mae"
    paths = pre / f"resnet-c{channels}-s0.pt", pre / f"{peer_arch}64-{'mim-scenes-' if mae else ''}s0.pt"
    if not paths[0].exists():
        run(f"pre/{paths[0].stem}", ["train", "--arch", "resnet", "--arch-args", f"channels={channels}", "--epochs",
                                     "15", "--data", "digits", "--seed", "0"])
    if not paths[1].exists():
        run(f"pre/{paths[1].stem}", ["train", "--arch", peer_arch, "--arch-args", "img_size=64", "--epochs", "30",
                                     "--seed", "0", *(["--objective", "mim", "--data", "digit-scenes"] if mae else
                                                      ["--data", "digits"])])
    return paths


def collab(seeds: list[int], data: str, epochs: int, peer_arch: str = "vit", tau: float = 1.0,
           channels: str = SLIM, cached: bool = False, start: str = "scratch") -> dict:
    peer = ["--peer", peer_arch] + (["--peer-args", "img_size=64"] if data == "digit-scenes" else [])
    student = ["--student", "resnet", "--student-args", f"channels={channels}"]
    if start != "scratch":
        cnn, vit = pretrained_peers(peer_arch, channels, start)
        student, peer = ["--student", str(cnn)], ["--peer", str(vit)]
    tag = ((data if peer_arch == "vit" else f"{data}-{peer_arch}") + ("" if tau == 1 else f"-t{tau:g}")
           + ("" if channels == SLIM else f"-c{channels}") + ("" if start == "scratch" else f"-from-{start}"))
    runs = [run(f"collab-{tag}-e{epochs}-s{s}", ["distill", "--method", "collab", *student,
                                                   *peer, "--epochs", str(epochs), "--data", data, "--seed", str(s),
                                                   "--pixel-temperature", str(tau)], cached)
            for s in seeds]
    m = runs[0]["metric"]
    keys = [f"solo_{m}", f"dml_{m}", m, f"peer_solo_{m}", f"peer_dml_{m}", f"peer_{m}", f"solo_ensemble_{m}",
            "only_student_right", "only_peer_right", "train_seconds", "solo_seconds", "peer_solo_seconds",
            "dml_seconds"]
    out = {k: mean(runs, k) for k in keys}
    out.update(metric=m, epochs=epochs, seeds=seeds, transfers=[r["transfers"] for r in runs], runs=runs,
               paired={f"{who}{m} - {who}{base}": paired(runs, f"{who}{m}", f"{who}{base}")
                       for who in ("", "peer_") for base in (f"solo_{m}", f"dml_{m}")})
    return out


def seed_span(seeds: list[int]) -> str:
    """'0-9' for consecutive seeds, else '0,5,7'."""
    consecutive = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    return f"{seeds[0]}-{seeds[-1]}" if consecutive else ",".join(map(str, seeds))


def paired(runs: list[dict], key: str, base: str) -> dict:
    """Per-seed differences of two rows that share the seed (each peer starts from the same weights and sees
    the same batches in every row): mean, standard error, and the seeds above / level / below."""
    d = [r[key] - r[base] for r in runs]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return {"mean": round(statistics.mean(d), 3), "se": round(se, 3), "above": sum(x > 0 for x in d),
            "level": sum(x == 0 for x in d), "below": sum(x < 0 for x in d), "per_seed": [round(x, 2) for x in d]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=["hybrid", "hybrid-layer", "collab"], default=None)
    ap.add_argument("--hybrid-epochs", type=int, default=10)
    ap.add_argument("--mim-epochs", type=int, default=30)
    ap.add_argument("--collab-epochs", type=int, default=10)
    ap.add_argument("--scenes-epochs", type=int, default=10)
    ap.add_argument("--collab-data", nargs="+", choices=["digits", "digit-scenes"], default=["digits", "digit-scenes"])
    ap.add_argument("--scenes-peer", choices=["vit", "swin", "pvt"], default="vit",
                    help="the peer on digit-scenes: the plain ViT, the hierarchical Swin alias, or PVT-v2 (the "
                         "paper's ViT peer is SegFormer, whose encoder is PVT-v2's design)")
    ap.add_argument("--pixel-temperature", type=float, default=1.0,
                    help="collab and its DML baseline: the pixel-wise KL's temperature")
    ap.add_argument("--cached", action="store_true",
                    help="collab: take a seed's result from its JSON in bench/results where there is one (to add "
                         "seeds to a run; a changed method needs them deleted)")
    ap.add_argument("--resnet-channels", default=SLIM,
                    help="collab: the ResNet peer's stage widths (8x16x32x64: half the slim ResNet-18, closer to "
                         "the ViT's strength)")
    ap.add_argument("--start", choices=["scratch", "digits", "scenes-mae"], default="scratch",
                    help="collab on digit-scenes: both peers from scratch, or their backbones from classifiers "
                         "trained once on digits (the paper's peers start pretrained), or the ResNet's so and the "
                         "transformer's from an MAE on the scenes' images")
    args = ap.parse_args()
    if args.start != "scratch" and args.collab_data != ["digit-scenes"]:
        ap.error(f"--start {args.start} is for --collab-data digit-scenes (the peers are pretrained for it)")
    path = R / "hybrid_digits.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if args.only in (None, "hybrid"):
        res["hybrid"] = hybrid(args.seeds, args.hybrid_epochs, args.mim_epochs)
        path.write_text(json.dumps(res, indent=1))
    if args.only in (None, "hybrid-layer"):
        res.setdefault("hybrid", {}).update(hybrid_layer(args.seeds, args.hybrid_epochs, args.mim_epochs))
        path.write_text(json.dumps(res, indent=1))
    if args.only in (None, "collab"):
        for data in args.collab_data:
            epochs_arg = "scenes_epochs" if data == "digit-scenes" else "collab_epochs"
            epochs = getattr(args, epochs_arg)
            peer = args.scenes_peer if data == "digit-scenes" else "vit"
            key = (f"collab {data}" + ("" if peer == "vit" else f" {peer}")
                   + ("" if args.pixel_temperature == 1 else f" tau {args.pixel_temperature:g}")
                   + ("" if args.seeds == [0, 1, 2] else f" seeds {seed_span(args.seeds)}")
                   + ("" if args.resnet_channels == SLIM else f" resnet {args.resnet_channels}")
                   + ("" if args.start == "scratch" else f" from {args.start}")
                   + ("" if epochs == ap.get_default(epochs_arg) else f" {epochs} epochs"))
            res[key] = collab(args.seeds, data, epochs, peer, args.pixel_temperature, args.resnet_channels,
                              args.cached, args.start)
            path.write_text(json.dumps(res, indent=1))
    if "hybrid" in res:
        h = res["hybrid"]
        print("| teacher | alone | KD | features only | hybrid, no masking | hybrid | masking: time / FLOPs saved |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {h['teacher_top1']:.2f} | {h['scratch_top1']:.2f} | {h['kd_top1']:.2f} | {h['fd_top1']:.2f} | "
              f"{h['nomask_top1']:.2f} | {h['top1']:.2f} | {h['time_saving']:.0%} / {h['masking_flops_saving']:.0%} |")
        print("attention distance (patches), mean / spread across heads:", h["attention_distance"])
        print("attention query-key NMI, mean / spread across heads:", h.get("attention_nmi"))
        if "layer_top1" in h:
            print(f"layer schedule: {h['layer_top1']:.2f} (no masking {h['layer_nomask_top1']:.2f} in the same run), "
                  f"time / FLOPs saved {h['layer_time_saving']:.0%} / {h['layer_flops_saving']:.0%}")
    for key in res:
        if key.startswith("collab "):
            c, m = res[key], res[key]["metric"]
            print(f"{key}: student alone {c[f'solo_{m}']:.2f} dml {c[f'dml_{m}']:.2f} collab {c[m]:.2f} | "
                  f"peer alone {c[f'peer_solo_{m}']:.2f} dml {c[f'peer_dml_{m}']:.2f} collab {c[f'peer_{m}']:.2f}" +
                  (f" | both alone, ensembled {c[f'solo_ensemble_{m}']:.2f}; right where the other is wrong: the "
                   f"student {c['only_student_right']:.2f}%, the peer {c['only_peer_right']:.2f}%"
                   if f"solo_ensemble_{m}" in c else ""))
            for what, p in c.get("paired", {}).items():  # the seed's rows share inits: their difference is paired
                print(f"  {what}: {p['mean']:+.2f} (se {p['se']:.2f}; seeds above / level / below: {p['above']} / "
                      f"{p['level']} / {p['below']})")
