"""Pruning's configs and registries (no torch: the command line reads them for its flags and help).

Example:
    >>> PruneRun(method="width", target_macs=0.5, finetune_epochs=8, distill_from_original=True)
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.config import DataOptions, Hardware, TrainConfig, option, validate_choices
from compress.errors import CompressError
from compress.registry import Registry
from compress.steps import Step

METHODS = Registry("pruning method", lazy={name: "prune.methods" for name in ("depth", "width", "lowrank")})
CRITERIA = Registry("importance criterion",
                    lazy={name: "prune.importance" for name in ("activation", "magnitude", "taylor", "hessian")})
UNITS = ("block", "attn", "mlp")
SCORES = ("cos", "loss")


@dataclass
class PruneConfig:
    """What to prune and how (`prune.prune`).

    Example:
        >>> PruneConfig(method="depth", ratio=0.25, unit="attn")
    """

    method: str = option("width", "depth: drop blocks; width: slice channels, heads and hidden units; "
                                  "lowrank: factorise Linear layers", choices=METHODS)
    ratio: float = option(0.5, "fraction removed: of the blocks (depth), of each space's units (width), of each "
                               "layer's parameters (lowrank)")
    keep: int | None = option(None, "depth: number of units to keep (instead of --ratio)")
    importance: str = option("hessian", "width: unit importance (hessian: most accurate without training, "
                                        "docs/BENCHMARKS.md)", choices=CRITERIA)
    unit: str = option("block", "depth: what a unit is", choices=UNITS)
    score: str = option("cos", "depth: rank units by cos(in, out) (the paper's) or by greedy calibration loss",
                        choices=SCORES)
    round_to: int = option(1, "width: kept channel counts rounded up to a multiple")
    include_residual: bool = option(False, "width: also slice the residual streams")
    whiten: bool = option(False, "lowrank: activation-whitened SVD (SVD-LLM)")
    exclude: list[str] = option([], "fnmatch patterns of tensors / layers left alone")

    def __post_init__(self):
        validate_choices(self)
        if not 0.0 <= self.ratio < 1.0:
            raise CompressError("pruning ratio out of range", expected="0 <= ratio < 1 (the fraction removed)",
                                found=str(self.ratio))
        if self.keep is not None and self.keep < 1:
            raise CompressError("depth pruning would remove every unit", expected="--keep >= 1", found=str(self.keep))
        if self.round_to < 1:
            raise CompressError("invalid --round-to", expected=">= 1", found=str(self.round_to))
        self.exclude = list(self.exclude)


def check_width(width: float) -> None:
    """A width fraction for `narrow` (and fusion into a narrower model)."""
    if not 0 < width <= 1:
        raise CompressError(f"bad --width {width}", expected="a fraction of the anchor's width in (0, 1]")


@dataclass
class PruneRun(Hardware, DataOptions, PruneConfig):
    """`compress prune`: prune, optionally recover (with KD from the original), measure before / after.

    Example:
        >>> ckpt, result = prune.run("vit.pt", "digits", PruneRun(target_macs=0.5, finetune_epochs=8))
    """

    target_macs: float | None = option(None, "choose the ratio that removes this fraction of the MACs "
                                             "(overrides --ratio; 0 = off)")
    calib: int = option(128, "calibration images (scores, statistics)")
    finetune_epochs: int = option(0, "recovery training after pruning")
    finetune_lr: float = option(1e-3, "recovery learning rate")
    distill_from_original: bool = option(False, "recovery with knowledge distillation from the unpruned model")
    sweep: list[float] | None = option(None, "also measure accuracy (no recovery) at these ratios (alone: "
                                             "0 0.1 ... 0.8)")
    plot: str | None = option(None, "with --sweep: the accuracy-vs-ratio curve as a picture (PNG)",
                              artifact="sweep.png")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        super().__post_init__()
        self.check_hardware()
        self.check_subset()
        for r in self.sweep or []:
            PruneConfig(method=self.method, ratio=r)  # every sweep ratio is checked before any work
        if self.finetune_epochs < 0 or self.calib < 1:
            raise CompressError("invalid recovery or calibration size",
                                expected="--finetune-epochs >= 0, --calib >= 1",
                                found=f"{self.finetune_epochs}, {self.calib}")
        if self.target_macs and not 0.0 < self.target_macs < 1.0:
            raise CompressError("MACs target out of range", expected="0 < target < 1 (the fraction removed)",
                                found=str(self.target_macs))
        self.recovery()

    def recovery(self) -> TrainConfig | None:
        if not self.finetune_epochs:
            return None
        return TrainConfig(epochs=self.finetune_epochs, lr=self.finetune_lr, seed=self.seed, device=self.device,
                           precision=self.precision, workers=self.workers)


STEP = Step("prune", PruneRun, "prune.pipeline:run", "one", "",
            "make a model physically smaller: drop blocks, slice widths, factorise")
