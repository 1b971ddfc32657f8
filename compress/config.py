"""Dataclass configs: one per command, validated on construction, mapped onto flags and recipe keys.

A config field is a flag (`finetune_epochs` is `--finetune-epochs`) and a recipe key (`finetune-epochs:`
or `finetune_epochs:`); `option()` gives it its help text and its choices (a tuple, or a `Registry` whose
names are read when the parser is built, so a newly registered method is a valid choice at once). The
command line (`cli.py`), recipes and `compress run` all build configs through `from_mapping`, so a wrong
key or type gets the same one-line error everywhere. This module imports neither torch nor timm.

Example:
    >>> cfg = from_mapping(TrainRun, {"arch": "vit", "epochs": 5}, where="recipe.yaml step 'a'")
    >>> settings(cfg)["epochs"], to_argv(cfg)[:4]
    (5, ['--arch', 'vit', '--epochs', '5'])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import CompressError
from .registry import parse_arch_args


def option(default: Any = dataclasses.MISSING, help: str = "", choices: Any = None, cli: bool = True,
           artifact: str | None = None, default_factory: Any = dataclasses.MISSING,
           checkpoint: bool | str = False) -> Any:
    """A config field with its flag's help text and choices (a tuple or a Registry).

    `cli=False` keeps a field out of the flags and recipes (library-only settings); `artifact` marks a path
    to a side output (a plot, a deployed program), which `compress run` places in the step's folder;
    `checkpoint` marks a second input checkpoint (hybrid's MIM teacher), which a recipe may name by an earlier
    step; `checkpoint="or-architecture"` a value that is a checkpoint or an architecture name (a collab peer).
    """
    meta = {"help": help, "choices": choices, "cli": cli, "artifact": artifact, "checkpoint": checkpoint}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def choices_of(f: dataclasses.Field) -> list[str] | None:
    c = f.metadata.get("choices")
    if c is None:
        return None
    return c.names() if hasattr(c, "names") else list(c)


def check_choice(value: Any, f: dataclasses.Field) -> None:
    names = choices_of(f)
    if names is not None and value is not None and value not in names:
        what = getattr(f.metadata.get("choices"), "kind", f.name.replace("_", " "))
        raise CompressError(f"unknown {what} '{value}'", expected=" | ".join(names))


def validate_choices(cfg: Any) -> None:
    """Check every field that has choices (call it from `__post_init__`)."""
    for f in dataclasses.fields(cfg):
        if f.metadata.get("choices") is not None:
            check_choice(getattr(cfg, f.name), f)


def options(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """The (field, resolved type) pairs of a config class that are flags / recipe keys."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.init]


def _base(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def value_type(tp: Any) -> tuple[Any, Any]:
    """(bool | int | float | str | dict | list, the item type of a list or None) for a field's type."""
    base, _ = _base(tp)
    if typing.get_origin(base) in (list, tuple):
        return list, (typing.get_args(base) or (str,))[0]
    return base, None


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for list / dict defaults)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """`value` (from YAML or a --set string already YAML-parsed) as type `tp`, or a one-line error."""
    base, optional = _base(tp)
    if value is None:
        if optional:
            return None
        raise CompressError(f"{where}: key '{key}' is empty", expected=_name(base))
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item, *_) = typing.get_args(base) or (Any,)
        items = value if isinstance(value, (list, tuple)) else [value] if isinstance(value, (str, int, float)) \
            else None
        if items is None:
            raise CompressError(f"{where}: key '{key}' has the wrong type", expected=f"a list of {_name(item)}",
                                found=type(value).__name__)
        return origin(coerce(v, item, key, where) for v in items)
    if base is dict:
        if isinstance(value, (str, dict)):
            return parse_arch_args(value)
        raise CompressError(f"{where}: key '{key}' has the wrong type", expected="k=v,k2=v2 or a mapping",
                            found=type(value).__name__)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)}.get(base)
    if ok is not None and not ok(value):
        raise CompressError(f"{where}: key '{key}' has the wrong type", expected=_name(base),
                            found=f"{type(value).__name__} {value!r}")
    return base(value) if base in (int, float, str) else value


def _name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def check_keys(values: dict, known: dict[str, Any], where: str) -> dict[str, Any]:
    """Recipe-style `values` (keys with dashes or underscores) against `known` (name -> type, or None for a
    key taken as it is): unknown keys and wrong types are a one-line error naming `where` and the key."""
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise CompressError(f"{where}: unknown key '{key}'",
                                expected=f"one of {', '.join(sorted(k.replace('_', '-') for k in known))}")
        out[name] = value if known[name] is None else coerce(value, known[name], str(key), where)
    return out


