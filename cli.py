"""The `compress` command line: argument parsing, recipe loading and dispatch; the work is the library's.

Each pipeline subcommand (train, eval, fuse, distill, prune, quantize: the registered step kinds) gets its
flags from its config dataclass, so a flag, a recipe key and a `compress run` step key are one thing,
validated in one place. `--help` answers without importing torch: configs and registries are torch-free,
the heavy modules are imported inside the command that needs them.

Every subcommand takes `--json PATH`, `--recipe FILE` (YAML of flag values; command-line flags override it;
an unknown key or a wrong type is an error) and `--threads N`. Outputs are written atomically, never over an
input, with their resolved settings beside them (`<out>.yaml`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress.errors import CompressError

HERE = Path(__file__).resolve().parent


# ---- argument parsing with recipes ------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    p.add_argument("--recipe", metavar="FILE", help="YAML file of flag values; command-line flags override it")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture for a bare state_dict (alias, timm name or module:function)")
    p.add_argument("--arch-args", default=None, help="architecture kwargs, e.g. img_size=32,embed_dim=96,depth=4")


def add_config_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field: its type, default, help and choices (a registry's names at parse time)."""
    from compress.config import choices_of, default_of, options, value_type
    from compress.registry import parse_arch_args

    for f, tp in options(cls):
        flag = "--" + f.name.replace("_", "-")
        base, item = value_type(tp)
        default = default_of(f)
        shown = f" (default {default})" if default not in (None, [], {}) and base is not bool else ""
        kw = {"default": default, "help": (f.metadata.get("help") or "") + shown}
        choices = choices_of(f)
        if choices is not None:
            kw["choices"] = choices
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif base is dict:
            p.add_argument(flag, type=parse_arch_args, **kw)
        elif base is list:
            p.add_argument(flag, nargs="*", type=item, **kw)
        else:
            p.add_argument(flag, type=base, **kw)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line `CompressError`s (exit status 2), like every other bad input."""

    def error(self, message: str):
        raise CompressError(f"{self.prog}: {message}", hint=f"{self.prog} --help")


def build_parser() -> argparse.ArgumentParser:
    from compress.steps import STEPS

    parser = _Parser(prog="compress", description="Fuse, distill, prune and quantize vision models.")
    parser.add_argument("--version", action="version", version=f"compress {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a recipe: a chain of steps (train, fuse, distill, prune, quantize, eval), "
                                   "resumable, ending in a report")
    p.add_argument("recipe_file", metavar="RECIPE", help="YAML with `steps:` (see recipes/chain-*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="STEP.KEY=VALUE", help="override a step's key")
    p.add_argument("--out-dir", help="where the steps and the report go (default runs/<recipe name>)")
    _common(p)

    p = sub.add_parser("demo", help="the main job on the embedded digits: two ViTs trained, fused, distilled into "
                                    "a MobileViT, pruned, quantized to int8, with a report (compress run)")
    p.add_argument("--out-dir", default="demo-output", help="where the demo's steps and report go")
    p.add_argument("--set", action="append", default=[], metavar="STEP.KEY=VALUE", help="override a step's key")
    _common(p)

    p = sub.add_parser("models", help="list registered architectures with parameter counts")
    p.add_argument("--num-classes", type=int, default=10)
    _common(p)

    p = sub.add_parser("inspect", help="print a checkpoint's (or an architecture's) description, its alignment and "
                                       "what the alignment layer could not understand")
    p.add_argument("checkpoint", help="a checkpoint file, or an architecture name (alias or timm name: its random "
                                      "init at its default size)")
    _model_args(p)
    _common(p)

    for kind in STEPS.names():
        step = STEPS.get(kind)
        p = sub.add_parser(kind, help=step.help)
        if step.inputs == "many":
            p.add_argument(step.input_flag, nargs="+", default=None, dest="inputs", metavar="CHECKPOINT",
                           help="checkpoints (the last is the anchor unless --anchor says otherwise)")
        elif step.input_flag:
            p.add_argument(step.input_flag, dest="inputs", metavar="CHECKPOINT",
                           help="input checkpoint" + (" (or an architecture name with --train-teacher)"
                                                      if kind == "distill" else ""))
        else:
            p.add_argument("inputs", metavar="checkpoint")
        p.add_argument("--data", default="digits", help="digits, digit-scenes, or a folder (see the README)")
        if step.writes:
            p.add_argument("--out", help="output checkpoint (.pt or .safetensors)")
            p.add_argument("--report", metavar="PATH", help="also write a report (.html, .md or .json)")
        if kind in ("train", "fuse", "distill", "prune"):
            p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
        if step.input_flag == "":
            _model_args(p)
        add_config_arguments(p, step.config)
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
    if not args.recipe:
        return args
    import yaml

    from compress.config import check_keys, options

    path = Path(args.recipe)
    if not path.is_file():
        raise CompressError(f"recipe '{path}' not found", expected="an existing YAML file")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise CompressError(f"recipe '{path}' is not a mapping", expected="key: value lines",
                            found=type(recipe).__name__)
    subparser = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[args.command]
    known = {a.dest: None for a in subparser._actions if a.dest not in ("help", "recipe")}  # flags outside configs
    if args.command in _steps():
        known |= {f.name: tp for f, tp in options(_steps()[args.command].config)}
    subparser.set_defaults(**check_keys(recipe, known, str(path)))
    return parser.parse_args(argv)


def _steps() -> dict:
    from compress.steps import STEPS

    return {k: STEPS.get(k) for k in STEPS.names()}


def guard_paths(inputs: list, outputs: list) -> None:
    """Refuse to write over an input: nothing the user gave us is ever overwritten."""
    ins = {Path(p).resolve() for p in inputs if p}
    for out in filter(None, outputs):
        if Path(out).resolve() in ins:
            raise CompressError(f"output path '{out}' is also an input", expected="a different output path",
                                hint="inputs are never overwritten")


# ---- commands ---------------------------------------------------------------------------------------

def cmd_step(args) -> dict:
    """Any registered step kind: build its config from the flags, run it, save, show, report."""
    import dataclasses

    from compress import load, save
    from compress.config import options, settings
    from compress.programs import is_program
    from compress.registry import parse_arch_args
    from compress.report import console, rows_table, table
    from compress.train import rank

    step = _steps()[args.command]
    cfg = step.config(**{f.name: getattr(args, f.name) for f, _ in options(step.config)})
    inputs = args.inputs if isinstance(args.inputs, list) else [args.inputs] if args.inputs else []
    out = getattr(args, "out", None)
    # a prune sweep or a deployed program is an output of its own
    own_output = getattr(cfg, "sweep", None) is not None or getattr(cfg, "deploy", None) not in (None, "auto")
    if step.writes and not out and not own_output:
        raise CompressError(f"{args.command} needs --out", expected="an output path ending in .pt or .safetensors"
                            + (" (or --deploy PATH)" if args.command == "quantize" else ""))
    if step.inputs == "many" and len(inputs) < 2:
        raise CompressError(f"{args.command} needs {step.input_flag} with two or more checkpoints",
                            found=str(len(inputs)))
    if step.inputs == "one" and not inputs and getattr(cfg, "takes_input", lambda: True)():
        raise CompressError(f"{args.command} needs an input checkpoint", expected=step.input_flag or "a path")
    if getattr(cfg, "deploy", None) == "auto":  # the program goes beside --out: <out>.int8.pt2 or .onnx
        if not out:
            raise CompressError("--deploy auto writes beside --out", expected="--out PATH")
        cfg.deploy = str(Path(out).with_suffix("")) + ".int8"
    data_path = args.data.partition(":")[2] if ":" in args.data else args.data
    artifacts = [getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("artifact")]
    guard_paths([*inputs, data_path, getattr(cfg, "student", None)],
                [out, args.json, getattr(args, "report", None), *artifacts])
    # files are read here (a bare state_dict with --arch); anything else goes to the pipeline as given (distill
    # trains a teacher named by its architecture, and says what it expected)
    arch = {"arch": args.arch, "arch_args": parse_arch_args(args.arch_args)} if step.input_flag == "" else {}
    loaded = [load(p, **arch) if Path(p).is_file() and not is_program(p) else p for p in inputs]
    ckpt, result = step(loaded, args.data, cfg, state=out, resume=getattr(args, "resume", False))
    values = result.to_dict()
    if rank() != 0:  # under torchrun, rank 0 writes
        return values
    if step.writes and out:
        save(ckpt, out)
        _save_resolved(out, ckpt.provenance.get("command", ""), args.data, inputs, cfg)
        values["out"] = out
    for title, rows in result.tables.items():
        if rows:
            console.print(table(title, rows))
    console.print(rows_table(f"{args.command}: {result.metric} on {args.data} (test split; latency side by side)",
                             result.rows))
    for note in result.notes:
        console.print(f"[yellow]note[/]: {note}")
    if getattr(args, "report", None):
        from compress.summary import StepRecord, from_result, write_report

        record = StepRecord(args.command, args.command, inputs, settings(cfg), ckpt.provenance.get("command", ""),
                            result.seconds, output=out, notes=list(result.notes), tables=result.tables)
        write_report(from_result(f"compress {args.command}", result, record), args.report)
    if out:
        console.print(f"-> {out}")
    return values


def _save_resolved(out: str, command: str, data: str, inputs: list, cfg) -> None:
    """The resolved settings next to an output, so a run can be repeated exactly."""
    import yaml

    from compress.checkpoint import atomic_write
    from compress.config import settings

    text = yaml.safe_dump({"command": command, "inputs": [str(i) for i in inputs], "data": data, **settings(cfg)},
                          sort_keys=False)
    atomic_write(Path(f"{out}.yaml"), lambda tmp: Path(tmp).write_text(text))


def cmd_run(args) -> dict:
    from compress.chain import run_recipe

    return run_recipe(args.recipe_file, args.out_dir, args.set).to_dict()


def cmd_demo(args) -> dict:
    from compress.chain import run_recipe

    recipe = HERE / "recipes" / "demo.yaml"
    if not recipe.is_file():
        raise CompressError("the demo recipe is missing", expected=str(recipe),
                            hint="run compress demo from a clone of the repository (pip install -e .)")
    return run_recipe(recipe, args.out_dir, args.set).to_dict()


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


def cmd_inspect(args) -> dict:
    from compress import align, load
    from compress.checkpoint import Checkpoint
    from compress.measure import param_count
    from compress.registry import parse_arch_args
    from compress.report import console, table

    if not Path(args.checkpoint).exists() and not Path(args.checkpoint).suffix:  # an architecture, not a file
        ckpt = Checkpoint.create(args.checkpoint, arch_args=parse_arch_args(args.arch_args), seed=0)
    else:
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
                  f"metrics { {k: v for k, v in (prov.get('metrics') or {}).items() if k in ('top1', 'miou')} }")
    stages = [{"stage": s.module, "channels": s.channels, "stride": s.reduction} for s in al.stages]
    console.print(table("canonical stages (taps)", stages))
    spaces = [{"space": s.name, "units": s.size, "tensors": len(s.tensors), "residual": s.residual}
              for s in al.spaces.spaces]
    console.print(table(f"spaces ({len(spaces)}; coverage {al.spaces.coverage(net.state_dict()):.1%} of parameters)",
                        spaces))
    blocks = [{"block": b.name, "kind": b.kind, "branches": ", ".join(f"{x.kind}: {x.module}" for x in b.branches)}
              for b in al.blocks]
    console.print(table("blocks", blocks))
    gaps = al.gaps()
    console.print("[bold]not understood[/] (left as they are by fusion and width pruning, unseen by depth pruning):")
    console.print(f"  ops without a rule: {', '.join(gaps['unknown_ops']) or 'none'}")
    console.print(f"  spaces dropped by the invariance check: {', '.join(gaps['rejected_spaces']) or 'none'}")
    pinned = gaps["pinned_tensors"]
    console.print(f"  tensors with no free axis: {len(pinned)} ({gaps['pinned_share']:.1%} of parameters)"
                  + (f", e.g. {', '.join(pinned[:4])}" if pinned else ""))
    console.print(f"  stages where no block was found: {', '.join(gaps['stages_without_blocks']) or 'none'}")
    return {"gaps": gaps, "arch": ckpt.arch, "arch_args": ckpt.arch_args, "task": ckpt.task, "num_classes": ckpt.num_classes,
            "params": param_count(model), "input": vars(ckpt.input), "provenance": prov, "stages": stages,
            "spaces": spaces, "blocks": blocks, "unknown_ops": al.spaces.unknown_ops}


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "models": cmd_models, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = COMMANDS.get(args.command, cmd_step)(args)
        from compress.report import write_json
        from compress.train import rank

        if rank() == 0:
            write_json(args.json, result)
        return 0
    except CompressError as e:
        print(f"compress: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
