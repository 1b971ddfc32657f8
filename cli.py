"""The `compress` command line: argparse subcommands over the library; rich for display only.

Every subcommand takes `--json PATH`, `--seed N` and `--recipe FILE` (YAML of flag values; flags given on the
command line override it; an unknown key is an error). The resolved settings are saved next to outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

from compress.errors import CompressError

DEFAULT_SEED = 0


# ---- argument parsing with recipes ------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default 0)")
    p.add_argument("--recipe", metavar="FILE", help="YAML file of flag values; command-line flags override it")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture for a bare state_dict (alias, timm name or module:function)")
    p.add_argument("--arch-args", default=None, help="architecture kwargs, e.g. img_size=32,embed_dim=96,depth=4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description="Fuse, distill, prune and quantize vision models.")
    parser.add_argument("--version", action="version", version=f"compress {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train a small ViT and a small CNN on digits and evaluate them")
    p.add_argument("--out-dir", default="demo-output", help="where the demo's checkpoints go")
    p.add_argument("--vit-epochs", type=int, default=40)
    p.add_argument("--cnn-epochs", type=int, default=15)
    _common(p)

    p = sub.add_parser("models", help="list registered architectures with parameter counts")
    p.add_argument("--num-classes", type=int, default=10)
    _common(p)

    p = sub.add_parser("train", help="train a model from scratch (or from --init) and save a checkpoint")
    p.add_argument("--arch", required=False, help="alias, timm model name, or package.module:function")
    p.add_argument("--arch-args", default=None, help="architecture kwargs, e.g. img_size=32,embed_dim=96,depth=4")
    p.add_argument("--data", default="digits", help="digits, digit-scenes, or a folder (see docs)")
    p.add_argument("--out", help="output checkpoint (.pt or .safetensors)")
    p.add_argument("--init", help="start from this checkpoint's weights")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--resume", action="store_true", help="continue from the last saved epoch of this run")
    _common(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint: accuracy, parameters, MACs, size, latency")
    p.add_argument("checkpoint")
    p.add_argument("--data", default="digits")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--latency-runs", type=int, default=30)
    _model_args(p)
    _common(p)

    p = sub.add_parser("fuse", help="fuse two or more trained models of one architecture with optimal transport")
    p.add_argument("--models", nargs="+", default=None, help="checkpoints to fuse (the last is the anchor)")
    p.add_argument("--data", default="digits", help="calibration, finetuning and evaluation data")
    p.add_argument("--out", help="output checkpoint")
    p.add_argument("--ground", default="acts", choices=["acts", "wts"],
                   help="ground cost: activation correlations, or weight matching (no data needed for it)")
    p.add_argument("--solver", default="emd", choices=["emd", "sinkhorn", "hungarian"])
    p.add_argument("--softness", type=float, default=0.1, help="sinkhorn regulariser relative to the cost scale")
    p.add_argument("--calib", type=int, default=256, help="calibration images for activation statistics")
    p.add_argument("--residual", default="shared", choices=["shared", "mean", "weighted"],
                   help="residual streams: one shared map each, or the paper's per-sublayer maps (acts only)")
    p.add_argument("--attention", default="heads", choices=["heads", "full", "shared_qk"],
                   help="attention maps: head-aware, or the paper's cross-head maps per Q/K/V (acts only)")
    p.add_argument("--anchor", type=int, default=-1, help="index of the model whose basis the result takes")
    p.add_argument("--tokens", default="all", choices=["all", "cls", "window"],
                   help="token positions in the statistics (ViT-style sequences; conv maps use all)")
    p.add_argument("--window", type=int, default=6, help="central patch window side for --tokens window")
    p.add_argument("--repair", action="store_true",
                   help="REPAIR: restore each Linear unit's mean / std to its parents' (variance collapse); "
                        "use it when not finetuning: digits ViTs one-shot 31.7%% -> 58.5%%, no change after 4 epochs")
    p.add_argument("--width", type=float, default=1.0,
                   help="fuse into this fraction of the anchor's channels (0.5: half-wide; heads kept)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="finetune the fused model (and vanilla) after")
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--finetune-batch-size", type=int, default=64,
                   help="finetune batch; smaller batches give more steps in the same epochs (digits: 16, measured)")
    p.add_argument("--plot", metavar="PNG", help="write the transport maps as a picture")
    _common(p)

    p = sub.add_parser("distill", help="train a student from a teacher of any architecture (OFA-KD, KD, hints)")
    p.add_argument("--teacher", help="trained teacher checkpoint (an architecture name needs --train-teacher)")
    p.add_argument("--student", help="student architecture name, or a checkpoint to start from")
    p.add_argument("--student-args", default=None, help="student architecture kwargs, e.g. embed_dim=64,depth=4")
    p.add_argument("--method", default="ofa", choices=["ofa", "kd", "fitnet", "transkd", "scratch"],
                   help="transkd: segmentation (digit-scenes, masks:) between hierarchical backbones")
    p.add_argument("--transkd-variant", default="base", choices=["base", "gl", "ea"],
                   help="TransKD: CSF + HCL + PEA, plus the GL-Mixer or the embedding assistant")
    p.add_argument("--transkd-weight", type=float, default=1.0, help="TransKD: weight of its feature terms")
    p.add_argument("--data", default="digits")
    p.add_argument("--out", help="output student checkpoint (helpers stripped)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--gamma", type=float, default=1.0, help="OFA's target enhancement exponent")
    p.add_argument("--temperature", type=float, default=1.0, help="OFA's temperature")
    p.add_argument("--paper-form", action="store_true", help="OFA: the paper's loss instead of the reference code's")
    p.add_argument("--ofa-weight", type=float, default=1.0, help="weight of OFA's stage-branch losses")
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--kd-alpha", type=float, default=0.9)
    p.add_argument("--train-teacher", action="store_true", help="train the --teacher architecture first")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--teacher-args", help="with --train-teacher: teacher architecture kwargs, e.g. "
                   "depths=4x4x12x6,embed_dims=64x128x320x512 (TransKD's one family at two sizes)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the student from scratch and with KD on the same budget (default on)")
    p.add_argument("--cache-teacher", action="store_true",
                   help="compute the teacher's logits once per image (turns the random shifts off, so images recur)")
    p.add_argument("--cka-plot", metavar="PNG", help="teacher-vs-student stage CKA heatmap")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    _common(p)

    p = sub.add_parser("prune", help="make a model physically smaller: drop blocks, slice widths, factorise")
    p.add_argument("checkpoint")
    p.add_argument("--method", default="width", choices=["depth", "width", "lowrank"])
    p.add_argument("--ratio", type=float, default=0.5,
                   help="fraction removed: of the blocks (depth), of each space's units (width), of each layer's "
                        "parameters (lowrank)")
    p.add_argument("--target-macs", type=float, default=None,
                   help="choose the ratio that removes this fraction of the MACs (overrides --ratio; 0 = off)")
    p.add_argument("--keep", type=int, default=None, help="depth: number of units to keep (instead of --ratio)")
    p.add_argument("--unit", default="block", choices=["block", "attn", "mlp"], help="depth: what a unit is")
    p.add_argument("--score", default="cos", choices=["cos", "loss"],
                   help="depth: rank units by cos(in, out) (the paper's) or by greedy calibration loss")
    p.add_argument("--importance", default="hessian", choices=["activation", "magnitude", "taylor", "hessian"],
                   help="width: unit importance (hessian: most accurate without training, docs/BENCHMARKS.md)")
    p.add_argument("--round-to", type=int, default=1, help="width: kept channel counts rounded up to a multiple")
    p.add_argument("--include-residual", action="store_true", help="width: also slice the residual streams")
    p.add_argument("--whiten", action="store_true", help="lowrank: activation-whitened SVD (SVD-LLM)")
    p.add_argument("--exclude", nargs="*", default=[], help="fnmatch patterns of tensors / layers left alone")
    p.add_argument("--data", default="digits", help="calibration, recovery and evaluation data")
    p.add_argument("--calib", type=int, default=128, help="calibration images (scores, statistics)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="recovery training after pruning")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--distill-from-original", action="store_true",
                   help="recovery with knowledge distillation from the unpruned model")
    p.add_argument("--resume", action="store_true", help="continue an interrupted recovery from its last epoch")
    p.add_argument("--sweep", nargs="*", type=float, default=None,
                   help="also measure accuracy (no recovery) at these ratios (default 0 0.1 ... 0.8)")
    p.add_argument("--plot", metavar="PNG", help="with --sweep: the accuracy-vs-ratio curve as a picture")
    p.add_argument("--out", help="output checkpoint")
    _model_args(p)
    _common(p)

    p = sub.add_parser("quantize", help="post-training quantization (simulated) and a real int8 artifact")
    p.add_argument("checkpoint")
    p.add_argument("--bits", default="w8a8", help="wXaY, X and Y from 2 to 8 (w8a8, w6a6, w4a8, w4a4)")
    p.add_argument("--method", default="qhyvit", help="qhyvit, ptq4vit, repq, percentile or minmax")
    p.add_argument("--calib", type=int, default=32, help="calibration images from the training split")
    p.add_argument("--exclude", nargs="*", default=[], help="fnmatch patterns of sites / modules kept in float")
    p.add_argument("--recon-iters", type=int, default=200, help="qhyvit: learned-rounding steps per bridge block")
    p.add_argument("--data", default="digits", help="calibration and evaluation data")
    p.add_argument("--out", help="quantized (fake-quant) checkpoint; `compress eval` reloads it")
    p.add_argument("--deploy", metavar="PT2", help="also write a real int8 program (PT2E, x86 Inductor) here")
    p.add_argument("--sensitivity-plot", metavar="PNG", help="per-site sensitivity (SQNR when alone quantized)")
    _model_args(p)
    _common(p)

    p = sub.add_parser("inspect", help="print a checkpoint's description and its model's alignment")
    p.add_argument("checkpoint")
    _model_args(p)
    _common(p)
    return parser


def _version() -> str:
    from compress import __version__

    return __version__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags, with `--recipe FILE` values as defaults under the command line's.

    Example:
        >>> parse_args(["train", "--recipe", "recipes/train-vit.yaml", "--epochs", "5"]).epochs
        5
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in provenance
    if not args.recipe:
        return args
    path = Path(args.recipe)
    if not path.is_file():
        raise CompressError(f"recipe '{path}' not found", expected="an existing YAML file")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise CompressError(f"recipe '{path}' is not a mapping", expected="key: value lines",
                            found=type(recipe).__name__)
    subparser = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[args.command]
    known = {a.dest for a in subparser._actions if a.dest not in ("help", "recipe")}
    values = {str(k).replace("-", "_"): v for k, v in recipe.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CompressError(f"unknown recipe key '{unknown[0]}' in {path}",
                            expected=f"one of {', '.join(sorted(k.replace('_', '-') for k in known))}")
    subparser.set_defaults(**values)
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def guard_paths(inputs: list, outputs: list) -> None:
    """Refuse to write over an input: nothing the user gave us is ever overwritten."""
    ins = {Path(p).resolve() for p in inputs if p}
    for out in filter(None, outputs):
        if Path(out).resolve() in ins:
            raise CompressError(f"output path '{out}' is also an input", expected="a different output path",
                                hint="inputs are never overwritten")


# ---- commands ---------------------------------------------------------------------------------------

def cmd_models(args) -> dict:
    from compress import ARCHS, create_model
    from compress.measure import param_count
    from compress.registry import default_img_size
    from compress.report import console, table

    rows = []
    for name in ARCHS.names():
        b = ARCHS.get(name)
        model = create_model(name, num_classes=args.num_classes)
        rows.append({"name": name, "timm": getattr(b, "timm_name", type(model).__name__),
                     "img_size": default_img_size(name), "params": param_count(model)})
    console.print(table("registered architectures (any timm model name works too)", rows))
    return {"models": rows}


def cmd_train(args) -> dict:
    from compress import Checkpoint, InputSpec, load, save
    from compress.data import load_data
    from compress.measure import miou, param_count, top1
    from compress.registry import default_img_size, parse_arch_args
    from compress.report import console
    from compress.train import TrainConfig, train

    if not args.out:
        raise CompressError("train needs --out", expected="an output path ending in .pt or .safetensors")
    if not args.arch and not args.init:
        raise CompressError("train needs --arch or --init", expected="an architecture name or a checkpoint")
    data_path = args.data if args.data not in ("digits", "digit-scenes") else None
    guard_paths([args.init, data_path and data_path.partition(":")[2] or data_path], [args.out, args.json])
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      label_smoothing=args.label_smoothing, seed=args.seed)
    task = "segmentation" if args.data == "digit-scenes" or args.data.startswith("masks:") else "classification"
    arch_args = parse_arch_args(args.arch_args)
    base = load(args.init, arch=args.arch, arch_args=arch_args) if args.init else None
    spec = base.input if base else InputSpec(size=default_img_size(args.arch, arch_args))
    data = load_data(args.data, spec, task)
    if base is None:
        base = Checkpoint.create(args.arch, data.num_classes, data.task, arch_args, input=spec, seed=args.seed)
    if base.num_classes != data.num_classes or base.task != data.task:
        raise CompressError("checkpoint and data disagree", expected=f"{data.num_classes} classes, task {data.task}",
                            found=f"{base.num_classes} classes, task {base.task}")
    model = base.build().train()
    start = time.perf_counter()
    state_path = Path(str(args.out) + ".resume.pt")
    train(model, data.train, cfg, state_path=state_path, resume=args.resume, description=f"train {base.arch}")
    seconds = time.perf_counter() - start
    metric = "miou" if data.task == "segmentation" else "top1"
    score = miou(model, data.test, data.num_classes) if metric == "miou" else top1(model, data.test)
    val = miou(model, data.val, data.num_classes) if metric == "miou" else top1(model, data.val)
    result = {"arch": base.arch, "data": data.name, metric: score, f"val_{metric}": val, "params": param_count(model),
              "seconds": round(seconds, 2), "epochs": cfg.epochs, "seed": cfg.seed, "out": str(args.out)}
    ckpt = base.derive(model, command=" ".join(["compress", *args.argv]), metrics=result,
                       parents=[args.init] if args.init else [])
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 writes
        return result
    save(ckpt, args.out)
    _save_resolved(args, args.out)
    console.print(f"[bold]{base.arch}[/] on {data.name}: test {metric} {score:.2f}%  (val {val:.2f}%)  "
                  f"{param_count(model):,} params  {seconds:.1f}s  -> {args.out}")
    return result


def evaluate_checkpoint(path: str, data_spec: str, split: str = "test", arch: str | None = None,
                        arch_args: dict | None = None, latency_runs: int = 30, threads: int | None = None) -> dict:
    """Everything `compress eval` reports, as a dict."""
    from compress import load
    from compress.data import load_data
    from compress.measure import file_size, latency_ms, macs, miou, param_count, top1

    ckpt = load(path, arch=arch, arch_args=arch_args)
    model = ckpt.build()
    data = load_data(data_spec, ckpt.input, ckpt.task)
    if data.num_classes != ckpt.num_classes:
        raise CompressError(f"'{path}' predicts {ckpt.num_classes} classes", expected=f"{data.num_classes} for {data.name}")
    subset = getattr(data, split)
    result = {"checkpoint": str(path), "arch": ckpt.arch, "task": ckpt.task, "data": data.name, "split": split}
    if ckpt.task == "segmentation":
        result["miou"] = miou(model, subset, data.num_classes)
    else:
        result["top1"] = top1(model, subset)
    result.update(params=param_count(model), macs=macs(model, ckpt.input.size), size_bytes=file_size(path),
                  latency_ms=latency_ms(model, ckpt.input.size, 1, runs=latency_runs, num_threads=threads),
                  latency_ms_batch32=latency_ms(model, ckpt.input.size, 32, runs=max(latency_runs // 3, 5),
                                                num_threads=threads),
                  threads=threads or __import__("torch").get_num_threads())
    return result


def cmd_eval(args) -> dict:
    from compress.registry import parse_arch_args
    from compress.report import console, table

    guard_paths([args.checkpoint], [args.json])
    r = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.arch, parse_arch_args(args.arch_args),
                            args.latency_runs, args.threads)
    metric = "miou" if "miou" in r else "top1"
    console.print(table(f"{r['checkpoint']} on {r['data']} ({r['split']})", [{
        metric: r[metric], "params": r["params"], "MACs": r["macs"], "size (bytes)": r["size_bytes"],
        "latency b1 (ms)": r["latency_ms"], "latency b32 (ms)": r["latency_ms_batch32"], "threads": r["threads"]}]))
    return r


def cmd_inspect(args) -> dict:
    from compress import align, load
    from compress.measure import param_count
    from compress.registry import parse_arch_args
    from compress.report import console, table

    guard_paths([args.checkpoint], [args.json])
    ckpt = load(args.checkpoint, arch=args.arch, arch_args=parse_arch_args(args.arch_args))
    model = ckpt.build()
    net = model.backbone if ckpt.task == "segmentation" else model
    al = align(net, ckpt.input.size)
    prov = ckpt.provenance or {}
    console.print(f"[bold]{args.checkpoint}[/]: {ckpt.arch} {ckpt.arch_args or ''}, task {ckpt.task}, "
                  f"{ckpt.num_classes} classes, {param_count(model):,} parameters")
    console.print(f"input: {ckpt.input.size}px, mean {ckpt.input.mean}, std {ckpt.input.std}")
    console.print(f"provenance: {prov.get('command', '?')}; parents {prov.get('parents') or 'none'}; "
                  f"metrics { {k: v for k, v in (prov.get('metrics') or {}).items() if k in ('top1', 'miou', 'seconds')} }")
    stages = [{"stage": s.module, "channels": s.channels, "stride": s.reduction} for s in al.stages]
    console.print(table("canonical stages (taps)", stages))
    spaces = [{"space": s.name, "size": s.size, "tensors": len(s.tensors), "residual": s.residual}
              for s in al.spaces.spaces]
    console.print(table(f"spaces ({len(spaces)}; coverage {al.spaces.coverage(net.state_dict()):.1%} of parameters)",
                        spaces))
    blocks = [{"block": b.name, "kind": b.kind} for b in al.blocks]
    console.print(table("blocks", blocks))
    return {"arch": ckpt.arch, "arch_args": ckpt.arch_args, "task": ckpt.task, "num_classes": ckpt.num_classes,
            "params": param_count(model), "input": vars(ckpt.input), "provenance": prov, "stages": stages,
            "spaces": spaces, "blocks": blocks, "unknown_ops": al.spaces.unknown_ops}


def cmd_demo(args) -> dict:
    from compress.report import console, table

    out = Path(args.out_dir)
    results = []
    for arch, epochs in (("vit", args.vit_epochs), ("resnet", args.cnn_epochs)):
        path = out / f"{arch}-digits.pt"
        targs = parse_args(["train", "--arch", arch, "--data", "digits", "--epochs", str(epochs), "--seed",
                            str(args.seed), "--out", str(path)])
        trained = cmd_train(targs)
        r = evaluate_checkpoint(str(path), "digits", threads=args.threads)
        r["train_seconds"] = trained["seconds"]
        results.append(r)
    console.print(table("demo: two small models trained on the embedded digits", [
        {"model": r["arch"], "top1": r["top1"], "params": r["params"], "MACs": r["macs"], "size": r["size_bytes"],
         "latency b1 ms": r["latency_ms"], "train s": r["train_seconds"]} for r in results]))
    return {"models": results}


def _save_resolved(args, out) -> None:
    """Save the resolved settings next to an output, so a run can be repeated exactly."""
    from compress.checkpoint import atomic_write

    settings = {k.replace("_", "-"): v for k, v in vars(args).items() if k not in ("command", "json", "recipe", "argv")}
    path = Path(str(out) + ".yaml")
    atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(settings, sort_keys=True)))


def cmd_fuse(args) -> dict:
    import copy
    import resource

    import torch

    from compress import load, save
    from compress.data import load_data
    from compress.measure import miou, top1
    from compress.report import console, table
    from compress.train import TrainConfig, train
    from fuse import Ensemble, FuseConfig, check_width, fuse_models, narrow, recompute_batchnorm, vanilla_average

    if not args.models or len(args.models) < 2:
        raise CompressError("fuse needs --models with two or more checkpoints", found=str(len(args.models or [])))
    if not args.out:
        raise CompressError("fuse needs --out", expected="an output path ending in .pt or .safetensors")
    guard_paths(args.models, [args.out, args.json, args.plot])
    check_width(args.width)  # before any work
    ft = (TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=args.finetune_batch_size,
                      seed=args.seed) if args.finetune_epochs else None)  # validated before any work too
    cfg = FuseConfig(ground=args.ground, solver=args.solver, softness=args.softness, calib=args.calib, anchor=args.anchor,
                     tokens=args.tokens, window=args.window, residual=args.residual,
                     attention=args.attention, repair=args.repair)
    ckpts = [load(p) for p in args.models]
    first = ckpts[0]
    for path, c in zip(args.models[1:], ckpts[1:]):  # every mismatch is named before any work
        for what, a, b in (("architecture", first.arch, c.arch), ("classes", first.num_classes, c.num_classes),
                           ("task", first.task, c.task), ("input spec", vars(first.input), vars(c.input))):
            if a != b:
                raise CompressError(f"cannot fuse {args.models[0]} with {path}: different {what}",
                                    expected=str(a), found=str(b))
    torch.manual_seed(args.seed)
    timings = {}
    t0 = time.perf_counter()
    models = [c.build() for c in ckpts]
    data = load_data(args.data, first.input, first.task)
    images = _images(data.train, cfg.calib)
    anchor_ckpt = ckpts[cfg.anchor % len(ckpts)]

    def score(model):  # top-1 for classifiers, mIoU for segmentation
        return miou(model, data.test, data.num_classes) if data.task == "segmentation" else top1(model, data.test)

    result = {"models": args.models, "arch": first.arch, "solver": cfg.solver, "softness": cfg.softness,
              "tokens": cfg.tokens, "ground": cfg.ground, "residual": cfg.residual,
              "attention": cfg.attention, "repair": cfg.repair,
              "metric": "miou" if data.task == "segmentation" else "top1",
              "parents": [score(m) for m in models], "ensemble": score(Ensemble(models))}
    same_shapes = all(m.state_dict()[k].shape == v.shape for m in models for k, v in models[0].state_dict().items())
    # the baseline that keeps the fused model's size: vanilla averaging, or with --width the anchor narrowed
    baseline, target, structure = None, None, list(anchor_ckpt.structure)
    if args.width < 1:
        target, op = narrow(models[cfg.anchor % len(models)], images, args.width)
        structure.append(op)
        baseline = copy.deepcopy(target)
        recompute_batchnorm(baseline, images)
    elif same_shapes:
        baseline = anchor_ckpt.build()
        baseline.load_state_dict(vanilla_average(models))
        recompute_batchnorm(baseline, images)
    name = "narrowed" if target is not None else "vanilla"
    result.update(vanilla=None, narrowed=None, width=args.width)
    if baseline is not None:
        result[name] = score(baseline)
    t = time.perf_counter()
    state, report = fuse_models(models, images, cfg, target)
    fused = copy.deepcopy(target) if target is not None else anchor_ckpt.build()
    fused.load_state_dict(state)
    bn = recompute_batchnorm(fused, images)
    timings["fuse"] = time.perf_counter() - t
    result["ot"] = score(fused)
    result.update(ot_finetuned=None, vanilla_finetuned=None, narrowed_finetuned=None, batchnorm_recomputed=bn,
                  spaces=report.spaces, unmatched_spaces=report.unmatched, fallbacks=report.fallbacks,
                  repaired_layers=report.repaired,
                  partners=report.partners)
    if ft is not None:
        t = time.perf_counter()
        train(fused.train(), data.train, ft, description="finetune OT-fused")
        timings["finetune"] = time.perf_counter() - t
        result["ot_finetuned"] = score(fused)
        if baseline is not None:
            train(baseline.train(), data.train, ft, description=f"finetune {name}")
            result[f"{name}_finetuned"] = score(baseline)
    timings.update(trace=report.seconds_trace, statistics=report.seconds_stats, ot_solve=report.seconds_solve,
                   apply=report.seconds_apply, repair=report.seconds_repair)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["seconds_by_stage"] = {k: round(v, 3) for k, v in timings.items()}
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    ckpt = anchor_ckpt.derive(fused, command=" ".join(["compress", *args.argv]), parents=list(args.models),
                              structure=structure,
                              metrics={k: result[k] for k in ("ot", "ot_finetuned", "vanilla", "ensemble")})
    save(ckpt, args.out)
    if args.plot:
        _plot_maps(report.maps, args.plot)
    rows = [{"model": f"parent {i}", "top1": v} for i, v in enumerate(result["parents"])]
    label = f"anchor narrowed to {args.width:g}" if target is not None else "vanilla average"
    rows += [{"model": "output ensemble", "top1": result["ensemble"]},
             {"model": label, "top1": result[name]},
             {"model": f"OT one-shot ({cfg.solver})", "top1": result["ot"]}]
    if args.finetune_epochs:
        rows += [{"model": f"{label} + {args.finetune_epochs} ep", "top1": result[f"{name}_finetuned"]},
                 {"model": f"OT + {args.finetune_epochs} ep", "top1": result["ot_finetuned"]}]
    console.print(table(f"fusion of {len(models)} x {first.arch} on {data.name} (test {result['metric']})", rows))
    console.print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in result["seconds_by_stage"].items()) +
                  f"; peak memory {result['peak_rss_mb']} MB -> {args.out}")
    for f in report.fallbacks:
        console.print(f"[yellow]fallback[/]: {f}")
    return result


def cmd_distill(args) -> dict:
    import torch

    from compress import Checkpoint, InputSpec, load, save
    from compress.alignment import align
    from compress.data import load_data
    from compress.measure import macs, miou, param_count, top1
    from compress.registry import default_img_size, parse_arch_args
    from compress.report import console, table
    from compress.train import TrainConfig, train
    from distill import METHODS, DistillConfig, Distiller, cka_matrix

    if not args.teacher or not args.student or not args.out:
        raise CompressError("distill needs --teacher, --student and --out",
                            expected="a teacher checkpoint, a student architecture (or checkpoint), an output path")
    guard_paths([args.teacher, args.student], [args.out, args.json, args.cka_plot])
    cfg = DistillConfig(method=args.method, gamma=args.gamma, temperature=args.temperature, paper_form=args.paper_form,
                        ofa_weight=args.ofa_weight, kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha,
                        transkd_variant=args.transkd_variant, transkd_weight=args.transkd_weight)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       max_shift=0.0 if args.cache_teacher else TrainConfig.max_shift)
    student_args = parse_arch_args(args.student_args)
    task = "segmentation" if args.data == "digit-scenes" or args.data.startswith("masks:") else "classification"
    if Path(args.student).is_file():
        base = load(args.student)
    else:
        base = Checkpoint(args.student, student_args, task=task,
                          input=InputSpec(size=default_img_size(args.student, student_args)))
    data = load_data(args.data, base.input, task)
    teacher_ckpt = _teacher(args, data, base)
    if teacher_ckpt.num_classes != data.num_classes:
        raise CompressError("teacher and data predict different classes", expected=f"{data.num_classes} ({data.name})",
                            found=f"{teacher_ckpt.num_classes} in {args.teacher}")
    if teacher_ckpt.task != data.task or base.task != data.task:
        raise CompressError("teacher, student and data disagree on the task", expected=f"{data.task} ({data.name})",
                            found=f"teacher {teacher_ckpt.task}, student {base.task}")
    base.num_classes = data.num_classes
    teacher = teacher_ckpt.build()
    if cfg.method == "transkd" and teacher_ckpt.arch != base.arch:
        console.print(f"[yellow]note[/]: TransKD pairs one family at two sizes in the paper (MiT-B2 -> B0); across "
                      f"families ({teacher_ckpt.arch} -> {base.arch}) it can lose to the student alone "
                      "(resnet -> efficientformer on digit-scenes: -2.4 mIoU, docs/BENCHMARKS.md)")
    metric = "miou" if data.task == "segmentation" else "top1"

    def score(model):
        return miou(model, data.test, data.num_classes) if metric == "miou" else top1(model, data.test)

    t0 = time.perf_counter()

    def run(method: str):
        torch.manual_seed(args.seed)
        student = base.build() if base.state_dict else base.instantiate()
        d = Distiller(student, teacher, DistillConfig(**{**vars(cfg), "method": method}), base.input,
                      teacher_ckpt.input, data.num_classes, cache_teacher=args.cache_teacher and method != "scratch")
        t = time.perf_counter()
        state = Path(f"{args.out}.{method}.resume.pt")
        train(d, data.train, tcfg, loss_fn=lambda net, x, y: net(x, y), state_path=state, resume=args.resume,
              description=f"{method} {base.arch}")
        return d, time.perf_counter() - t

    main_run, seconds = run(cfg.method)
    student = main_run.student.eval()
    result = {"teacher": args.teacher, "student": args.student, "method": cfg.method, "data": data.name,
              "metric": metric, "epochs": args.epochs, metric: score(student), "seconds": round(seconds, 2),
              f"teacher_{metric}": score(teacher), "student_params": param_count(student),
              "teacher_params": param_count(teacher), "student_macs": macs(student, base.input.size),
              "teacher_macs": macs(teacher, teacher_ckpt.input.size), "extra_parameters": main_run.extra_parameters(),
              "reconciled": main_run.teacher_input.changes, "families": main_run.shapes.families,
              "gamma": cfg.gamma, "paper_form": cfg.paper_form, "cache_teacher": bool(args.cache_teacher)}
    for change in main_run.teacher_input.changes:
        console.print(f"[yellow]teacher input reconciled[/]: {change}")
    baselines = [m for m in ("scratch", "kd") if m != cfg.method and data.task in METHODS.get(m).tasks] \
        if args.baselines else []
    for m in baselines:
        d, sec = run(m)
        result[f"{m}_{metric}"] = score(d.student.eval())
        result[f"{m}_seconds"] = round(sec, 2)
    x = _images(data.test, 256)
    nets = [getattr(m, "backbone", m) for m in (teacher, student)]  # a segmentation network's backbone
    with torch.no_grad():
        t_feats = align(nets[0], teacher_ckpt.input.size).features(main_run.teacher_input(x))
        s_feats = align(nets[1], base.input.size).features(x)
    result["cka"] = [[round(v, 4) for v in row] for row in cka_matrix(t_feats, s_feats)]
    result["total_seconds"] = round(time.perf_counter() - t0, 2)
    out = base.derive(student, command=" ".join(["compress", *args.argv]), parents=[args.teacher] + (
        [args.student] if base.state_dict else []), metrics={k: result.get(k) for k in (
            metric, f"teacher_{metric}", f"scratch_{metric}", f"kd_{metric}")}, num_classes=data.num_classes)
    if int(os.environ.get("RANK", "0")) != 0:
        return result
    save(out, args.out)
    _save_resolved(args, args.out)
    rows = [{"model": f"teacher {teacher_ckpt.arch}", metric: result[f"teacher_{metric}"],
             "params": result["teacher_params"], "MACs": result["teacher_macs"]}]
    rows += [{"model": f"student {base.arch}: {m}", metric: result[f"{m}_{metric}"], "params": result["student_params"],
              "MACs": result["student_macs"]} for m in baselines]
    rows.append({"model": f"student {base.arch}: {cfg.method}", metric: result[metric],
                 "params": result["student_params"], "MACs": result["student_macs"]})
    console.print(table(f"distillation on {data.name}, {args.epochs} epochs each (test {metric})", rows))
    cka_rows = [{"teacher stage": i, **{f"student {j}": v for j, v in enumerate(row)}} for i, row in enumerate(result["cka"])]
    console.print(table("linear CKA, teacher stages (rows) vs student stages", cka_rows))
    if args.cka_plot:
        _plot_cka(result["cka"], args.cka_plot, f"CKA {teacher_ckpt.arch} vs {base.arch} ({cfg.method})")
    console.print(f"-> {args.out}")
    return result


def _teacher(args, data, student_ckpt):
    """The teacher checkpoint; an architecture name is trained first only with --train-teacher."""
    from compress import Checkpoint, InputSpec, load, save
    from compress.data import load_data
    from compress.registry import ARCHS, default_img_size, parse_arch_args
    from compress.train import TrainConfig, train

    if args.teacher_args and not args.train_teacher:
        raise CompressError("--teacher-args shapes a teacher that --train-teacher trains",
                            expected="--train-teacher with an architecture name", found=f"--teacher {args.teacher}")
    if Path(args.teacher).is_file():
        return load(args.teacher)
    if args.teacher not in ARCHS and ":" not in args.teacher and not _is_timm(args.teacher):
        raise CompressError(f"teacher '{args.teacher}' not found", expected="a checkpoint file or an architecture name")
    if not args.train_teacher:
        raise CompressError(f"'{args.teacher}' is an architecture, not a trained teacher",
                            expected="a teacher checkpoint",
                            hint=f"train one first (compress train --arch {args.teacher} --data {args.data} --out "
                                 f"teacher.pt) or add --train-teacher")
    # a segmentation network works at any size: the teacher sees the student's resolution
    arch_args = parse_arch_args(args.teacher_args)
    size = student_ckpt.input.size if data.task == "segmentation" else default_img_size(args.teacher, arch_args)
    spec = InputSpec(size=size)
    ckpt = Checkpoint.create(args.teacher, data.num_classes, data.task, arch_args, input=spec, seed=args.seed)
    model = ckpt.build().train()
    train(model, load_data(args.data, spec, data.task).train,
          TrainConfig(epochs=args.teacher_epochs, seed=args.seed, label_smoothing=0.0 if data.task == "segmentation"
                      else TrainConfig.label_smoothing), description=f"teacher {args.teacher}")
    path = Path(f"{args.out}.teacher.pt")
    save(ckpt.derive(model, command=f"compress distill --train-teacher ({args.teacher_epochs} epochs)"), path)
    args.teacher = str(path)
    return load(path)


def _is_timm(name: str) -> bool:
    import timm

    return name in timm.list_models()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str) -> None:
    from compress.checkpoint import atomic_write

    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    _pyplot().close(fig)


def _plot_cka(matrix, path: str, title: str) -> None:
    fig, a = _pyplot().subplots(figsize=(4, 3.5))
    im = a.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    a.set_xlabel("student stage"), a.set_ylabel("teacher stage"), a.set_title(title, fontsize=8)
    fig.colorbar(im)
    _save_figure(fig, path)


def cmd_prune(args) -> dict:
    import copy

    import torch

    from compress import save
    from compress.losses import distillation_objective
    from compress.measure import compare_latency, file_size, macs, param_count, top1
    from compress.prune import PruneConfig, prune
    from compress.report import console, table
    from compress.train import TrainConfig, train

    if not args.out and args.sweep is None:
        raise CompressError("prune needs --out (or --sweep only)", expected="an output path ending in .pt or .safetensors")
    guard_paths([args.checkpoint], [args.out, args.json, args.plot])
    cfg = PruneConfig(method=args.method, ratio=args.ratio, keep=args.keep, importance=args.importance, unit=args.unit,
                      score=args.score,
                      round_to=args.round_to, include_residual=args.include_residual, whiten=args.whiten,
                      exclude=tuple(args.exclude))
    for r in args.sweep or []:
        PruneConfig(method=args.method, ratio=r)  # every sweep ratio is checked before any work
    if args.finetune_epochs < 0 or args.calib < 1:
        raise CompressError("invalid recovery or calibration size", expected="--finetune-epochs >= 0, --calib >= 1",
                            found=f"{args.finetune_epochs}, {args.calib}")
    ckpt, data = _classifier_and_data(args, "prune")
    torch.manual_seed(args.seed)
    original = ckpt.build()
    x, y = _images(data.train, args.calib), _labels(data.train, args.calib)
    size = ckpt.input.size
    if args.target_macs:  # 0 turns a recipe's target off
        from dataclasses import replace

        from compress.prune import ratio_for_macs

        cfg = replace(cfg, ratio=ratio_for_macs(original, x, y, cfg, args.target_macs, ckpt.input.size), keep=None)
    result = {"checkpoint": args.checkpoint, "arch": ckpt.arch, "method": cfg.method, "ratio": cfg.ratio,
              "keep": cfg.keep, "unit": cfg.unit, "score": cfg.score, "importance": cfg.importance, "data": data.name}
    if args.sweep is not None:
        result["sweep"] = _prune_sweep(original, x, y, cfg, args.sweep or [i / 10 for i in range(9)], data, size,
                                       args.threads)
        console.print(table(f"{cfg.method} pruning sweep of {ckpt.arch} (no recovery, test top1)", result["sweep"]))
        if args.plot:
            _plot_sweep(result["sweep"], args.plot, f"{ckpt.arch}: {cfg.method} pruning")
    if not args.out:
        return result
    t0 = time.perf_counter()
    pruned = prune(copy.deepcopy(original), x, y, cfg)
    result["prune_seconds"] = round(time.perf_counter() - t0, 2)
    model = pruned.model.eval()
    result["top1_pruned"] = top1(model, data.test)
    if args.finetune_epochs:
        loss = distillation_objective(original) if args.distill_from_original else None
        t = time.perf_counter()
        train(model.train(), data.train, TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, seed=args.seed),
              loss_fn=loss, state_path=Path(str(args.out) + ".resume.pt"), resume=args.resume,
              description="recovery")
        result["finetune_seconds"] = round(time.perf_counter() - t, 2)
    model.eval()
    lat1 = compare_latency([original, model], size, 1, num_threads=args.threads)
    lat32 = compare_latency([original, model], size, 32, runs=5, num_threads=args.threads)
    result.update(params_before=param_count(original), params_after=param_count(model),
                  macs_before=macs(original, size), macs_after=macs(model, size),
                  latency_before_ms=round(lat1[0], 3), latency_after_ms=round(lat1[1], 3),
                  latency_before_ms_batch32=round(lat32[0], 3), latency_after_ms_batch32=round(lat32[1], 3),
                  top1_before=top1(original, data.test), top1_after=top1(model, data.test),
                  finetune_epochs=args.finetune_epochs, distill_from_original=bool(args.distill_from_original),
                  threads=args.threads or torch.get_num_threads(), op=pruned.op, units=pruned.rows)
    out = ckpt.derive(model, command=" ".join(["compress", *args.argv]), parents=[args.checkpoint],
                      structure=[*ckpt.structure, pruned.op],
                      metrics={k: result[k] for k in ("top1_before", "top1_pruned", "top1_after")})
    save(out, args.out)
    _save_resolved(args, args.out)
    result.update(size_before_bytes=file_size(args.checkpoint), size_after_bytes=file_size(args.out), out=args.out)
    rows = [{"": what, "params": result[f"params_{k}"], "MACs": result[f"macs_{k}"],
             "latency b1 ms": result[f"latency_{k}_ms"], "latency b32 ms": result[f"latency_{k}_ms_batch32"],
             "size bytes": result[f"size_{k}_bytes"], "top1": result[f"top1_{k}"]}
            for what, k in (("original", "before"), ("pruned", "after"))]
    console.print(table(f"{cfg.method} pruning of {ckpt.arch} (ratio {cfg.ratio}; test top1; "
                        f"{result['threads']} threads)", rows))
    console.print(f"top1 right after pruning {result['top1_pruned']:.2f}%"
                  + (f", after {args.finetune_epochs} recovery epochs {result['top1_after']:.2f}%"
                     if args.finetune_epochs else "") + f" -> {args.out}")
    return result


def cmd_quantize(args) -> dict:
    import copy

    import torch

    from compress import save
    from compress.alignment import align
    from compress.measure import top1
    from compress.report import console, table
    from quantize import METHODS, QuantConfig, calibrate, parse_bits, sensitivity
    from quantize.engine import sites_to_json

    if not args.out and not args.deploy:
        raise CompressError("quantize needs --out and/or --deploy", expected="an output path")
    guard_paths([args.checkpoint], [args.out, args.deploy, args.json, args.sensitivity_plot])
    w_bits, a_bits = parse_bits(args.bits)
    cfg = QuantConfig(method=args.method, bits=args.bits, calib=args.calib, exclude=list(args.exclude),
                      recon_iters=args.recon_iters, seed=args.seed)
    METHODS.get(cfg.method)  # an unknown method fails before any work
    if args.calib < 1:
        raise CompressError("invalid --calib", expected="at least 1 image", found=str(args.calib))
    ckpt, data = _classifier_and_data(args, "quantize")
    images = _images(data.train, args.calib)
    expected = (len(ckpt.input.mean), ckpt.input.size, ckpt.input.size)
    if tuple(images.shape[1:]) != expected:
        raise CompressError("calibration images do not fit the model", expected=f"inputs of shape {expected}",
                            found=f"{tuple(images.shape[1:])} from {data.name}")
    torch.manual_seed(args.seed)
    original = ckpt.build()
    model = copy.deepcopy(original)
    blocks = align(original, ckpt.input.size, expected[0]).blocks  # `model` is a copy: same blocks
    qm, info = calibrate(model, images, cfg, blocks)
    result = {"checkpoint": args.checkpoint, "arch": ckpt.arch, "method": cfg.method, "bits": cfg.bits,
              "w_bits": w_bits, "a_bits": a_bits, "calib": args.calib, "data": data.name,
              "fp32_top1": top1(original, data.test), "top1": top1(qm, data.test),
              "calib_seconds": round(info["calib_seconds"], 2), "sites": len(info["sites"]),
              "float_sites": info["skipped"], "bridge_blocks": info["bridges"],
              "reconstruction": info["reconstruction"], "folded_norms": info["folded_norms"]}
    sens = sensitivity(qm, images)
    result["sensitivity_db"] = {k: round(v, 2) for k, v in sens.items()}
    worst = sorted(sens.items(), key=lambda kv: kv[1])[:10]
    console.print(table(f"most sensitive sites of {ckpt.arch} ({cfg.method} {cfg.bits}; logit SQNR with only "
                        "that site quantized; low = sensitive)",
                        [{"site": k, "quantizers": info["sites"][k], "SQNR dB": round(v, 2)} for k, v in worst]))
    if args.sensitivity_plot:
        _plot_sensitivity(sens, args.sensitivity_plot, f"{ckpt.arch} {cfg.method} {cfg.bits}")
    if info["skipped"]:
        console.print(f"kept in float: {len(info['skipped'])} sites, e.g. "
                      + ", ".join(f"{k} ({v})" for k, v in list(info["skipped"].items())[:3]))
    if args.out:
        op = {"op": "quantize", "method": cfg.method, "bits": cfg.bits,
              "sites": sites_to_json(list(qm.sites.values())), "quantizers": qm.specs()}
        out = ckpt.derive(qm, command=" ".join(["compress", *args.argv]), parents=[args.checkpoint],
                          structure=[*ckpt.structure, op],
                          metrics={"fp32_top1": result["fp32_top1"], "top1": result["top1"]})
        save(out, args.out)
        _save_resolved(args, args.out)
        result["out"] = args.out
    if args.deploy:
        result.update(_deploy(original, images, qm, info, blocks, args, data))
    rows = [{"": "fp32", "top1": result["fp32_top1"]}, {"": f"{cfg.method} {cfg.bits} (simulated)",
                                                      "top1": result["top1"]}]
    if args.deploy:
        rows[0].update({"latency b1 ms": result["fp32_latency_ms"], "size bytes": result["fp32_size_bytes"]})
        rows.append({"": "int8 deployed (PT2E x86)", "top1": result["int8_top1"],
                     "latency b1 ms": result["int8_latency_ms"], "size bytes": result["int8_size_bytes"]})
    console.print(table(f"quantization of {ckpt.arch} on {data.name} (calibration {result['calib_seconds']} s)",
                        rows))
    if args.deploy:
        console.print(f"int8 variant: {result['deploy_choice']} ({len(result['float_modules'])} layers in float)")
        if result["int8_speedup"] < 1:
            console.print(f"[yellow]warning[/]: the int8 program is {1 / result['int8_speedup']:.2f}x slower than "
                          "FP32 on this backend with every variant tried; deploy the FP32 model here")
    return result


def _deploy(original, images, qm, info, blocks, args, data) -> dict:
    """Write the int8 program and measure it against FP32 on the same backend."""
    import torch

    from compress.measure import file_size, threads, top1
    from quantize.deploy import deploy, fp32_size_bytes, load_program, save_program

    with threads(args.threads or 2):  # the setting: batch 1, 2 threads, unless told otherwise
        convs = [s.module for s in qm.sites.values() if s.op == "conv" and s.groups > 1]
        bridge = {b.name for b in blocks if b.kind == "bridge"}
        in_bridges = [s.module for s in qm.sites.values() if s.op in ("conv", "linear")
                      and any(s.inside(b) for b in bridge)]
        excluded = sorted({s.module for s in qm.sites.values() if s.op in ("conv", "linear")
                           and s.name in info["skipped"]})
        groups = {"grouped convs": sorted(set(convs)), "bridge blocks": sorted(set(in_bridges))}
        dense = [s for s in qm.sites.values() if s.op in ("conv", "linear")]
        units = {b.name: sorted({s.module for s in dense if s.inside(b.name)}) for b in blocks}
        dep = deploy(original, images, groups, base_float=excluded, units=units)
        save_program(dep.program, images, args.deploy)
        program = load_program(args.deploy)
        return {"deploy": args.deploy, "deploy_choice": dep.choice, "deploy_variants": dep.variants,
                "float_modules": dep.float_modules, "fp32_latency_ms": round(dep.fp32_latency_ms, 3),
                "int8_latency_ms": round(dep.int8_latency_ms, 3),
                "int8_speedup": round(dep.fp32_latency_ms / dep.int8_latency_ms, 2),
                "fp32_size_bytes": fp32_size_bytes(original, images), "int8_size_bytes": file_size(args.deploy),
                "int8_top1": top1(program, data.test), "deploy_threads": torch.get_num_threads()}


def _plot_sensitivity(sens: dict, path: str, title: str) -> None:
    plt = _pyplot()
    names = list(sens)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.12), 3.5))
    ax.bar(range(len(names)), [sens[n] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
    ax.set_ylabel("logit SQNR (dB), only this site quantized")
    ax.set_title(title)
    _save_figure(fig, path)


def _classifier_and_data(args, command: str):
    """The checkpoint (a classifier) and the data set it is scored on; a segmentation checkpoint or a class
    count that differs from the data's is a clear error."""
    from compress import load
    from compress.data import load_data
    from compress.registry import parse_arch_args

    ckpt = load(args.checkpoint, arch=args.arch, arch_args=parse_arch_args(args.arch_args))
    if ckpt.task != "classification":
        raise CompressError(f"compress {command} evaluates classifiers", expected="a classification checkpoint",
                            found=f"task {ckpt.task}")
    data = load_data(args.data, ckpt.input, ckpt.task)
    if data.num_classes != ckpt.num_classes:
        raise CompressError(f"'{args.checkpoint}' predicts {ckpt.num_classes} classes",
                            expected=f"{data.num_classes} for {data.name}")
    return ckpt, data


