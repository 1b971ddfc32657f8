"""Distillation across architectures on the alignment layer's taps: KD, FitNets-style hints and OFA-KD
(see methods.py); the teacher's input is reconciled to the student's (distiller.py)."""

from .cka import cka_matrix, linear_cka
from .distiller import Distiller, TeacherInput
from .losses import hint_loss, kd_loss, ofa_loss
from .methods import METHODS, DistillConfig, Method, register_method

__all__ = ["Distiller", "DistillConfig", "TeacherInput", "METHODS", "Method", "register_method", "ofa_loss",
           "kd_loss", "hint_loss", "linear_cka", "cka_matrix"]
