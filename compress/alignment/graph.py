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

    try:
        with torch.no_grad():
            gm = make_fx(call, tracing_mode="fake")(state, *example_inputs)
    finally:
        model.train(was_training)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = list(state)
    flat, _ = tree_flatten((state, *example_inputs))
    if len(flat) != len(placeholders):
        raise RuntimeError(f"trace produced {len(placeholders)} placeholders for {len(flat)} inputs")
    tensors = {n: names[i] for i, n in enumerate(placeholders[: len(names)])}
    return TracedGraph(gm, placeholders[len(names):], tensors)