def _prune_sweep(original, x, y, cfg, ratios, data, size, threads) -> list[dict]:
    import copy
    from dataclasses import replace

    from compress.measure import compare_latency, macs, param_count, top1
    from compress.prune import prune

    rows = []
    for r in ratios:
        model = prune(copy.deepcopy(original), x, y, replace(cfg, ratio=r, keep=None)).model.eval()
        base, lat = compare_latency([original, model], size, 1, rounds=1, num_threads=threads)
        rows.append({"ratio": r, "params": param_count(model), "macs": macs(model, size),
                     "speedup_b1": round(base / lat, 3), "top1": top1(model, data.test)})
    return rows


def _plot_sweep(rows: list[dict], path: str, title: str) -> None:
    fig, a = _pyplot().subplots(figsize=(5, 3.5))
    a.plot([r["ratio"] for r in rows], [r["top1"] for r in rows], "o-", label="top-1 (no recovery)")
    b = a.twinx()
    b.plot([r["ratio"] for r in rows], [r["macs"] / rows[0]["macs"] for r in rows], "s--", color="gray",
           label="MACs (relative)")
    a.set_xlabel("ratio removed"), a.set_ylabel("top-1 %"), b.set_ylabel("MACs / MACs at first ratio")
    a.set_title(title, fontsize=9)
    _save_figure(fig, path)


