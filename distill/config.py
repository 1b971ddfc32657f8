"""Distillation's configs and method registry (no torch: the command line reads them for its flags).

Example:
    >>> DistillRun(student="mobilevit", method="ofa", epochs=10)
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.config import DataOptions, Hardware, TrainConfig, option, validate_choices
from compress.errors import CompressError
from compress.registry import Registry, parse_arch_args
from compress.steps import Step

METHODS = Registry("distillation method",
                   lazy={name: "distill.methods" for name in ("scratch", "kd", "fitnet", "ofa", "transkd")})
TRANSKD_VARIANTS = ("base", "gl", "ea")


def register_method(name: str):
    """Register a `Method` subclass under `name`: `compress distill --method name` can use it at once.

    Example:
        >>> @register_method("mine")
        ... class Mine(Method): ...
    """
    return METHODS.register(name)


@dataclass
class DistillConfig:
    """Loss settings (defaults: OFA's reference code, Hinton's KD with T = 4, alpha = 0.9).

    Example:
        >>> DistillConfig(method="ofa", gamma=1.2)
    """

    method: str = option("ofa", "distillation method (transkd: segmentation between hierarchical backbones)",
                         choices=METHODS)
    gamma: float = option(1.0, "OFA's target enhancement exponent (> 1 enhances the target class's share)")
    temperature: float = option(1.0, "OFA's temperature")
    paper_form: bool = option(False, "OFA: the paper's loss instead of the reference code's")
    ofa_weight: float = option(1.0, "weight of OFA's stage-branch losses")
    kd_temperature: float = option(4.0, "KD temperature")
    kd_alpha: float = option(0.9, "KD: weight of the teacher term (1 - alpha: cross-entropy)")
    hint_weight: float = option(1.0, "FitNets: weight of the hint terms", cli=False)
    label_smoothing: float = option(0.0, "label smoothing of the student's cross-entropy", cli=False)
    transkd_variant: str = option("base", "TransKD: CSF + HCL + PEA, plus the GL-Mixer or the embedding assistant",
                                  choices=TRANSKD_VARIANTS)
    transkd_weight: float = option(1.0, "TransKD: weight of its feature terms")

    def __post_init__(self):
        validate_choices(self)
        if self.temperature <= 0 or self.kd_temperature <= 0 or not 0 <= self.kd_alpha <= 1:
            raise CompressError("invalid distillation loss settings",
                                expected="temperatures > 0 and 0 <= kd_alpha <= 1",
                                found=f"temperature={self.temperature}, kd_temperature={self.kd_temperature}, "
                                      f"kd_alpha={self.kd_alpha}")
        if min(self.gamma, self.ofa_weight, self.hint_weight, self.transkd_weight) < 0:
            raise CompressError("negative loss weight", expected="gamma and every weight >= 0")


@dataclass
class DistillRun(Hardware, DataOptions, DistillConfig):
    """`compress distill`: train a student from a teacher, with the baselines on the same budget.

    Example:
        >>> ckpt, result = distill.run("resnet.pt", "digits", DistillRun(student="vit", method="ofa"))
    """

    student: str | None = option(None, "student architecture name, or a checkpoint to start from")
    student_args: dict = option({}, "student architecture kwargs, e.g. embed_dim=64,depth=4")
    epochs: int = option(10, "student training epochs")
    batch_size: int = option(64, "batch size")
    lr: float = option(2e-3, "peak learning rate")
    train_teacher: bool = option(False, "the teacher input is an architecture name: train it first (from "
                                        "--pretrained weights when given)")
    pretrained: bool = option(False, "the teacher input is a timm name: start from its published weights (hub); "
                                     "a head for other classes is finetuned first")
    pretrained_file: str | None = option(None, "the teacher input is a timm name: its published weights from this "
                                               "local file (.safetensors / .pth)")
    teacher_epochs: int = option(30, "with --train-teacher: its epochs")
    teacher_args: dict = option({}, "with --train-teacher: teacher architecture kwargs, e.g. "
                                    "depths=4x4x12x6,embed_dims=64x128x320x512 (TransKD's one family at two sizes)")
    baselines: bool = option(True, "also train the student from scratch and with KD on the same budget")
    cache_teacher: bool = option(False, "compute the teacher's logits once per image (turns the random shifts "
                                        "off, so images recur)")
    cka_plot: str | None = option(None, "teacher-vs-student stage CKA heatmap (PNG)", artifact="cka.png")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        super().__post_init__()
        self.check_hardware()
        self.check_subset()
        self.student_args, self.teacher_args = parse_arch_args(self.student_args), parse_arch_args(self.teacher_args)
        if self.teacher_args and not (self.train_teacher or self.pretrained or self.pretrained_file):
            raise CompressError("--teacher-args shapes a teacher that --train-teacher trains",
                                expected="--train-teacher with an architecture name")
        self.training()
        if self.train_teacher:
            self.teacher_training()

    def training(self) -> TrainConfig:
        """The student's training config (the random shifts are off with a teacher cache: images recur)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           max_shift=0.0 if self.cache_teacher else TrainConfig.max_shift, device=self.device,
                           precision=self.precision, workers=self.workers)

    def teacher_training(self) -> TrainConfig:
        return TrainConfig(epochs=self.teacher_epochs, seed=self.seed, device=self.device, precision=self.precision,
                           workers=self.workers)


STEP = Step("distill", DistillRun, "distill.pipeline:run", "one", "--teacher",
            "train a student from a teacher of any architecture (OFA-KD, KD, hints, TransKD)")
