"""Losses shared by the pipelines."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .device import device_of


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's knowledge distillation: T^2 * KL(softmax(t / T) || softmax(s / T)), batch mean.

    Example:
        >>> kd_loss(torch.zeros(2, 10), torch.zeros(2, 10)).item()
        0.0
    """
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def kd_with_labels(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                   alpha: float = 0.9, temperature: float = 4.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha * KD + (1 - alpha) * cross-entropy on the labels (Hinton et al.)."""
    return alpha * kd_loss(student_logits, teacher_logits, temperature) + (1 - alpha) * F.cross_entropy(
        student_logits, target, label_smoothing=label_smoothing)


def distillation_objective(teacher: torch.nn.Module, alpha: float = 0.9, temperature: float = 4.0,
                           label_smoothing: float = 0.1):
    """A `train()` loss: alpha * KD from the frozen `teacher` + (1 - alpha) * cross-entropy.

    Example:
        >>> train(student, data, cfg, loss_fn=distillation_objective(original))
    """
    teacher.eval().requires_grad_(False)

    def loss(model, x, y):
        if device_of(teacher) != x.device:  # the student went to its training device: the teacher follows
            teacher.to(x.device)
        with torch.no_grad():
            target = teacher(x)
        return kd_with_labels(model(x), target, y, alpha, temperature, label_smoothing)

    return loss
