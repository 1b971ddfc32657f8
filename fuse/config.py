"""Fusion's configs and registries (no torch: the command line reads them for its flags and help).

Example:
    >>> FuseRun(ground="wts", finetune_epochs=4, finetune_batch_size=16)
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.config import DataOptions, Hardware, TrainConfig, option, validate_choices
from compress.errors import CompressError
from compress.registry import Registry
from compress.steps import Step
from prune.config import check_width

SOLVERS = Registry("solver", lazy={name: "fuse.transport" for name in ("emd", "sinkhorn", "hungarian")})
GROUNDS = ("auto", "acts", "wts")
POLICIES = ("shared", "mean", "weighted")  # residual streams: one map each, or the paper's per-sublayer maps
ATTENTION = ("heads", "full", "shared_qk")
TOKENS = ("all", "cls", "window")
MERGES = ("auto", "mean", "regmean")


@dataclass
class FuseConfig:
    """How to fuse (`fuse_models`).

    Example:
        >>> FuseConfig(solver="sinkhorn", softness=0.1, calib=256)
    """

    ground: str = option("auto", "ground cost: activation correlations, weight matching (no data needed for it), "
                                 "or auto: the best measured for the family (attention: wts; conv: acts)",
                         choices=GROUNDS)
    solver: str = option("emd", "optimal transport solver", choices=SOLVERS)
    softness: float = option(0.1, "sinkhorn regulariser relative to the cost scale")
    calib: int = option(256, "calibration images for activation statistics")
    batch_size: int = option(32, "calibration batch", cli=False)
    anchor: int = option(-1, "index of the model whose basis (and config) the result takes")
    residual: str = option("shared", "residual streams: one shared map each, or the paper's per-sublayer maps "
                                     "(acts only)", choices=POLICIES)
    attention: str = option("heads", "attention maps: head-aware, or the paper's cross-head maps per Q/K/V "
                                     "(acts only)", choices=ATTENTION)
    tokens: str = option("window", "token positions in the statistics of ViT-style sequences (conv maps use "
                                    "all): the prefix (cls) tokens plus the central window x window patches, as "
                                    "the reference; all; or the prefix tokens only", choices=TOKENS)
    window: int = option(6, "central patch window side for --tokens window")
    stats_precision: str = option("fp32", "activation statistics (acts only): the cross products of each space "
                                          "in fp32, or from bf16 operands (products 4-5x faster on CPUs with AMX; "
                                          "measured effect in docs/BENCHMARKS.md)", choices=("fp32", "bf16"))
    sweeps: int = option(3, "weight matching: passes over all spaces", cli=False)
    repair: bool | None = option(None, "REPAIR: restore each Linear unit's mean / std to its parents' (variance "
                                        "collapse); default: on for models that attend (digits ViTs one-shot "
                                        "31.7%% -> 58.5%%)")
    merge: str = option("auto", "how the aligned models are combined: mean (the paper's average); regmean, "
                                "each Linear layer by regression on the calibration images (Jin et al. 2023); "
                                "or auto: the best measured for the family (attention: regmean; conv: mean)",
                        choices=MERGES)
    regmean_alpha: float = option(0.9, "RegMean: scale of the Gram matrices' off-diagonal entries", cli=False)
    regmean_images: int = option(32, "RegMean: calibration images its Gram matrices are measured on", cli=False)
    version: int = option(1, cli=False)

    def __post_init__(self):
        validate_choices(self)
        for what, value, default in (("residual", self.residual, "shared"), ("attention", self.attention, "heads"),
                                     ("stats-precision", self.stats_precision, "fp32")):
            if value != default and self.ground == "wts":
                raise CompressError(f"{what} '{value}' solves its maps from activations",
                                    expected=f"ground acts (or {what} {default})", found=f"ground {self.ground}")
        if self.softness <= 0 or self.calib < self.batch_size or self.batch_size < 1:
            raise CompressError("invalid fusion config", expected="softness > 0 and calib >= batch_size >= 1",
                                found=f"softness={self.softness}, calib={self.calib}, batch_size={self.batch_size}")


@dataclass
class FuseRun(Hardware, DataOptions, FuseConfig):
    """`compress fuse`: fusion plus its baselines (vanilla average or narrowed anchor, output ensemble),
    an optional finetune of both, and the measurements.

    Example:
        >>> ckpt, result = fuse.run(["a.pt", "b.pt"], "digits", FuseRun(ground="wts", finetune_epochs=4))
    """

    width: float = option(1.0, "fuse into this fraction of the anchor's channels (0.5: half-wide; heads kept)")
    finetune_epochs: int = option(0, "finetune the fused model (and the baseline) for this many epochs")
    finetune_lr: float = option(5e-4, "finetune learning rate")
    finetune_batch_size: int = option(64, "finetune batch; smaller batches give more steps in the same epochs "
                                          "(digits: 16, measured)")
    baselines: bool = option(False, "also give each parent the same finetune, re-fit each parent's classifier "
                                    "on the same data (a linear probe), and distill the parents' ensemble into a "
                                    "fresh model on the same budget (what fusion competes with)")
    plot: str | None = option(None, "write the transport maps as a picture (PNG)", artifact="maps.png")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        super().__post_init__()
        self.check_hardware()
        self.check_subset()
        check_width(self.width)
        if self.finetune_epochs < 0:
            raise CompressError("invalid --finetune-epochs", expected=">= 0", found=str(self.finetune_epochs))
        if self.baselines and not self.finetune_epochs:
            raise CompressError("--baselines compares finetunes", expected="--finetune-epochs N (N >= 1)")
        self.finetune()  # an invalid finetune is refused before any work

    def finetune(self) -> TrainConfig | None:
        """The finetune's training config, or None when there is none."""
        if not self.finetune_epochs:
            return None
        return TrainConfig(epochs=self.finetune_epochs, lr=self.finetune_lr, batch_size=self.finetune_batch_size,
                           seed=self.seed, device=self.device, precision=self.precision, workers=self.workers)


STEP = Step("fuse", FuseRun, "fuse.pipeline:run", "many", "--models",
            "fuse two or more trained models of one architecture with optimal transport")
