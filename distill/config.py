"""Distillation's configs and method registry (no torch: the command line reads them for its flags).

Example:
    >>> DistillRun(student="mobilevit", method="ofa", epochs=10)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from compress.config import DataOptions, Hardware, TrainConfig, option, validate_choices
from compress.errors import CompressError
from compress.registry import Registry, parse_arch_args
from compress.steps import Step

METHODS = Registry("distillation method", lazy={
    **{name: "distill.methods" for name in ("scratch", "kd", "fitnet", "ofa", "transkd")},
    "fd": "distill.hybrid", "hybrid": "distill.hybrid", "collab": "distill.collab", "dml": "distill.collab"})
TRANSKD_VARIANTS = ("base", "gl", "ea")
PEER_METHODS = ("collab", "dml")  # online: two peers trained together, no teacher
PIXEL_RULES = ("where_wrong", "correct_and_confident", "correct", "confident")
# collab's defaults per task (the reconstruction's weights are all 1). On digit-scenes the two feature terms
# pull the segmentation CNN's stage maps, which its head reads directly, toward the weaker ViT's: against the
# pixel term alone they cost it 1-15 mIoU (seed 0) at every weight and direction rule tried. For classification
# the per-image direction lets the CNN teach the ViT its features (docs/BENCHMARKS.md, collaborative learning).
COLLAB_DEFAULTS = {"classification": {"hfd_weight": 1.0, "region_weight": 1.0, "region_metric": "sample"},
                   "segmentation": {"hfd_weight": 0.0, "region_weight": 0.0, "region_metric": "cell"}}


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
    gamma: float = option(1.0, "OFA's target enhancement exponent (> 1 enhances the target class's share); with "
                               "--stage-gammas, the student's own logits' only")
    stage_gammas: list[float] = option([], "OFA: one gamma per exit branch, shallowest stage first (the reference's "
                                           "per-stage ofa_eps; default: --gamma for every branch)")
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
    feat_weight: float = option(1.0, "hybrid / fd: weight of the final-feature term (the paper's alpha)")
    relation_weight: float = option(1.0, "hybrid: weight of the token-relation term (the paper's beta)")
    relation_layers: list[int] = option([], "hybrid: 1-based student blocks whose attention imitates the MIM "
                                            "teacher's (default: blocks 8-11 of 12, at the same relative depth)")
    mask_max: float = option(0.5, "hybrid: final share of the student's patch tokens removed (rises linearly from "
                                  "0 over the epochs; 0 turns the masking off)")
    mask_full_share: float = option(0.2, "hybrid: share of the last epochs trained on every token (the masking "
                                         "rises over the epochs before): the student is used on full images, as "
                                         "the paper's finetune after masked pre-training is")
    mask_schedule: str = option("epoch", "hybrid: how the masked share rises: epoch (over training, tokens removed "
                                         "from the student's input) or layer (across the student's blocks, each "
                                         "epoch: token pruning inside its forward, from none before the first block "
                                         "to --mask-max before the last)", choices=("epoch", "layer"))
    mask_score: str = option("auto", "hybrid: whose CLS attention picks the redundant tokens (auto: the "
                                     "discriminative teacher's when it has one on the student's grid, else the MIM "
                                     "teacher's)", choices=("auto", "teacher", "mim", "random"))
    ce_weight: float = option(1.0, "hybrid / fd: weight of the student's cross-entropy (0: the paper's label-free "
                                   "pretraining; finetune after with compress train --init)")
    hfd_weight: float | None = option(None, "collab: weight of the low-stage feature mimicry (HFD); default 1 for "
                                            "classification, 0 for segmentation (COLLAB_DEFAULTS)")
    region_weight: float | None = option(None, "collab: weight of the region-wise selective feature term (BSD); "
                                               "default 1 for classification, 0 for segmentation (COLLAB_DEFAULTS)")
    pixel_weight: float = option(1.0, "collab: weight of the pixel-wise (per-sample) selective KL term (BSD)")
    region_grid: int = option(8, "collab: regions per side of the stage map (capped by the map's side)")
    region_metric: str = option("auto", "collab: the loss that decides a region's direction (cell: the peer's loss "
                                        "in the region: pixel CE for segmentation, a per-cell probe for "
                                        "classification; sample: the peer's loss on the whole image; auto: sample "
                                        "for classification, cell for segmentation)",
                                choices=("auto", "cell", "sample"))
    pixel_temperature: float = option(1.0, "collab / dml: temperature tau of the pixel-wise (per-sample) KL, "
                                           "tau^2 * KL(softmax(z_peer / tau) || softmax(z / tau)); the same for "
                                           "both methods, so that only the selection differs")
    pixel_rule: str = option("where_wrong", "collab: when a peer's prediction is transferred (where_wrong: the "
                                            "peer is right and more confident in the label where the learner is "
                                            "wrong)", choices=PIXEL_RULES)

    def for_task(self, task: str):
        """The collab settings left to their task default (None / auto) resolved for `task` (COLLAB_DEFAULTS).

        Example:
            >>> DistillRun(student="resnet", peer="vit", method="collab").for_task("segmentation").hfd_weight
            0.0
        """
        chosen = {k: v for k, v in COLLAB_DEFAULTS[task].items() if getattr(self, k) in (None, "auto")}
        return replace(self, **chosen)

    def __post_init__(self):
        validate_choices(self)
        if min(self.temperature, self.kd_temperature, self.pixel_temperature) <= 0 or not 0 <= self.kd_alpha <= 1:
            raise CompressError("invalid distillation loss settings",
                                expected="temperatures > 0 and 0 <= kd_alpha <= 1",
                                found=f"temperature={self.temperature}, kd_temperature={self.kd_temperature}, "
                                      f"pixel_temperature={self.pixel_temperature}, kd_alpha={self.kd_alpha}")
        if min(self.gamma, *self.stage_gammas, self.ofa_weight, self.hint_weight, self.transkd_weight, self.feat_weight,
               self.relation_weight, self.ce_weight, self.hfd_weight or 0, self.region_weight or 0,
               self.pixel_weight) < 0:
            raise CompressError("negative loss weight", expected="gamma and every weight >= 0")
        if not 0 <= self.mask_max < 1 or not 0 <= self.mask_full_share <= 1 or self.region_grid < 1:
            raise CompressError("invalid hybrid / collab settings",
                                expected="0 <= mask_max < 1, 0 <= mask_full_share <= 1, region_grid >= 1",
                                found=f"mask_max={self.mask_max}, mask_full_share={self.mask_full_share}, "
                                      f"region_grid={self.region_grid}")


@dataclass
class DistillRun(Hardware, DataOptions, DistillConfig):
    """`compress distill`: train a student from a teacher, with the baselines on the same budget.

    Example:
        >>> ckpt, result = distill.run("resnet.pt", "digits", DistillRun(student="vit", method="ofa"))
    """

    student: str | None = option(None, "student architecture name, or a checkpoint to start from (in a recipe, "
                                       "also the name of the step that made it)", checkpoint="or-architecture")
    student_args: dict = option({}, "student architecture kwargs, e.g. embed_dim=64,depth=4")
    mim_teacher: str | None = option(None, "hybrid: the masked-image-modelling teacher checkpoint (compress train "
                                           "--objective mim makes one; in a recipe, the name of the step that did)",
                                     checkpoint=True)
    peer: str | None = option(None, "collab / dml: the second peer's architecture (a ViT beside a CNN --student) "
                                    "or a checkpoint to start from (pretrained weights, an MAE encoder), trained "
                                    "together with the student; no teacher (in a recipe, also the name of "
                                    "the step that made the checkpoint)", checkpoint="or-architecture")
    peer_args: dict = option({}, "collab / dml: the peer's architecture kwargs")
    peer_lr: float | None = option(None, "collab / dml: the peer's own peak learning rate (default: --lr)")
    peer_out: str | None = option(None, "collab / dml: where the trained peer is saved (default: beside --out, "
                                        "NAME.peer.pt)", artifact="peer.pt")
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
        self.peer_args = parse_arch_args(self.peer_args)
        online = self.method in PEER_METHODS
        if online != bool(self.peer):
            raise CompressError(f"--peer is for the online methods ({', '.join(PEER_METHODS)})",
                                expected="--method collab --student CNN --peer VIT" if online else "no --peer",
                                found=f"--method {self.method}" + (f" --peer {self.peer}" if self.peer else ""))
        if self.mim_teacher and self.method != "hybrid":
            raise CompressError("--mim-teacher is hybrid's second teacher", expected="--method hybrid")
        if self.method == "hybrid" and not self.mim_teacher:
            raise CompressError("--method hybrid needs a masked-image-modelling teacher",
                                expected="--mim-teacher CHECKPOINT (make one: compress train --objective mim)")
        if self.peer_lr is not None and self.peer_lr <= 0:
            raise CompressError("invalid --peer-lr", expected="> 0", found=str(self.peer_lr))
        if self.teacher_args and not (self.train_teacher or self.pretrained or self.pretrained_file):
            raise CompressError("--teacher-args shapes a teacher that --train-teacher trains",
                                expected="--train-teacher with an architecture name")
        self.training()
        if self.train_teacher:
            self.teacher_training()

    def takes_input(self) -> bool:
        """Whether the command reads a teacher (the online methods train two peers from scratch)."""
        return self.method not in PEER_METHODS

    def training(self) -> TrainConfig:
        """The student's training config (the random shifts are off with a teacher cache: images recur)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           max_shift=0.0 if self.cache_teacher else TrainConfig.max_shift, device=self.device,
                           precision=self.precision, workers=self.workers)

    def teacher_training(self) -> TrainConfig:
        return TrainConfig(epochs=self.teacher_epochs, seed=self.seed, device=self.device, precision=self.precision,
                           workers=self.workers)


STEP = Step("distill", DistillRun, "distill.pipeline:run", "one", "--teacher",
            "train a student from a teacher of any architecture (OFA-KD, KD, hints, TransKD, Hybrid Distill), or "
            "two peers together (collab)")
