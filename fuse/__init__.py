"""OT fusion: merge two or more trained models of one architecture into one.

    config.py     FuseConfig (how to fuse), FuseRun (the whole command), SOLVERS
    pipeline.py   run(models, data, FuseRun) -> (Checkpoint, Result): fusion, baselines, finetune, report
    fusion.py     align_to, fuse_models, vanilla_average, recompute_batchnorm
    transport.py  pure OT: correlation cost, EMD / Sinkhorn / Hungarian, weight maps
    stats.py      two models in lockstep through their aten graphs; correlations per space
    streams.py    the paper's per-sublayer residual maps
    repair.py     REPAIR

Example:
    >>> import fuse
    >>> ckpt, result = fuse.run(["a.pt", "b.pt"], "digits", fuse.FuseRun(ground="wts", finetune_epochs=4))
    >>> compress.save(ckpt, "fused.pt"); result["ot_finetuned"]
"""

from compress.lazy import exports

__getattr__, __all__ = exports(__name__, {
    "run": "pipeline", "FuseRun": "config", "FuseConfig": "config", "SOLVERS": "config", "check_width": "config",
    "FuseReport": "fusion", "align_to": "fusion", "fuse_models": "fusion", "vanilla_average": "fusion",
    "recompute_batchnorm": "fusion", "solve": "transport", "correlation_cost": "transport",
})
