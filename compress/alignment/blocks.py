"""Blocks: the ordered residual units of a model, each with a kind read off its traced ops.

A block is a child of the innermost sequential containers (timm's `blocks`, `stages.i.blocks`, `layerN`).
Its kind comes from the aten ops it runs, not from its class name:

- `attention`: it computes a softmax over activations (or a fused attention op);
- `conv`: it runs convolutions and no attention;
- `mlp`: only matmuls (MLP-Mixer, ResMLP);
- `bridge`: it switches between conv maps and tokens: a block that runs both convolutions and attention
  (MobileViT, EfficientFormerV2), or a block next to a change of rank between 4-D maps and 3-D tokens
  (EfficientFormer's Flat before its attention stage). Q-HyViT calibrates these sequentially.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .graph import trace
from .taps import embedding_module

_ATTN_OPS = {"_softmax", "softmax", "_scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"}


@dataclass(frozen=True)
class Block:
    """One residual unit: its module path, position, kind, and input/output ranks (4 = maps, 3 = tokens)."""

    index: int
    name: str
    kind: str
    in_rank: int
    out_rank: int


def block_modules(model: nn.Module) -> list[str]:
    """Module paths of the blocks, in registration order.

    Containers (Sequential / ModuleList of composite modules) hold blocks; a child that is itself such a
    container, or a stage exposing a `blocks` container (timm's convention), is descended into. The stem
    is not a block. A block's own internals (MobileViT's inner transformer) are never descended into.
    """
    stem = embedding_module(model)
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
            if not path and name == stem:
                continue
            if _is_container(child):
                expand(p, child)
            elif _is_container(getattr(child, "blocks", None)):
                visit(p, child)

    visit("", model)
    return out


def _is_container(m) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList)) and _holds_blocks(m)


def _holds_blocks(container: nn.Module) -> bool:
    # A container of blocks holds composite children (several leaf modules each), not a conv + norm stem.
    return any(sum(1 for m in child.modules() if not list(m.children())) > 1 for child in container.children())


def find_blocks(model: nn.Module, example: torch.Tensor) -> list[Block]:
    """The model's blocks with their kinds.

    Example:
        >>> [b.kind for b in find_blocks(create_model("mobilevit"), torch.randn(1, 3, 32, 32))][-3:]
        ['conv', 'bridge', 'bridge']
    """
    names = block_modules(model)
    modules = dict(model.named_modules())
    inputs: dict[str, tuple] = {}
    outputs: dict[str, torch.Tensor] = {}

    def recorder(name):
        def hook(module, args, output):
            inputs[name], outputs[name] = args, output

        return hook

    handles = [modules[n].register_forward_hook(recorder(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    ran = [n for n in names if n in inputs and isinstance(outputs[n], torch.Tensor)]
    raw = []
    for n in ran:
        ops = _ops(modules[n], inputs[n])
        has_conv = "convolution" in ops
        has_attn = bool(ops & _ATTN_OPS)
        has_mm = bool(ops & {"mm", "addmm", "bmm"})
        if not any(True for _ in modules[n].parameters()):
            kind = "reshape"
        elif has_conv and has_attn:
            kind = "bridge"
        elif has_attn:
            kind = "attention"
        elif has_conv:
            kind = "conv"
        else:
            kind = "mlp" if has_mm else "conv"
        raw.append([n, kind, inputs[n][0].ndim, outputs[n].ndim])
    for i in range(len(raw) - 1):  # a change of rank between consecutive blocks marks both as bridges
        if raw[i][3] != raw[i + 1][2] or raw[i][2] != raw[i][3]:
            for j in (i, i + 1):
                if raw[j][1] != "reshape":
                    raw[j][1] = "bridge"
    # parameter-free reshapes (EfficientFormer's Flat) are not blocks themselves
    kept = [r for r in raw if r[1] != "reshape"]
    for i in range(len(raw)):
        if raw[i][1] == "reshape":
            for j in (i - 1, i + 1):
                if 0 <= j < len(raw) and raw[j][1] != "reshape":
                    raw[j][1] = "bridge"
    return [Block(i, n, k, a, b) for i, (n, k, a, b) in enumerate(kept)]


def _ops(module: nn.Module, args: tuple) -> set[str]:
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    g = trace(module, *tensors)
    return {getattr(n.target, "__name__", str(n.target)).split(".")[0] for n in g.graph.nodes
            if n.op == "call_function"}
