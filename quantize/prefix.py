"""Forwards with one site quantized, without recomputing the float part before it.

Per-site measurements (`keep_better`'s guard, `sensitivity`) run the whole model once per site with only that
site quantized. Every module call that ends before the site's module first starts computes in float, exactly
as in the float pass on the same images. `Prefix` keeps the outputs of the model's units (the root's children
and the members of its module lists, at every depth) from one float pass, and replays the units that ended
before a given module started. On average that skips half of each forward (DeiT-S: the 123 per-site
forwards of the guard run on the blocks after the site only).

A replay is checked once, at the deepest skip, against the float pass; a model whose units have effects
besides their output (state stashed for later modules) fails the check, and then nothing is skipped.

Example:
    >>> prefix = Prefix(qm, images)          # one float pass; prefix.logits are its output
    >>> with prefix.skipping("blocks.7.mlp.fc1"):
    ...     out = qm(images)                 # blocks.0 .. blocks.6 replayed from the float pass
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from compress.alignment.hooks import hooks

BUDGET_BYTES = 2 * 1024**3  # unit outputs kept beyond this are not replayed (recomputed as before)


def _units(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and ("." not in n or n.rsplit(".", 1)[1].isdigit())}


def _tensors(out) -> list[torch.Tensor] | None:
    """The tensors of a unit's output (a tensor or a tuple / list of them), or None when it is anything else."""
    items = out if type(out) in (tuple, list) else [out]
    return list(items) if all(torch.is_tensor(t) for t in items) else None


def _copy(out):
    return out.clone() if torch.is_tensor(out) else type(out)(t.clone() for t in out)


class Prefix:
    """The float outputs of `qm.model`'s units on `images`, in the order their calls ended (one float pass
    through `qm`, whose logits are `self.logits`)."""

    def __init__(self, qm: nn.Module, images: torch.Tensor):
        self.qm, self.images = qm, images
        self.outputs: dict[str, object] = {}
        self.ended: dict[str, int] = {}    # unit -> the event index at which its (only) call ended
        self.started: dict[str, int] = {}  # any module -> the event index at which its first call started
        calls: dict[str, int] = {}
        kept, clock = 0, [0]
        names = {id(m): n for n, m in qm.model.named_modules()}
        units = _units(qm.model)

        def start(module, args):
            self.started.setdefault(names.get(id(module), ""), clock[0])
            clock[0] += 1

        def end(name):
            def hook(module, args, out):
                nonlocal kept
                calls[name] = calls.get(name, 0) + 1
                tensors = _tensors(out)
                size = sum(t.numel() * t.element_size() for t in tensors) if tensors is not None else 0
                if tensors is not None and kept + size <= BUDGET_BYTES:
                    # a copy: the model may write into the output in place later in the pass
                    self.outputs[name], self.ended[name] = _copy(out), clock[0]
                    kept += size
                clock[0] += 1
            return hook

        with hooks(qm.model, pre={n: start for n in names.values()}, post={n: end(n) for n in units}):
            was = qm.floating
            qm.floating = True
            try:
                with torch.no_grad():
                    self.logits = qm(images)
            finally:
                qm.floating = was
        for name, n in calls.items():  # a unit called twice may see quantized inputs on its second call
            if n != 1:
                self.outputs.pop(name, None)
                self.ended.pop(name, None)
        self._check()

    def replayable(self, module: str) -> list[str]:
        """The units whose only call ended before `module`'s first call started."""
        at = self.started.get(module, 0)
        return [u for u, t in self.ended.items() if t < at]

    @contextlib.contextmanager
    def skipping(self, module: str) -> Iterator[None]:
        """Inside the block, the units that ended before `module` started return their float outputs (copies:
        a later module may write into them in place) instead of computing."""
        patched = []
        for name in self.replayable(module):
            unit = self.qm.model.get_submodule(name)
            patched.append((unit, unit.__dict__.get("forward")))
            unit.forward = lambda *args, _out=self.outputs[name], **kwargs: _copy(_out)
        try:
            yield
        finally:
            for unit, own in patched:  # back to the class's forward, or the instance's own
                if own is None:
                    del unit.forward
                else:
                    unit.forward = own

    def _check(self) -> None:
        """Replay the most there is to replay (before the last module to start) and compare with the float
        pass; on any difference, replay nothing."""
        if not self.ended:
            return
        last = max(self.started, key=self.started.get)
        was = self.qm.floating
        self.qm.floating = True
        try:
            with torch.no_grad(), self.skipping(last):
                same = torch.equal(self.qm(self.images), self.logits)
        except Exception:  # noqa: BLE001 - a replay that fails in any way (state a skipped unit would have set)
            same = False
        finally:
            self.qm.floating = was
        if not same:
            self.outputs, self.ended = {}, {}
