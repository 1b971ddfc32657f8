"""Taps: where to read a model's intermediate representations, always returned as NCHW maps.

Stage outputs come from timm's `feature_info` and `forward_intermediates`; models without them fall back to
forward hooks on the stage modules. Layouts are normalised here and nowhere else: Swin's NHWC, ViT's NLC with
prefix tokens, EfficientFormer's flattened last stage all come out as (B, C, H, W).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CompressError
from .hooks import hooks


@dataclass(frozen=True)
class Stage:
    """One tap point: `index` into the model's feature_info, its module path, channels and stride."""

    index: int
    module: str
    channels: int
    reduction: int


def all_stages(model: nn.Module) -> list[Stage]:
    info = getattr(model, "feature_info", None)
    if not info:
        raise CompressError(f"{type(model).__name__} has no feature_info",
                            expected="a timm model or a model exposing feature_info (module, num_chs, reduction)")
    paths = feature_modules(model)
    return [Stage(i, p, int(f["num_chs"]), int(f["reduction"])) for i, (p, f) in enumerate(zip(paths, info))]


def feature_modules(model: nn.Module) -> list[str]:
    """The module path of each `feature_info` entry, resolved in the model: a path written relative to a
    wrapper (Gemma4-ViT says `blocks.0` for `encoder.blocks.0`) becomes the one module it ends with, a path
    with a part in the singular (Twins' `block.0`) the one module that has it in the plural."""
    names = [n for n, _ in model.named_modules()]
    known = set(names)
    out = []
    for f in getattr(model, "feature_info", None) or []:
        path = str(f.get("module", ""))
        if path and path not in known:
            found = [n for n in names if n.endswith("." + path)] or [n for n in names if _plural_of(n, path)]
            path = found[0] if len(found) == 1 else path
        out.append(path)
    return out


def _plural_of(name: str, path: str) -> bool:
    """`name` is `path` with some parts in the plural (Twins' feature_info says `block.0` for `blocks.0`)."""
    a, b = name.split("."), path.split(".")
    return len(a) == len(b) and all(x in (y, y + "s") for x, y in zip(a, b))


def canonical_stages(model: nn.Module, max_stages: int = 4) -> list[Stage]:
    """The deepest tap at each of the last `max_stages` strides; for isotropic models (one stride), taps at
    evenly spaced depths (quartiles for 4).

    Example:
        >>> [s.module for s in canonical_stages(timm.create_model("resnet18"))]
        ['layer1', 'layer2', 'layer3', 'layer4']
    """
    stages = all_stages(model)
    reductions = sorted({s.reduction for s in stages})
    if len(reductions) == 1:
        n, k = len(stages), min(max_stages, len(stages))  # a model shallower than max_stages: every block
        picks = sorted({max(0, round((i + 1) * n / k) - 1) for i in range(k)})
        return [stages[i] for i in picks]
    last = {s.reduction: s for s in stages}  # feature_info is ordered: the last one per stride wins
    return [last[r] for r in reductions[-max_stages:]]


