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

from compress.errors import CompressError

from .config import SOLVERS


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
    """Optimal coupling for `cost` (n_a, n_b) with uniform marginals, by any solver of `SOLVERS`.

    A Sinkhorn that does not converge or yields NaN is detected and replaced by the exact EMD solution,
    and the Solution says so.

    Example:
        >>> sol = solve(torch.rand(8, 8), "hungarian")
        >>> sol.coupling.sum().item(), sol.partners
        (1.0, 1.0)
    """
    return SOLVERS.get(solver)(cost.detach().double().cpu(), softness=softness, max_iter=max_iter,
                               sinkhorn_iter=sinkhorn_iter)


def _marginals(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_a, n_b = c.shape
    return torch.full((n_a,), 1 / n_a, dtype=torch.float64), torch.full((n_b,), 1 / n_b, dtype=torch.float64)


@SOLVERS.register("hungarian")
def hungarian(c: torch.Tensor, **_) -> Solution:
    """A hard one-to-one matching (equal widths only)."""
    from scipy.optimize import linear_sum_assignment

    n_a, n_b = c.shape
    if n_a != n_b:
        raise CompressError("Hungarian matching needs equal widths", found=f"{n_a} and {n_b}",
                            hint="use emd or sinkhorn")
    rows, cols = linear_sum_assignment(c.numpy())
    t = torch.zeros(n_a, n_b, dtype=torch.float64)
    t[rows, cols] = 1 / n_a
    return Solution(t.float(), "hungarian")


@SOLVERS.register("sinkhorn")
def sinkhorn(c: torch.Tensor, softness: float = 0.1, sinkhorn_iter: int = 2000, max_iter: int = 1_000_000,
             **_) -> Solution:
    """Log-domain entropic OT with a regulariser relative to the cost scale; exact EMD where it fails."""
    import ot

    mu, nu = _marginals(c)
    n_a, n_b = c.shape
    reg = sinkhorn_reg(c, softness)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = ot.sinkhorn(mu, nu, c, reg, method="sinkhorn_log", numItermax=sinkhorn_iter, stopThr=1e-7)
    err = (t.sum(1) - mu).abs().max().item() + (t.sum(0) - nu).abs().max().item()
    if torch.isfinite(t).all() and err < 1e-3 / max(n_a, n_b) * 10:
        return Solution(t.float(), "sinkhorn")
    failure = "gave NaN" if not torch.isfinite(t).all() else f"did not converge (marginal error {err:.1e})"
    note = f"sinkhorn (reg {reg:.2e}) {failure}"
    if caught:
        note += f": {caught[-1].message}"
    sol = emd(c, max_iter=max_iter)
    return Solution(sol.coupling, "emd", note + "; used exact EMD instead")


@SOLVERS.register("emd")
def emd(c: torch.Tensor, max_iter: int = 1_000_000, **_) -> Solution:
    """Exact optimal transport (network simplex). Between equal widths with uniform marginals a permutation
    is optimal (Birkhoff), and the assignment solver finds one of the same cost several times faster (3072
    neurons: a ViT-B MLP), so that case is solved as an assignment."""
    import ot

    if c.shape[0] == c.shape[1]:
        return Solution(hungarian(c).coupling, "emd")
    mu, nu = _marginals(c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = ot.emd(mu.numpy(), nu.numpy(), c.numpy(), numItermax=max_iter)
    note = "; ".join(str(w.message) for w in caught)
    return Solution(torch.from_numpy(np.asarray(t)).float(), "emd", note)
