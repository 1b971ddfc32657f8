"""Exported programs (torch.export archives, `.pt2`): written by deployment, read and timed like any model.

A `.pt2` holds a graph and tensors, no pickled code. `Program` lets evaluation code treat one like a module;
`compile_frozen` is how such programs run fast on CPU (Inductor with weight freezing).

Example:
    >>> program = compile_frozen(load_program("model.int8.pt2"))
    >>> top1(program, data.test)
"""

from __future__ import annotations

import os

import torch
from torch import nn


def exported(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch when the model allows it (batch 1 otherwise: `Program` then runs
    larger batches image by image). The examples are cloned: an archive keeps them, and a slice would drag
    its whole storage (the data set) into the file."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        return torch.export.export(model, (example[:2].clone(),), dynamic_shapes=({0: batch},))
    except Exception:  # some models specialise the batch
        return torch.export.export(model, (example[:1].clone(),))


def compile_frozen(model: nn.Module):
    """Inductor with weight freezing: constant-folds the int8 weights into oneDNN kernels."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model)


class Program(nn.Module):
    """An exported program as a module that evaluation code can treat like any model (exported graphs refuse
    `.eval()`; they have no training mode to switch)."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph
        self.per_sample: bool | None = None  # learnt on the first batch: some exports specialise batch 1

    def train(self, mode: bool = True):
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_sample is None and x.shape[0] > 1:
            try:
                out = self.graph(x)
                self.per_sample = False
                return out
            except (AssertionError, RuntimeError):
                self.per_sample = True
        if self.per_sample:
            return torch.cat([self.graph(xi) for xi in x.split(1)])
        return self.graph(x)


def load_program(path: str | os.PathLike) -> Program:
    """The int8 program from a .pt2 archive (torch.export's format: a graph and tensors, no pickled code)."""
    return Program(torch.export.load(str(path)).module())