def _labels(dataset, n: int):
    import torch

    if hasattr(dataset, "tensors"):
        return dataset.tensors[1][:n]
    return torch.tensor([int(dataset[i][1]) for i in range(min(n, len(dataset)))])


def _images(dataset, n: int):
    import torch

    if hasattr(dataset, "tensors"):
        return dataset.tensors[0][:n]
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def _plot_maps(maps: dict, path: str, most: int = 8) -> None:
    items = sorted(maps.items(), key=lambda kv: -kv[1].numel())[:most]
    fig, axs = _pyplot().subplots(2, (len(items) + 1) // 2, figsize=(3 * ((len(items) + 1) // 2), 6), squeeze=False)
    for a, (name, t) in zip(axs.flat, items):
        a.imshow(t.numpy() * t.shape[0], cmap="viridis", vmin=0, vmax=1)
        a.set_title(name[:28], fontsize=7)
        a.set_xticks([]), a.set_yticks([])
    _save_figure(fig, path)


COMMANDS = {"quantize": cmd_quantize, "distill": cmd_distill, "prune": cmd_prune, "fuse": cmd_fuse, "demo": cmd_demo, "models": cmd_models, "train": cmd_train, "eval": cmd_eval, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = COMMANDS[args.command](args)
        from compress.report import write_json

        write_json(args.json, result)
        return 0
    except CompressError as e:
        print(f"compress: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
