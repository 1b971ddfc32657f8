"""Optimal transport between two sets of neurons: costs, solvers, and the maps that move weights.

Pure functions on tensors. A coupling T is (n_a, n_b) with row sums 1/n_a and column sums 1/n_b (uniform
marginals). Weights move with two normalisations of T (Imfeld et al.; fixes OTFusion's n*T scaling when
widths differ):

- axes that carry the neurons (rows, biases, norms): M_out = T diag(1/colsum): each target neuron is the
  mass-weighted average of the source neurons sent to it;
- contracted axes (the next layer's input columns): M_in = diag(1/rowsum) T: inputs of merged neurons add.

With a permutation both reduce to the permutation matrix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

SOLVERS = ("emd", "sinkhorn", "hungarian")


@dataclass
class Solution:
    coupling: torch.Tensor  # (n_a, n_b), sums to 1
    solver: str  # what produced it (after any fallback)
    note: str = ""  # why a fallback happened

    def maps(self) -> dict[str, torch.Tensor]:
        return weight_maps(self.coupling)

    @property
    def partners(self) -> float:
        return partners(self.coupling)


def weight_maps(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two matrices that move weights with coupling `t` (module docstring): "out" and "in"."""
    return {"out": t / t.sum(0, keepdim=True).clamp_min(1e-12), "in": t / t.sum(1, keepdim=True).clamp_min(1e-12)}


def partners(coupling: torch.Tensor) -> float:
    """Effective partners per source neuron (exp of row entropy): 1 for a hard map, n_b for uniform."""
    p = coupling / coupling.sum(1, keepdim=True).clamp_min(1e-12)
    ent = -(p * p.clamp_min(1e-30).log()).sum(1)
    return float(ent.exp().mean())


def correlation_cost(corr: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between z-scored activations, sqrt(2(1 - rho)), scaled to max 1 (the paper's
    max-normalised ground metric on standardised activations)."""
    cost = (2 * (1 - corr.clamp(-1, 1))).clamp_min(0).sqrt()
    return cost / cost.max().clamp_min(1e-12)


def sinkhorn_reg(cost: torch.Tensor, softness: float) -> float:
    """Entropic regulariser relative to the cost's own scale: `softness` times the mean gap between each
    row's best and median cost, so one setting means the same at any width (0.05: nearly hard, 1: soft)."""
    gap = (cost.median(dim=1).values - cost.min(dim=1).values).mean().item()
    return max(softness * gap, 1e-6)


def solve(cost: torch.Tensor, solver: str = "emd", softness: float = 0.1, max_iter: int = 1_000_000,
          sinkhorn_iter: int = 2000) -> Solution:
    """Optimal coupling for `cost` (n_a, n_b) with uniform marginals.

    A Sinkhorn that does not converge or yields NaN is detected and replaced by the exact EMD solution,
    and the Solution says so.

    Example:
        >>> sol = solve(torch.rand(8, 8), "hungarian")
        >>> sol.coupling.sum().item(), sol.partners
        (1.0, 1.0)
    """
    import ot

    if solver not in SOLVERS:
        raise ValueError(f"unknown OT solver '{solver}': expected one of {', '.join(SOLVERS)}")
    c = cost.detach().double().cpu()
    n_a, n_b = c.shape
    mu, nu = torch.full((n_a,), 1 / n_a, dtype=torch.float64), torch.full((n_b,), 1 / n_b, dtype=torch.float64)
    if solver == "hungarian":
        if n_a != n_b:
            raise ValueError(f"Hungarian matching needs equal widths: found {n_a} and {n_b} (use emd or sinkhorn)")
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(c.numpy())
        t = torch.zeros(n_a, n_b, dtype=torch.float64)
        t[rows, cols] = 1 / n_a
        return Solution(t.float(), "hungarian")
    if solver == "sinkhorn":
        reg = sinkhorn_reg(c, softness)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = ot.sinkhorn(mu, nu, c, reg, method="sinkhorn_log", numItermax=sinkhorn_iter, stopThr=1e-7)
        err = (t.sum(1) - mu).abs().max().item() + (t.sum(0) - nu).abs().max().item()
        if torch.isfinite(t).all() and err < 1e-3 / max(n_a, n_b) * 10:
            return Solution(t.float(), "sinkhorn")
        note = f"sinkhorn (reg {reg:.2e}) {'gave NaN' if not torch.isfinite(t).all() else f'did not converge (marginal error {err:.1e})'}"
        if caught:
            note += f": {caught[-1].message}"
        sol = solve(cost, "emd", max_iter=max_iter)
        return Solution(sol.coupling, "emd", note + "; used exact EMD instead")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = ot.emd(mu.numpy(), nu.numpy(), c.numpy(), numItermax=max_iter)
    note = "; ".join(str(w.message) for w in caught)
    return Solution(torch.from_numpy(np.asarray(t)).float(), "emd", note)
