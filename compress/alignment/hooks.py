"""Forward hooks, installed for the duration of a `with` block and always removed: the one way the library
watches a module's inputs and outputs.

Example:
    >>> seen = {}
    >>> with hooks(model, post={"blocks.0": lambda m, args, out: seen.update(out=out)}), evaluating(model):
    ...     model(x)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

from ..errors import CompressError


@contextlib.contextmanager
def hooks(model: nn.Module, pre: dict[str, Callable] | None = None, post: dict[str, Callable] | None = None,
          with_kwargs: bool = False) -> Iterator[None]:
    """Pre-forward hooks `pre[name](module, args)` and forward hooks `post[name](module, args, output)` on
    the named submodules ("" is the model itself); with `with_kwargs`, keyword arguments come after args
    (`(module, args, kwargs)` and `(module, args, kwargs, output)`). A name that is not a submodule is a
    clear error."""
    modules = dict(model.named_modules(remove_duplicate=False))  # a module shared by two parents has two names
    pre, post = pre or {}, post or {}
    missing = [n for n in [*pre, *post] if n not in modules]
    if missing:
        raise CompressError("hooked module not found", expected="a submodule name", found=", ".join(missing[:5]))
    handles = [modules[n].register_forward_pre_hook(fn, with_kwargs=with_kwargs) for n, fn in pre.items()]
    handles += [modules[n].register_forward_hook(fn, with_kwargs=with_kwargs) for n, fn in post.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block, its own mode restored after (dropout off, BatchNorm frozen)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def drop_eval_caches(model: nn.Module) -> None:
    """Make modules drop what they cache in eval mode (timm's EfficientFormer caches its attention-bias
    gather), keeping eval mode: a cache built while gradients are recorded would tie two backward passes
    to one graph, and one built without them would hide those parameters from the gradient."""
    model.train()
    model.eval()