def from_mapping(cls: type, values: dict, where: str) -> Any:
    """A validated `cls` from recipe-style keys (dashes or underscores); unknown keys and wrong types are a
    one-line error that names `where` (the file and step) and the key."""
    kwargs = check_keys(values, {f.name: tp for f, tp in options(cls)}, where)
    try:
        return cls(**kwargs)
    except CompressError as e:
        raise CompressError(f"{where}: {e}") from None


def settings(cfg: Any) -> dict[str, Any]:
    """The config as plain values, keyed like recipes (dashes); what is saved and hashed."""
    out = {}
    for f, _ in options(type(cfg)):
        v = getattr(cfg, f.name)
        out[f.name.replace("_", "-")] = list(v) if isinstance(v, tuple) else v
    return out


def digest(*parts: Any) -> str:
    """A stable hash of JSON-able parts (settings, input file hashes)."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def to_argv(cfg: Any, changed_only: bool = True) -> list[str]:
    """The flags that reproduce `cfg` (by default only those that differ from the class defaults).

    Example:
        >>> to_argv(TrainRun(arch="vit", epochs=5, arch_args={"depth": 2}))
        ['--arch', 'vit', '--arch-args', 'depth=2', '--epochs', '5']
    """
    defaults = type(cfg)() if _all_defaulted(type(cfg)) else None
    argv: list[str] = []
    for f, tp in options(type(cfg)):
        v = getattr(cfg, f.name)
        if changed_only and defaults is not None and getattr(defaults, f.name) == v:
            continue
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base(tp)
        if base is bool:
            argv.append(flag if v else "--no-" + flag[2:])
        elif v is None:
            continue
        elif base is dict:
            if v:
                argv += [flag, ",".join(f"{k}={_arch_value(x)}" for k, x in v.items())]
        elif typing.get_origin(base) in (list, tuple):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    return argv


def _arch_value(v: Any) -> str:
    return "x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _all_defaulted(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls) if f.init)


# ---- hardware and training ---------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N
PRECISIONS = ("fp32", "bf16", "fp16")


def check_device_name(spec: str) -> None:
    """The spelling of a device (whether it exists here is checked when a run starts: compress.device)."""
    base, _, index = str(spec).partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())) or (base == "cuda" and
                                                                                       spec.endswith(":")):
        raise CompressError(f"unknown device '{spec}'", expected="auto, cpu, cuda, cuda:N or mps")


@dataclass
class Hardware:
    """Where a run computes and in which float format (every command's `--device`, `--precision`,
    `--workers`)."""

    device: str = option("auto", "where to compute: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    precision: str = option("fp32", "float format for training, finetuning and calibration: fp32, bf16 (autocast) "
                                    "or fp16 (autocast + gradient scaling; GPU only)", choices=PRECISIONS)
    workers: int = option(0, "data-loading processes")

    def check_hardware(self) -> None:
        check_device_name(self.device)
        validate_choices(self)
        if self.workers < 0:
            raise CompressError("invalid --workers", expected=">= 0", found=str(self.workers))


@dataclass(frozen=True)
class SubsetSpec:
    """Which part of a training split a run uses (parsed from `--subset`; the test split is always whole)."""

    classes: tuple[int, ...] = ()  # all images of these classes ...
    others: float = 0.0  # ... plus this fraction of the other classes' images
    shard: tuple[int, int] | None = None  # (i, k): the i-th (1-based) of k disjoint random shards
    fraction: float | None = None  # a random fraction of every class
    seed: int = 0


def parse_subset(text: str | None) -> SubsetSpec | None:
    """`classes=0-4,others=0.1` | `shard=2/4` | `fraction=0.1`, each with an optional `,seed=N`.

    Example:
        >>> parse_subset("classes=0-4+7,others=0.1,seed=1")
        SubsetSpec(classes=(0, 1, 2, 3, 4, 7), others=0.1, shard=None, fraction=None, seed=1)
    """
    if text in (None, ""):
        return None
    bad = CompressError(f"cannot parse --subset '{text}'", expected="classes=0-4[,others=0.1] | shard=I/K | "
                        "fraction=F, each with an optional ,seed=N")
    fields: dict[str, str] = {}
    for item in str(text).split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in ("classes", "others", "shard", "fraction", "seed") or key in fields:
            raise bad
        fields[key] = value.strip()
    if sum(k in fields for k in ("classes", "shard", "fraction")) != 1 or ("others" in fields) > ("classes" in fields):
        raise bad
    try:
        classes: list[int] = []
        for part in filter(None, fields.get("classes", "").split("+")):
            lo, _, hi = part.partition("-")
            classes += list(range(int(lo), int(hi or lo) + 1))
        shard = tuple(int(v) for v in fields["shard"].split("/")) if "shard" in fields else None
        spec = SubsetSpec(tuple(sorted(set(classes))), float(fields.get("others", 0.0)), shard,
                          float(fields["fraction"]) if "fraction" in fields else None, int(fields.get("seed", 0)))
    except ValueError:
        raise bad from None
    if (shard and (len(shard) != 2 or not 1 <= shard[0] <= shard[1])) or not 0 <= spec.others <= 1 or \
            (spec.fraction is not None and not 0 < spec.fraction <= 1) or ("classes" in fields and not classes):
        raise bad
    return spec


@dataclass
class DataOptions:
    """Which part of the training split a command uses (every command's `--subset`)."""

    subset: str | None = option(None, "train (calibrate, finetune) on part of the training split: classes=0-4,"
                                      "others=0.1 (all of classes 0-4 + 10%% of the rest), shard=2/4 (the 2nd of 4 "
                                      "disjoint shards) or fraction=0.1 (the last two also for segmentation data, image by image); "
                                      "add ,seed=N; the test split stays whole")

    def check_subset(self) -> None:
        parse_subset(self.subset)


@dataclass
class TrainConfig(Hardware):
    """Training hyper-parameters; the defaults reach >= 95% on digits with the small ViT and ResNet.

    Example:
        >>> TrainConfig(epochs=40, lr=2e-3)
    """

    epochs: int = option(30, "training epochs")
    batch_size: int = option(64, "batch size (per process under torchrun)")
    lr: float = option(2e-3, "peak learning rate (AdamW, one-cycle)")
    weight_decay: float = option(0.05, "AdamW weight decay")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy")
    max_shift: float = option(1 / 16, "random translation, as a fraction of the image side", cli=False)
    seed: int = option(0, "random seed")

    def __post_init__(self):
        self.check_hardware()
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise CompressError("invalid training config", expected="epochs >= 1, batch_size >= 1, lr > 0",
                                found=f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}")
        if not 0 <= self.label_smoothing < 1 or self.weight_decay < 0:
            raise CompressError("invalid training config", expected="0 <= label_smoothing < 1, weight_decay >= 0",
                                found=f"label_smoothing={self.label_smoothing}, weight_decay={self.weight_decay}")


@dataclass
class TrainRun(DataOptions, TrainConfig):
    """`compress train`: an architecture (or the input checkpoint's) trained on the data.

    Example:
        >>> ckpt, result = compress.train.run(None, "digits", TrainRun(arch="vit", epochs=40))
    """

    arch: str | None = option(None, "alias, timm model name, or package.module:function (or use an input "
                                    "checkpoint)")
    arch_args: dict = option({}, "architecture kwargs, e.g. img_size=32,embed_dim=96,depth=4")
    pretrained: bool = option(False, "start from timm's published weights for --arch (a timm name; from the hub)")
    pretrained_file: str | None = option(None, "start from timm's weights for --arch read from this local file "
                                               "(.safetensors / .pth: what users behind a firewall do)")
    head_only: bool = option(False, "train only the classifier (the rest frozen, BatchNorm statistics included): "
                                    "a linear probe of pretrained features; for segmentation, the head on the "
                                    "frozen backbone")
    objective: str = option("supervised", "supervised: cross-entropy on the labels; mim: masked-image-modelling "
                                          "pretraining (MAE: random patches removed, pixels of the masked ones "
                                          "reconstructed by a light decoder; the classifier, or a segmentation "
                                          "network's head, stays untrained)",
                            choices=("supervised", "mim"))
    mask_ratio: float = option(0.75, "mim: share of patches masked (MAE's 0.75)")
    decoder_dim: int = option(64, "mim: width of the light decoder")
    decoder_depth: int = option(2, "mim: transformer blocks of the light decoder")

    def __post_init__(self):
        super().__post_init__()
        self.check_subset()
        self.arch_args = parse_arch_args(self.arch_args)
        validate_choices(self)
        if not 0 < self.mask_ratio < 1 or self.decoder_dim < 1 or self.decoder_depth < 0:
            raise CompressError("invalid MIM settings", expected="0 < mask_ratio < 1, decoder_dim >= 1, "
                                "decoder_depth >= 0", found=f"mask_ratio={self.mask_ratio}, decoder_dim="
                                f"{self.decoder_dim}, decoder_depth={self.decoder_depth}")
        if self.objective == "mim" and self.head_only:
            raise CompressError("--head-only trains a classifier; --objective mim trains none",
                                expected="one of them")
