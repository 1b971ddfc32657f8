"""Trace a model to an aten-level graph whose placeholders are named after its state_dict entries.

`make_fx` traces with concrete shapes, so timm's shape-dependent Python (MobileViT's patch unfolding, Swin's
padding) traces like any other code; the result is a small, closed set of aten ops that `spaces.py` knows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten

from .hooks import drop_eval_caches


@dataclass
class TracedGraph:
    module: fx.GraphModule  # runnable: call with (state dict, *inputs) at the traced batch size
    inputs: list[fx.Node]  # the model's tensor inputs
    tensors: dict[fx.Node, str]  # placeholder -> state_dict key (parameters and buffers)

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by state_dict key (persistent or not: all of them shape the function)."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def non_persistent(model: nn.Module) -> set[str]:
    """Buffers a state dict does not carry (the model computes them): a permutation cannot reach them."""
    return {f"{name}.{b}" if name else b for name, m in model.named_modules(remove_duplicate=False)
            for b in m._non_persistent_buffers_set}


def leading(inputs: tuple, n: int) -> tuple:
    """The first `n` samples of each batched input (a forward that needs the shapes, not the whole batch).

    Example:
        >>> [t.shape[0] for t in leading((torch.randn(32, 3, 8, 8),), 4)]
        [4]
    """
    return tuple(t[:n] if isinstance(t, torch.Tensor) and t.ndim else t for t in inputs)


def trace(model: nn.Module, *example_inputs: torch.Tensor) -> TracedGraph:
    """Trace `model` in eval mode on `example_inputs`.

    Example:
        >>> g = trace(timm.create_model("resnet18"), torch.randn(1, 3, 32, 32))
        >>> sorted(g.tensors.values())[:2]
        ['bn1.bias', 'bn1.num_batches_tracked']
    """
    was_training = model.training
    model.eval()
    state = state_tensors(model)

    def call(state, *xs):
        return torch.func.functional_call(model, state, xs, tie_weights=False, strict=False)

    # functional_call swaps fake tensors in and back out per name; a tensor registered under two names (a shared
    # parameter) is restored once and the second swap leaves a fake behind. Put every original back ourselves:
    # tracing must never change the model it reads.
    try:
        with torch.no_grad():
            # one real forward first: a model that builds a cache on its first call (ConViT's relative indices,
            # EfficientFormer's attention-bias gather) traces its steady-state graph, the same for any two copies.
            # Those caches depend on the image size, not the batch: two images build them (two, not one: a
            # squeeze somewhere would take a batch of one for another shape)
            model(*leading(example_inputs, 2))
            drop_eval_caches(model)  # a cache held outside buffers (EfficientFormer's bias gather) is rebuilt in the trace
            state = state_tensors(model)
            held = [(slots, k, t) for m in model.modules() for slots in (m._parameters, m._buffers)
                    for k, t in slots.items()]
            gm = make_fx(call, tracing_mode="fake")(state, *example_inputs)
    finally:
        for slots, k, t in locals().get("held", []):
            if slots.get(k) is not t:
                slots[k] = t
        drop_eval_caches(model)  # and one built from fake tensors during the trace is not left behind
        model.train(was_training)
    for node in gm.graph.nodes:  # a view traced on fake strides can fail on real ones (a conv's memory format)
        if node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    gm.recompile()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = list(state)
    flat, _ = tree_flatten((state, *example_inputs))
    if len(flat) != len(placeholders):
        raise RuntimeError(f"trace produced {len(placeholders)} placeholders for {len(flat)} inputs")
    tensors = {n: names[i] for i, n in enumerate(placeholders[: len(names)])}
    return TracedGraph(gm, placeholders[len(names):], tensors)
