"""Step kinds: what `compress run` chains and what each subcommand runs, registered with the core.

A `Step` names its config dataclass and its `run(inputs, data, config) -> (Checkpoint, Result)` function.
`train` and `eval` are the core's own; the pipelines (`fuse`, `distill`, `prune`, `quantize`) register
theirs through the `compress.steps` entry-point group (pyproject.toml), so the core never imports a
pipeline and a plugin package can add a step kind the same way. Looking up a kind imports only its
config module (no torch); its run function is imported when it runs.

Example:
    >>> step = STEPS.get("fuse")
    >>> ckpt, result = step(["a.pt", "b.pt"], "digits", step.config(finetune_epochs=4))
"""

from __future__ import annotations

import importlib
import shlex
from dataclasses import dataclass

from .config import DataOptions, Hardware, TrainRun, option, to_argv
from .registry import Registry


@dataclass(frozen=True)
class Step:
    """One kind of step.

    `inputs`: how many checkpoints it takes: "optional" (train: an initial checkpoint or none), "one" or
    "many". `input_flag`: how its command takes them ("--models", "--teacher", "--init", or "" for a
    positional checkpoint). `writes`: whether it makes a new checkpoint (eval passes its input on).
    """

    kind: str
    config: type
    run: str  # "module:function"
    inputs: str
    input_flag: str
    help: str
    writes: bool = True

    def __call__(self, inputs, data, config, **kwargs):
        module, _, fn = self.run.partition(":")
        return getattr(importlib.import_module(module), fn)(inputs, data, config, **kwargs)

    def command(self, inputs: list[str], data: str, config, out: str | None = None) -> str:
        """The `compress` command line that runs this step by itself.

        Example:
            >>> STEPS.get("prune").command(["a.pt"], "digits", PruneRun(ratio=0.3), "p.pt")
            'compress prune a.pt --data digits --ratio 0.3 --out p.pt'
        """
        argv = ["compress", self.kind]
        if inputs:
            argv += ([self.input_flag] if self.input_flag else []) + list(inputs)
        argv += ["--data", data, *to_argv(config)]
        if out and self.writes:
            argv += ["--out", out]
        return shlex.join(argv)


@dataclass
class EvalRun(Hardware, DataOptions):
    """`compress eval`: accuracy, parameters, MACs, size and latency of a checkpoint.

    Example:
        >>> ckpt, result = compress.evaluate.run("a.pt", "digits", EvalRun(latency_runs=10))
    """

    split: str = option("test", "which split to score", choices=("train", "val", "test"))
    latency_runs: int = option(30, "timed forwards at batch 1 (a third of them at batch 32)")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        from .config import validate_choices
        from .errors import CompressError

        validate_choices(self)
        self.check_hardware()
        self.check_subset()
        if self.latency_runs < 1:
            raise CompressError("invalid --latency-runs", expected=">= 1", found=str(self.latency_runs))


STEPS = Registry("step kind", group="compress.steps")
STEPS.register("train")(Step("train", TrainRun, "compress.train:run", "optional", "--init",
                             "train a model from scratch (or from --init) and save a checkpoint"))
STEPS.register("eval")(Step("eval", EvalRun, "compress.evaluate:run", "one", "",
                            "evaluate a checkpoint: accuracy, parameters, MACs, size, latency", writes=False))
