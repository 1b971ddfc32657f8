"""Pruning that yields physically smaller models, a method like the others (beside fuse/, distill/,
quantize/) on the core's alignment layer.

    config.py      PruneConfig (what to prune), PruneRun (the whole command), METHODS, CRITERIA
    pipeline.py    run(checkpoint, data, PruneRun) -> (Checkpoint, Result): prune, recover, measure, sweep
    methods.py     prune() and the registered methods: width, depth, lowrank; ratio_for_macs
    width.py       which units to keep; narrow() (a model at a fraction of its width, for fusion)
    depth.py       block / branch redundancy, greedy removal
    importance.py  unit importance criteria (activation, magnitude, taylor, hessian)
    lowrank.py     (whitened) SVD of Linear layers

Example:
    >>> import prune
    >>> ckpt, result = prune.run("vit.pt", "digits", prune.PruneRun(target_macs=0.5, finetune_epochs=8))
    >>> pruned = prune.prune(model, images, labels, prune.PruneConfig(method="depth", ratio=0.25)).model
"""

from compress.lazy import exports

__getattr__, __all__ = exports(__name__, {
    "run": "pipeline", "PruneRun": "config", "PruneConfig": "config", "METHODS": "config", "CRITERIA": "config",
    "check_width": "config", "Pruned": "methods", "prune": "methods", "ratio_for_macs": "methods",
    "importance": "importance", "kept_units": "width", "narrow": "width",
})
