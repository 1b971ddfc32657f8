"""Blocks: the ordered residual units of a model, each with a kind and its residual branches, read off one
real forward.

A block is a child of the innermost sequential containers (timm's `blocks`, `stages.i.blocks`, `layerN`).
Its kind comes from the functions it calls, seen by a `TorchFunctionMode` during one ordinary forward
(with whatever arguments the model really passes its blocks), not from its class name:

- `attention`: it computes a softmax over activations (or a fused attention op);
- `conv`: it runs convolutions and no attention;
- `mlp`: only matmuls (MLP-Mixer, ResMLP);
- `bridge`: it switches between conv maps and tokens: a block that runs both convolutions and attention
  (MobileViT, EfficientFormerV2), or a block next to a change of rank between 4-D maps and 3-D tokens
  (EfficientFormer's Flat before its attention stage). Q-HyViT calibrates these sequentially.

A block's *branches* are its residual branches in call order, each a child module that computes (attention,
matmuls or convolutions) right after a parameterised child that computes nothing of the kind (its pre-norm:
a LayerNorm, an Affine, a BatchNorm): a transformer block's attention and MLP, a Mixer block's token and
channel MLPs. Depth pruning removes a branch by zeroing it and skipping its norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .hooks import evaluating, hooks
from .taps import embedding_module, feature_modules

_ATTN = {"softmax", "_softmax", "_safe_softmax", "scaled_dot_product_attention"}
_MM = {"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "einsum"}
_CONV = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


@dataclass(frozen=True)
class Branch:
    """One residual branch of a block: its kind (`attn` or `mlp`), its module and its pre-norm (or None)."""

    kind: str
    module: str
    norm: str | None


@dataclass(frozen=True)
class Block:
    """One residual unit: its module path, position, kind, input/output ranks (4 = maps, 3 = tokens),
    residual branches, and its output's shape past the batch at the traced input size (its resolution
    places it in a stage where a model names no stage module)."""

    index: int
    name: str
    kind: str
    in_rank: int
    out_rank: int
    branches: tuple[Branch, ...] = field(default=())
    out_shape: tuple[int, ...] = ()

    def branch(self, kind: str) -> Branch | None:
        """The attention branch (`attn`: the first that attends) or the MLP branch (`mlp`: the last branch,
        when it does not attend), or None."""
        if kind == "attn":
            return next((b for b in self.branches if b.kind == "attn"), None)
        last = self.branches[-1] if self.branches else None
        return last if last is not None and last.kind == "mlp" else None


def block_modules(model: nn.Module) -> list[str]:
    """Module paths of the blocks, in registration order.

    Containers (Sequential / ModuleList of composite modules) hold blocks; a child that is itself such a
    container, or a stage exposing a `blocks` container (timm's convention), is descended into. The stem
    is not a block. A block's own internals (MobileViT's inner transformer) are never descended into.
    """
    stem = embedding_module(model)
    head = _head(model, stem)
    out: list[str] = []

    def expand(path: str, container: nn.Module) -> None:
        for name, child in container.named_children():
            p = f"{path}.{name}"
            if _is_container(child) or _is_container(getattr(child, "blocks", None)):
                visit(p, child)
            else:
                out.append(p)

    def visit(path: str, module: nn.Module) -> None:
        if _is_container(module):
            return expand(path, module)
        for name, child in module.named_children():
            p = f"{path}.{name}" if path else name
            if not path and name in (stem, head):
                continue
            if _is_container(child):
                expand(p, child)
            elif _is_container(getattr(child, "blocks", None)):
                visit(p, child)

    visit("", model)
    # Stages (feature_info taps) that hold their blocks as plain attributes (RegNet's `s1.b1`, `s1.b2`) or sit
    # inside what looked like the stem (DenseNet's `features.denseblock1`): their composite children are blocks.
    modules = dict(model.named_modules(remove_duplicate=False))
    taps = [t for t in feature_modules(model) if t]  # (TResNet's first tap is the model itself: '')
    for tap in list(taps):  # a stage's siblings of its class are stages too (DenseNet's last dense block)
        parent, _, _ = tap.rpartition(".")
        if tap in modules and tap != stem:
            siblings = modules[parent].named_children() if parent in modules else model.named_children()
            taps += [f"{parent}.{n}" if parent else n for n, c in siblings if type(c) is type(modules[tap])]
    for tap in dict.fromkeys(taps):
        stage = modules.get(tap)
        if stage is None or tap in (stem, head) or _is_leafy(stage) or any(b == tap or b.startswith(tap + ".") or tap.startswith(b + ".")
                                                    for b in out):
            continue
        out += [f"{tap}.{n}" for n, c in stage.named_children() if not _is_leafy(c)]
    if not out:  # a flat model (NASNet's cells are attributes of the model itself): its composite children
        out = [n for n, c in model.named_children() if n not in (stem, head) and not _is_leafy(c)]
    order = {name: i for i, name in enumerate(modules)}
    return sorted(set(out), key=order.__getitem__)


def _is_leafy(m: nn.Module) -> bool:
    """At most one module inside holds parameters (a conv, a norm with its activation): not a block."""
    return sum(1 for x in m.modules() if any(True for _ in x.parameters(recurse=False))) <= 1


def _head(model: nn.Module, stem: str) -> str | None:
    """The top-level child holding the classifier (a MetaFormer's `head` Sequential): not blocks."""
    get = getattr(model, "get_classifier", None)
    try:
        found = get() if callable(get) else None
    except Exception:  # noqa: BLE001 (a model whose get_classifier needs arguments has no head to exclude here)
        return None
    heads = [m for m in (found if isinstance(found, (tuple, list)) else [found]) if isinstance(m, nn.Module)]
    for name, module in model.named_modules():
        if name and any(module is h for h in heads) and not isinstance(module, nn.Identity):
            top = name.split(".")[0]
            taps = feature_modules(model)
            holds_stage = any(t == top or t.startswith(top + ".") for t in taps)
            return top if top != stem and not holds_stage else None
    return None


def _is_container(m) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and _holds_blocks(m)


def _holds_blocks(container: nn.Module) -> bool:
    # A container of blocks holds composite children (several leaf modules each), not a conv + norm stem.
    return any(sum(1 for m in child.modules() if not list(m.children())) > 1 for child in container.children())


def _mixes_tokens(name: str, args: tuple) -> bool:
    """A product of two activations (batched operands, neither a parameter): attention without a softmax
    (linear attention: EfficientViT's ReLU attention, XCiT's cross-covariance after its normalisation)."""
    if name not in ("matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm"):
        return False
    ops = [a for a in args[:3] if isinstance(a, torch.Tensor)][-2:]
    return len(ops) == 2 and all(t.ndim >= 3 and not isinstance(t, nn.Parameter) for t in ops)


class _Calls(TorchFunctionMode):
    """Records which kinds of function (conv / mm / attn) run while each watched module is active."""

    def __init__(self):
        super().__init__()
        self.active: list[str] = []
        self.seen: dict[str, set[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kind = "attn" if name in _ATTN else "mm" if name in _MM else "conv" if name in _CONV else None
        if kind == "mm" and _mixes_tokens(name, args):
            kind = "attn"
        if kind:
            for path in self.active:
                self.seen[path].add(kind)
        return func(*args, **(kwargs or {}))


def find_blocks(model: nn.Module, example: torch.Tensor) -> list[Block]:
    """The model's blocks with their kinds and branches, from one forward on `example`.

    Example:
        >>> [b.kind for b in find_blocks(create_model("mobilevit"), torch.randn(1, 3, 32, 32))][-3:]
        ['conv', 'bridge', 'bridge']
    """
    names = block_modules(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    children = {n: [f"{n}.{c}" for c, _ in modules[n].named_children()] for n in names}
    ranks: dict[str, tuple[int, int]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    order: dict[str, list[str]] = {n: [] for n in names}  # children of each block in call order
    inputs, outputs = {}, {}  # first input / output tensor of each watched module (kept alive: compared by identity)
    calls = _Calls()

    def enter(path, block=None):
        def fn(module, args):
            calls.active.append(path)
            calls.seen.setdefault(path, set())
            inputs.setdefault(path, args[0] if args else None)
            if block is not None and path not in order[block]:
                order[block].append(path)
        return fn

    def leave(path):
        def fn(module, args, output):
            calls.active.remove(path)
            outputs.setdefault(path, output)
            first = args[0] if args else None
            if isinstance(first, (list, tuple)) and first and isinstance(first[0], torch.Tensor):
                first = first[0]  # a dense layer reads the list of the features before it
            if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
                output = output[0]  # a block that also returns a state (EfficientViM's (x, h))
            if path in order and isinstance(first, torch.Tensor) and isinstance(output, torch.Tensor):
                ranks[path] = (first.ndim, output.ndim)
                shapes[path] = tuple(output.shape[1:])
        return fn

    pre = {n: enter(n) for n in names}
    post = {n: leave(n) for n in names}
    for n in names:
        for c in children[n]:
            pre[c], post[c] = enter(c, n), leave(c)
    with hooks(model, pre=pre, post=post), evaluating(model), torch.no_grad(), calls:
        model(example)
    raw = []
    for n in names:
        if n not in ranks:  # did not run, or does not map a tensor to a tensor
            continue
        ops = calls.seen.get(n, set())
        if not any(True for _ in modules[n].parameters()):
            kind = "reshape"
        elif "conv" in ops and "attn" in ops:
            kind = "bridge"
        elif "attn" in ops:
            kind = "attention"
        elif "conv" in ops:
            kind = "conv"
        else:
            kind = "mlp" if "mm" in ops else "conv"
        raw.append([n, kind, *ranks[n], _branches(n, order[n], calls.seen, modules, inputs, outputs)])
    for i in range(len(raw) - 1):  # a change of rank between consecutive blocks marks both as bridges
        if raw[i][3] != raw[i + 1][2] or raw[i][2] != raw[i][3]:
            for j in (i, i + 1):
                if raw[j][1] != "reshape":
                    raw[j][1] = "bridge"
    # parameter-free reshapes (EfficientFormer's Flat) are not blocks themselves
    for i in range(len(raw)):
        if raw[i][1] == "reshape":
            for j in (i - 1, i + 1):
                if 0 <= j < len(raw) and raw[j][1] != "reshape":
                    raw[j][1] = "bridge"
    kept = [r for r in raw if r[1] != "reshape"]
    return [Block(i, n, k, a, b, br, shapes[n]) for i, (n, k, a, b, br) in enumerate(kept)]


def _branches(block: str, order: list[str], seen: dict[str, set[str]], modules: dict[str, nn.Module],
              inputs: dict, outputs: dict) -> tuple[Branch, ...]:
    """Residual branches among a block's children (in call order): a computing child right after a
    parameterised child that computes nothing (its pre-norm) and that reads the residual stream: the
    block's input, or a tensor no child produced (a residual sum), never a sub-layer's output (ConvNeXt's
    norm between its depthwise conv and MLP is not a branch's)."""
    out = []
    produced = [outputs.get(p) for p in order]
    for prev, cur in zip(order, order[1:]):
        stream = inputs.get(prev)
        if (seen.get(cur) and any(True for _ in modules[cur].parameters()) and not seen.get(prev)
                and any(True for _ in modules[prev].parameters()) and isinstance(stream, torch.Tensor)
                and (stream is inputs.get(block) or not any(stream is t for t in produced))):
            out.append(Branch("attn" if "attn" in seen[cur] else "mlp", cur, prev))
    return tuple(out)
