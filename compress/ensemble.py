"""Output ensembles: the baseline fusion and collaborative learning are measured against, and a teacher.

Example:
    >>> score(Ensemble([a, b]), data.test, 10)               # evaluated like any model
    >>> train(student, data.train, cfg, loss_fn=distillation_objective(LogEnsemble([a, b]), 0.5, 1.0))
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Ensemble(nn.Module):
    """Output ensemble: the mean of the members' class probabilities (dim 1: logits or per-pixel maps).
    Evaluate it with the same metric as any model."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).softmax(1) for m in self.members]).mean(0)


class LogEnsemble(Ensemble):
    """The output ensemble as logits (the log of the mean probabilities): a distillation teacher. It holds
    copies of the members, so freezing it for distillation leaves the models themselves trainable."""

    def __init__(self, models: list[nn.Module]):
        super().__init__([copy.deepcopy(m) for m in models])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).clamp_min(1e-8).log()
