"""Distillation losses as pure functions on logits and features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.losses import kd_loss

__all__ = ["ofa_loss", "kd_loss", "hint_loss", "whiten", "resize_map"]


def whiten(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """`t` detached and normalised over its feature axis `dim` at each position (a LayerNorm without affine,
    FD's target normalisation): features of unrelated scales become comparable targets."""
    t = t.detach()
    return F.layer_norm(t.movedim(dim, -1), (t.shape[dim],)).movedim(-1, dim)


def resize_map(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An NCHW map at grid `size`: averaged down when at least as fine, bilinear up otherwise."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    if t.shape[-2] >= size[0] and t.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(t, size)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, gamma: float = 1.0,
             temperature: float = 1.0, paper_form: bool = False) -> torch.Tensor:
    """OFA-KD's adaptive target enhancement loss, batch mean.

    Reference-code form (default): -sum_c [(p_t,c + m_c)^gamma - m_c] log p_s,c, m the one-hot target; the
    cross-entropy term is added separately by the method. Paper form: -(1 + p_t,y)^gamma log p_s,y
    - sum_{c != y} p_t,c log p_s,c, which contains the cross-entropy itself. With gamma = 1 either way the
    total is CE + KD (the cross-entropy form of KD).

    Example:
        >>> z = torch.tensor([[2.0, 0.0, -1.0]]); y = torch.tensor([0])
        >>> ofa_loss(z, z, y, gamma=1.0)  # = -sum_c p_c log p_c, the teacher's entropy here
        tensor(0.6595)
    """
    p_t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    m = F.one_hot(target, p_t.shape[-1]).to(p_t.dtype)
    if paper_form:
        weight = m * (1 + p_t).pow(gamma) + (1 - m) * p_t
    else:
        weight = (p_t + m).pow(gamma) - m
    return -(weight * log_p_s).sum(-1).mean()


def hint_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """FitNets-style hint: MSE between a regressed student map and the teacher's map, both at the teacher's
    grid; the teacher map is standardised over channels so transformer streams and ReLU maps weigh alike."""
    t = teacher_map.float()
    t = (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-5)
    s = F.interpolate(student_map, size=t.shape[-2:], mode="bilinear", align_corners=False) \
        if student_map.shape[-2:] != t.shape[-2:] else student_map
    return F.mse_loss(s.float(), t)
