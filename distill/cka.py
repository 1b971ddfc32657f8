"""Linear CKA (Kornblith et al. 2019) between representations of the same images."""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA of two (samples, features) matrices: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred.

    Example:
        >>> a = torch.randn(64, 10); linear_cka(a, a @ torch.linalg.qr(torch.randn(10, 10))[0])  # rotation
        1.0
    """
    x = x.double().flatten(1)
    y = y.double().flatten(1)
    x = x - x.mean(0)
    y = y - y.mean(0)
    if x.shape[1] > x.shape[0] or y.shape[1] > y.shape[0]:  # the Gram form is cheaper with many features
        kx, ky = x @ x.T, y @ y.T
        return float((kx * ky).sum() / (kx.norm() * ky.norm()).clamp_min(1e-12))
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-12))


def cka_matrix(teacher_feats: list[torch.Tensor], student_feats: list[torch.Tensor]) -> list[list[float]]:
    """CKA of every (teacher stage, student stage) pair; rows are teacher stages."""
    return [[linear_cka(t, s) for s in student_feats] for t in teacher_feats]
