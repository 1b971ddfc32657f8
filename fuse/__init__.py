"""OT fusion: merge two or more trained models of one architecture into one (see fusion.py)."""

from .fusion import (
    Ensemble,
    FuseConfig,
    FuseReport,
    align_to,
    check_width,
    fuse_models,
    narrow,
    recompute_batchnorm,
    vanilla_average,
)
from .transport import correlation_cost, solve

__all__ = ["FuseConfig", "FuseReport", "align_to", "fuse_models", "narrow", "check_width", "vanilla_average",
           "recompute_batchnorm", "Ensemble", "solve", "correlation_cost"]
