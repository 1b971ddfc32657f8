"""Distillation losses as pure functions on logits and features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.losses import kd_loss

__all__ = ["ofa_loss", "kd_loss", "hint_loss"]


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