def to_nchw(t: torch.Tensor, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Normalise NCHW / NHWC / NLC (with prefix tokens) to NCHW."""
    return split_prefix(t, channels, grid)[0]


def split_prefix(t: torch.Tensor, channels: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the NCHW map of `t`, its prefix tokens (B, P, C): CLS, distillation, registers; None when it has none).

    Example:
        >>> m, p = split_prefix(torch.randn(2, 1 + 16, 8), 8, (4, 4))
        >>> m.shape, p.shape
        (torch.Size([2, 8, 4, 4]), torch.Size([2, 1, 8]))
    """
    if t.ndim == 4:
        if t.shape[1] == channels:
            return t, None
        if t.shape[-1] == channels:
            return t.permute(0, 3, 1, 2).contiguous(), None
    if t.ndim == 3:
        if t.shape[-1] != channels and t.shape[1] == channels:
            t = t.transpose(1, 2)
        n = t.shape[1]
        gh, gw = grid
        if gh * gw > n or gh * gw == 0:
            side = int(math.isqrt(n))
            gh = gw = side
        p = n - gh * gw  # prefix tokens (cls, distillation, registers) come first
        return t[:, p:].transpose(1, 2).reshape(t.shape[0], channels, gh, gw), (t[:, :p] if p else None)
    raise CompressError("cannot interpret a tapped tensor as a feature map",
                        expected=f"4-D or 3-D with {channels} channels", found=f"shape {tuple(t.shape)}")


class StageMaps(list):
    """The NCHW stage maps of one forward; `prefix[i]` holds stage i's prefix tokens (B, P, C) where its output
    is a token sequence that has any, else None (OFA's token branches read the CLS token from it)."""

    def __init__(self, pairs):
        pairs = list(pairs)
        super().__init__(m for m, _ in pairs)
        self.prefix = [p for _, p in pairs]


def _grid(x: torch.Tensor, reduction: int) -> tuple[int, int]:
    return max(x.shape[-2] // reduction, 1), max(x.shape[-1] // reduction, 1)


def stage_features(model: nn.Module, x: torch.Tensor, stages: list[Stage]) -> list[torch.Tensor]:
    """Run `model` on `x` and return the NCHW output of each stage in `stages`.

    Example:
        >>> feats = stage_features(model, x, canonical_stages(model))
        >>> [f.shape[1] for f in feats] == [s.channels for s in canonical_stages(model)]
        True
    """
    raw = None
    if hasattr(model, "forward_intermediates"):
        indices = [s.index for s in stages]
        try:
            raw = model.forward_intermediates(x, indices=indices, output_fmt="NCHW", intermediates_only=True)
        except TypeError:
            try:
                raw = model.forward_intermediates(x, indices=indices, intermediates_only=True)
            except TypeError:
                raw = None
    if raw is None or len(raw) != len(stages):
        with hooked_outputs(model, [s.module for s in stages]) as outs:
            model(x)
        raw = [_first(outs[s.module], s.channels) for s in stages]
    return [to_nchw(t, s.channels, _grid(x, s.reduction)) for t, s in zip(raw, stages)]


def _first(out, channels: int | None = None):
    """A stage that returns (map, extras) (CoaT's blocks, Twins' stages): its map; where it returns one map
    per branch (CrossViT's two token scales) and `channels` is given, the one with the stage's channels."""
    if channels is not None and isinstance(out, (tuple, list)):
        match = [t for t in output_tensors(out) if t.ndim >= 3 and channels in (t.shape[1], t.shape[-1])]
        if match:
            return match[0]
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out


def output_tensors(out) -> list[torch.Tensor]:
    """A module's output as a flat list of tensors: itself, or the tensors of the (nested) tuple / list it
    returns, in order (CoaT's parallel blocks return the maps of all four scales)."""
    if torch.is_tensor(out):
        return [out]
    return [t for o in out for t in output_tensors(o)] if isinstance(out, (tuple, list)) else []


def channel_axis(t: torch.Tensor) -> int:
    """Feature axis of an activation: tokens (B, N, C) and channels-last maps (B, H, W, C) keep it last;
    NCHW maps (square H = W, the layout of every CNN here) have it at 1."""
    if t.ndim == 4 and not (t.shape[1] == t.shape[2] and t.shape[2] != t.shape[3]):
        return 1
    return -1


def logits_and_features(model: nn.Module, x: torch.Tensor, stages: list[Stage], entries: list[str] = ()):
    """One ordinary forward that also returns the NCHW stage maps (a `StageMaps`, with each stage's prefix
    tokens) and the NCHW inputs of the `entries` modules (differentiable: for distillation).

    Example:
        >>> logits, feats, _ = logits_and_features(model, x, canonical_stages(model))
    """
    inputs: dict[str, torch.Tensor] = {}
    # feature_info naming modules the classifier does not have (HRNet's `stage1` lives in its features-only
    # wrapper): the model's own forward_intermediates taps them, and its head gives the logits of the same pass
    missing = [s.module for s in stages if not _has_module(model, s.module)]
    tapped = not missing or not hasattr(model, "forward_intermediates")
    if not tapped and not hasattr(model, "forward_head"):
        raise CompressError(f"{type(model).__name__}'s feature_info names modules it does not have",
                            expected="module paths of the model, or forward_intermediates and forward_head",
                            found=", ".join(missing))
    with hooks(model, pre={called(model, e, first=True): lambda m, a, e=e: inputs.__setitem__(e, a[0])
                           for e in entries}), \
            hooked_outputs(model, [s.module for s in stages] if tapped else []) as outs:
        if tapped:
            logits = model(x)
            raw = [_first(outs[s.module], s.channels) for s in stages]
        else:
            final, raw = model.forward_intermediates(x, indices=[s.index for s in stages], intermediates_only=False)
            logits = model.forward_head(final)
    feats = StageMaps(split_prefix(t, s.channels, _grid(x, s.reduction)) for t, s in zip(raw, stages))
    # an entry's grid is its own (a token sequence is taken as square): (0, 0) lets to_nchw infer it
    # (a block reading a list, SelecSLS's [x, skip]: its first map)
    embeds = [to_nchw(t, t.shape[channel_axis(t)], (0, 0)) for t in (_first(inputs[e]) for e in entries)]
    return logits, feats, embeds


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


@contextlib.contextmanager
def hooked_outputs(model: nn.Module, names: list[str]):
    """Collect the outputs of the named submodules during forwards inside the context; hooks removed after."""
    outs: dict[str, torch.Tensor] = {}
    with hooks(model, post={called(model, n): lambda m, a, out, n=n: outs.__setitem__(n, out) for n in names}):
        yield outs


def called(model: nn.Module, name: str, first: bool = False) -> str:
    """The module that produces `name`'s output (or, `first`, reads its input): itself, or for a ModuleList /
    ModuleDict that the parent iterates (never called itself: CoaT's `serial_blocks1`), its last (first)
    member."""
    try:
        module = model.get_submodule(name) if name else model
    except AttributeError:
        raise CompressError(f"{type(model).__name__} has no module `{name}`",
                            expected="a module path of the model (HRNet's feature_info names modules of its "
                                     "features-only wrapper)", found=name) from None
    while type(module).forward in (nn.ModuleList.forward, nn.ModuleDict.forward) and len(module):
        key = list(module.named_children())[0 if first else -1][0]
        name, module = f"{name}.{key}", module[int(key)] if isinstance(module, nn.ModuleList) else module[key]
    return name


def embedding_module(model: nn.Module) -> str:
    """The patch-embedding / stem module: `patch_embed` or `stem` when present, else the first child with
    parameters. A child that holds the model's `blocks` (Gemma4-ViT's `encoder`) is the trunk, not the stem:
    the stem is looked for inside it (a dotted path)."""
    children = dict(model.named_children())
    for name in ("patch_embed", "stem", "stem0", "conv_stem"):
        if name in children:
            return name
    for name, child in children.items():
        if any(True for _ in child.parameters()):
            if isinstance(getattr(child, "blocks", None), (nn.Sequential, nn.ModuleList)):
                return f"{name}.{embedding_module(child)}"
            return name
    raise CompressError(f"{type(model).__name__} has no parameterised child", expected="a model with a stem")


def embedding_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The NCHW output of the patch embedding / stem."""
    name = embedding_module(model)
    with hooked_outputs(model, [name]) as outs:
        model(x)
    t = outs[name]
    t = t[0] if isinstance(t, (tuple, list)) else t
    channels = t.shape[-1] if t.ndim == 3 else t.shape[1]
    if t.ndim == 4 and t.shape[1] != t.shape[-1] and t.shape[-1] > t.shape[1] and t.shape[1] == t.shape[2]:
        channels = t.shape[-1]  # NHWC (Swin's patch embedding)
    n = t.shape[1] if t.ndim == 3 else 0
    side = int(math.isqrt(n)) if n else 0
    return to_nchw(t, channels, (side, side))


@contextlib.contextmanager
def attention_maps(model: nn.Module, only: list[str] | None = None, detach: bool = True):
    """Collect post-softmax attention maps (B, heads, N, N) keyed by attention module, during forwards.

    Fused attention never materialises the map, so it is switched off inside the context, for the modules
    read (`only`, or all) and no others, and restored after: a forward that needs no map stays fused.
    Modules are read through their `attn_drop` dropout, which timm applies to the softmaxed map. With
    `detach=False` the maps keep their autograd graph (a loss on a student's attention).

    Example:
        >>> with attention_maps(vit, only=["blocks.3.attn"]) as maps:
        ...     vit(x)
        >>> maps["blocks.3.attn"].shape
        torch.Size([8, 3, 65, 65])
    """
    from .tokens import readable_attention

    maps: dict[str, torch.Tensor] = {}
    readable = dict(readable_attention(model))
    names = list(readable) if only is None else list(only)
    missing = [n for n in names if n not in readable]
    if missing:
        raise CompressError("no readable attention map there", expected=f"one of {list(readable)[:6]}",
                            found=", ".join(missing))
    fused = [(name, readable[name], readable[name].fused_attn) for name in names]
    for _, mod, _ in fused:
        mod.fused_attn = False

    def keep(name):
        return lambda m, a, out: maps.__setitem__(name, out.detach() if detach else out)

    try:
        with hooks(model, post={f"{name}.attn_drop": keep(name) for name, _, _ in fused}):
            yield maps
    finally:
        for _, mod, flag in fused:
            mod.fused_attn = flag
