"""The student and its helpers as one trainable module, with a frozen teacher beside it (not inside it,
so it is neither trained, synchronised by DDP nor saved), fed through one input reconciliation."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from compress.alignment import Stage, align, logits_and_features
from compress.checkpoint import InputSpec
from compress.device import device_of
from compress.errors import CompressError
from compress.segmentation import SegmentationNet

from .methods import DistillConfig, Shapes, method


class TeacherInput(nn.Module):
    """Maps a batch prepared for the student (its size, mean, std) to what the teacher expects."""

    def __init__(self, student: InputSpec, teacher: InputSpec):
        super().__init__()
        if len(student.mean) != len(teacher.mean):
            raise CompressError("the teacher cannot see the student's input",
                                expected=f"{len(student.mean)} input channels like the student",
                                found=f"{len(teacher.mean)} channels")
        self.size = teacher.size if teacher.size != student.size else None
        s_mean, s_std = torch.tensor(student.mean), torch.tensor(student.std)
        t_mean, t_std = torch.tensor(teacher.mean), torch.tensor(teacher.std)
        # x_t = ((x * s_std + s_mean) - t_mean) / t_std, as one per-channel affine map
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)
        self.changes = [f"resolution {student.size} -> {teacher.size} px (bilinear)"] if self.size else []
        if not (torch.allclose(s_mean, t_mean) and torch.allclose(s_std, t_std)):
            self.changes.append(f"normalisation mean {student.mean} std {student.std} -> mean {teacher.mean} "
                                f"std {teacher.std}")

    def forward(self, x):
        x = x * self.scale + self.shift
        if self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


class Distiller(nn.Module):
    """`forward(x)` is the student's logits; `forward(x, y)` the method's training loss.

    Example:
        >>> d = Distiller(student, teacher, DistillConfig("ofa"), student_spec, teacher_spec, num_classes=10)
        >>> train(d, data.train, TrainConfig(epochs=10), loss_fn=lambda net, x, y: net(x, y))
        >>> d.student  # the deployable model; d.helpers are dropped
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig, student_spec: InputSpec,
                 teacher_spec: InputSpec | None, num_classes: int, cache_teacher: bool = False,
                 mim_teacher: nn.Module | None = None, mim_spec: InputSpec | None = None):
        super().__init__()
        self.cfg = cfg
        self.method = method(cfg.method)
        task = "segmentation" if isinstance(student, SegmentationNet) else "classification"
        if task not in self.method.tasks:
            raise CompressError(f"method '{cfg.method}' does not apply to {task}",
                                expected=" or ".join(self.method.tasks) + " models")
        if cache_teacher and self.method.teacher_features:
            raise CompressError(f"--cache-teacher cannot serve method '{cfg.method}'",
                                expected="a method that reads only the teacher's logits (kd, ofa)",
                                found="a method that reads the teacher's stage maps")
        self.cache: dict[bytes, torch.Tensor] | None = {} if cache_teacher else None
        self.student = student
        s_taps = _Taps(student, student_spec, self.method.student_features, self.method.embeddings)
        self.student_taps = s_taps
        object.__setattr__(self, "teacher", teacher)  # a plain attribute: frozen, not saved, not synchronised
        object.__setattr__(self, "mim_teacher", mim_teacher)  # Hybrid Distill's second teacher, likewise
        self.mim_input = TeacherInput(student_spec, mim_spec) if mim_teacher is not None else None
        if mim_teacher is not None:
            mim_teacher.eval().requires_grad_(False)
        self.teacher_input = TeacherInput(student_spec, teacher_spec) if teacher is not None else None
        self.teacher_taps = None
        if cfg.method != "scratch":
            if teacher is None:
                raise CompressError(f"method '{cfg.method}' needs a teacher", expected="--teacher CHECKPOINT")
            teacher.eval().requires_grad_(False)
            self.teacher_taps = _Taps(teacher, teacher_spec, self.method.teacher_features, self.method.embeddings)
            if self.method.embeddings:
                _check_hierarchical(s_taps, self.teacher_taps)
        # shapes are probed where each model is (a teacher may already sit on a GPU; training moves both)
        x = torch.zeros(2, len(student_spec.mean), student_spec.size, student_spec.size, device=device_of(student))
        with torch.no_grad():
            was = student.training
            student.eval()
            _, s_feats, s_embeds = s_taps(student, x, all_stages=True)
            student.train(was)
            s_dim = getattr(student, "num_features", 0)  # a segmentation network has none; TransKD needs none
            t_feats, t_embeds, t_dim = [], [], s_dim
            if self.teacher_taps is not None:
                try:
                    t_dev = device_of(teacher)
                    t_logits, t_feats, t_embeds = self.teacher_taps(teacher, self.teacher_input.to(t_dev)(x.to(t_dev)))
                except (RuntimeError, ValueError, AssertionError) as e:
                    raise CompressError("the teacher cannot see the student's input",
                                        expected=f"a teacher that accepts {teacher_spec.size} px input",
                                        found=str(e).splitlines()[0][:160]) from None
                if t_logits.shape[1] != num_classes:
                    raise CompressError("teacher and student predict different classes",
                                        expected=f"{num_classes} classes", found=f"{t_logits.shape[1]}")
                t_dim = getattr(teacher, "num_features", t_logits.shape[1])
        # OFA's token branches read the CLS token where the student has one (a model with registers but no
        # class token has prefix tokens and no CLS: its branches average the patches)
        has_cls = getattr(s_taps.root(student), "cls_token", None) is not None
        prefix = [p.shape[1] if has_cls and p is not None else 0 for p in s_feats.prefix]
        self.shapes = Shapes(_shapes(s_feats), s_taps.families, _shapes(t_feats), s_dim, t_dim, num_classes,
                             _shapes(s_embeds), _shapes(t_embeds), x.shape[-1], prefix)
        # a method that needs more than the stage shapes (token layouts, attention modules) sets itself up
        self.helpers = self.method.setup(self) if hasattr(self.method, "setup") else self.method.build(self.shapes, cfg)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the training loop before each epoch: schedules that follow it (Hybrid's masking)."""
        if hasattr(self.method, "set_epoch"):
            self.method.set_epoch(epoch, epochs, self.cfg)

    def train(self, mode: bool = True):
        super().train(mode)
        for t in (self.teacher, self.mim_teacher):
            if t is not None:
                t.eval()  # always: dropout off, BatchNorm statistics frozen
        return self

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)` and friends move the teacher too (it is not a submodule, so that it is neither trained,
        synchronised nor saved)."""
        super()._apply(fn, recurse)
        for t in (self.teacher, self.mim_teacher):
            if t is not None:
                t._apply(fn, recurse)
        return self

    def forward(self, x, y=None):
        if y is None:
            return self.student(x)
        if hasattr(self.method, "step"):  # a method that runs the models itself (Hybrid: masking, attention)
            return self.method.step(self, x, y)
        # the teacher runs first: its activations are freed before the student's autograd graph is built
        # (lower peak memory, and the student's saved tensors do not crowd the teacher out of the caches)
        t_logits, t_feats, t_embeds = None, [], []
        if self.teacher_taps is not None:
            with torch.no_grad():
                if self.cache is not None:
                    t_logits = self._cached_logits(x)
                else:
                    t_logits, t_feats, t_embeds = self.teacher_taps(self.teacher, self.teacher_input(x))
        logits, feats, embeds = self.student_taps(self.student, x)
        return self.method.loss(self.helpers, logits, feats, t_logits, t_feats, y, self.cfg, s_embeds=embeds,
                                t_embeds=t_embeds, x=x)

    def _cached_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits by image content: computed once per distinct image, then looked up. Valid because
        the teacher is frozen and deterministic; only useful when the same images recur (no augmentation)."""
        # content hashing reads the pixels on the host: one copy per batch, the price of the cache
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in x.detach().cpu()]
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            fresh = self.teacher(self.teacher_input(x[missing]))
            for i, z in zip(missing, fresh):
                self.cache[keys[i]] = z
        return torch.stack([self.cache[k] for k in keys])

    def extra_parameters(self) -> int:
        """Parameters trained beside the student and dropped at export."""
        return sum(p.numel() for p in self.helpers.parameters())


class _Taps:
    """Where to read one model during distillation: its canonical stages (and the stage embeddings, the
    inputs of each stage's first block), found by the alignment layer on the model or, for a
    segmentation network, on its backbone."""

    def __init__(self, model: nn.Module, spec: InputSpec, features: bool, embeddings: bool):
        root, prefix = self.root(model), ("backbone." if isinstance(model, SegmentationNet) else "")
        al = align(root, spec.size, len(spec.mean))
        self.all = [Stage(s.index, prefix + s.module, s.channels, s.reduction) for s in al.stages]
        self.families = al.stage_families
        self.stages = self.all if features else []
        self.entries = [prefix + e for e in al.stage_entries] if embeddings else []
        self.reductions = [s.reduction for s in al.stages]
        self.name = type(root).__name__

    @staticmethod
    def root(model: nn.Module) -> nn.Module:
        """The network the stages belong to: the model, or a segmentation network's backbone."""
        return model.backbone if isinstance(model, SegmentationNet) else model

    def __call__(self, model: nn.Module, x: torch.Tensor, all_stages: bool = False):
        """(logits, NCHW stage maps, NCHW stage embeddings) from one ordinary forward."""
        return logits_and_features(model, x, self.all if all_stages else self.stages, self.entries)


def _shapes(tensors: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape[1:]) for t in tensors]


def _check_hierarchical(student: _Taps, teacher: _Taps) -> None:
    for who in (student, teacher):
        if len(set(who.reductions)) < 2:
            raise CompressError("TransKD needs hierarchical backbones (stages at several strides)",
                                expected="e.g. resnet, convnext, swin, efficientformer, mobilevit",
                                found=f"{who.name} with every stage at stride {who.reductions[0]}")
    if len(student.reductions) != len(teacher.reductions):
        raise CompressError("TransKD pairs stages one to one", expected=f"{len(teacher.reductions)} student stages",
                            found=f"{len(student.reductions)}")
