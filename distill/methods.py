"""The method registry: what each distillation method builds beside the student and what it minimises.

Every method sees the same things: the student's logits and its canonical-stage maps (NCHW, from the
alignment layer's taps), the teacher's logits (and maps, when it asks for them), and the labels.
Add one with `@register_method("name")` on a `Method` subclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.losses import kd_with_labels

from .config import METHODS, DistillConfig, register_method
from .losses import hint_loss, ofa_loss
from .projectors import ofa_branch, regressor


@dataclass
class Shapes:
    """What a method may build from: per canonical stage of the student (and teacher) the NCHW shape and
    the family of its blocks; the widths before the classifiers; the class count."""

    student: list[tuple[int, int, int]]
    families: list[str]
    teacher: list[tuple[int, int, int]]
    student_dim: int
    teacher_dim: int
    num_classes: int
    student_embeds: list = field(default_factory=list)  # stage embeddings (C, H, W), for TransKD
    teacher_embeds: list = field(default_factory=list)
    input_side: int = 224  # the student's input resolution
    student_prefix: list = field(default_factory=list)  # per stage: prefix tokens ahead of a CLS token, else 0


class Method:
    student_features = False
    teacher_features = False
    embeddings = False  # stage embeddings of both models (TransKD)
    tasks = ("classification",)

    def build(self, shapes: Shapes, cfg: DistillConfig) -> nn.ModuleDict:
        return nn.ModuleDict()

    def loss(self, helpers: nn.ModuleDict, s_logits, s_feats, t_logits, t_feats, y, cfg: DistillConfig, **extra):
        raise NotImplementedError


@register_method("scratch")
class Scratch(Method):
    """The student alone: cross-entropy on the labels (the teacher is not used)."""

    tasks = ("classification", "segmentation")

    def loss(self, helpers, s_logits, s_feats, t_logits, t_feats, y, cfg, **extra):
        return F.cross_entropy(s_logits, y, label_smoothing=cfg.label_smoothing)


@register_method("kd")
class KD(Method):
    """Hinton et al.: alpha * T^2 KL(teacher || student at temperature T) + (1 - alpha) * CE."""

    def loss(self, helpers, s_logits, s_feats, t_logits, t_feats, y, cfg, **extra):
        return kd_with_labels(s_logits, t_logits, y, cfg.kd_alpha, cfg.kd_temperature, cfg.label_smoothing)


@register_method("fitnet")
class FitNet(Method):
    """FitNets-style hints at every canonical stage (paired by relative depth) + CE: a regressor maps
    the student's map to the teacher's channels, compared at the teacher's grid."""

    student_features = teacher_features = True

    def build(self, shapes, cfg):
        pairs = _pairs(len(shapes.student), len(shapes.teacher))
        return nn.ModuleDict({f"hint{i}": regressor(shapes.student[i][0], shapes.teacher[j][0]) for i, j in pairs})

    def loss(self, helpers, s_logits, s_feats, t_logits, t_feats, y, cfg, **extra):
        pairs = _pairs(len(s_feats), len(t_feats))
        hints = sum(hint_loss(helpers[f"hint{i}"](s_feats[i]), t_feats[j]) for i, j in pairs) / len(pairs)
        return F.cross_entropy(s_logits, y, label_smoothing=cfg.label_smoothing) + cfg.hint_weight * hints


@register_method("ofa")
class OFA(Method):
    """OFA-KD: an exit branch per student stage projects its map into logit space; the branches and the
    student's own logits learn from the teacher's logits with the adaptive target enhancement loss."""

    student_features = True

    def build(self, shapes, cfg):
        n = len(shapes.student)
        # Token branches merge down to the stride-32 grid of the input (the reference's 7x7 at 224 px), or the
        # student's last grid if that is coarser: an isotropic ViT's blocks otherwise run on all its tokens.
        # At least 2x2, so that the branch's attention has positions to mix (at 32 px the stride-32 grid is
        # one token: resnet -> ViT on digits, OFA 45.42 with 1x1 vs 49.29 with 2x2, mean of 3 seeds).
        final_side = min(shapes.student[-1][1], max(shapes.input_side // 32, 2))
        if cfg.stage_gammas and len(cfg.stage_gammas) != n:
            raise CompressError("--stage-gammas gives one gamma per exit branch (student stage)",
                                expected=f"{n} values", found=f"{len(cfg.stage_gammas)}")
        prefix = shapes.student_prefix or [0] * n
        return nn.ModuleDict({f"exit{i}": ofa_branch(shape, fam, i, n, final_side, shapes.student_dim,
                                                     shapes.teacher_dim, shapes.num_classes, prefix[i])
                              for i, (shape, fam) in enumerate(zip(shapes.student, shapes.families))})

    def loss(self, helpers, s_logits, s_feats, t_logits, t_feats, y, cfg, **extra):
        def term(z, gamma):
            return ofa_loss(z, t_logits, y, gamma, cfg.temperature, cfg.paper_form)

        gammas = cfg.stage_gammas or [cfg.gamma] * len(s_feats)
        prefix = getattr(s_feats, "prefix", [None] * len(s_feats))
        branches = sum(term(helpers[f"exit{i}"](f, prefix[i]), gammas[i]) for i, f in enumerate(s_feats))
        ce = 0.0 if cfg.paper_form else F.cross_entropy(s_logits, y, label_smoothing=cfg.label_smoothing)
        return ce + term(s_logits, cfg.gamma) + cfg.ofa_weight * branches


@register_method("transkd")
class TransKD(Method):
    """TransKD for segmentation between hierarchical backbones: CSF + HCL on the stage maps, PEA on the
    stage embeddings (GL-Mixer / embedding assistant variants); no logit term (distill/transkd.py)."""

    student_features = teacher_features = embeddings = True
    tasks = ("segmentation",)

    def build(self, shapes, cfg):
        from .transkd import TransKDHelpers

        return nn.ModuleDict({"transkd": TransKDHelpers(shapes.student, shapes.teacher, shapes.student_embeds,
                                                        shapes.teacher_embeds, cfg.transkd_variant)})

    def loss(self, helpers, s_logits, s_feats, t_logits, t_feats, y, cfg, **extra):
        ce = F.cross_entropy(s_logits, y, label_smoothing=cfg.label_smoothing)
        return ce + cfg.transkd_weight * helpers["transkd"].loss(s_feats, t_feats, extra["s_embeds"],
                                                                 extra["t_embeds"], extra["x"])


def _pairs(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Stage i of the student with the teacher stage at the same relative depth."""
    return [(i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]


def method(name: str) -> Method:
    return METHODS.get(name)()


