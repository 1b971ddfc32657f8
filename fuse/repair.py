"""REPAIR (Jordan et al., ICLR 2023) for fused networks without BatchNorm.

Averaging two aligned neurons shrinks the variance of their output wherever the parents disagree
("variance collapse"); in a transformer that flattens the attention logits and starves every later layer.
REPAIR gives each output unit of every Linear layer back the statistics its parents had: the mean and
standard deviation over the calibration images become the average of the parents' (already transported
into the fused basis), by an affine change of the layer's own weights and bias, so the fused model keeps
its architecture. BatchNorm networks get the same effect from recomputed BatchNorm statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.alignment.hooks import evaluating, hooks


def unit_stats(models: list[nn.Module], names: list[str], images: torch.Tensor, batch_size: int = 32) -> list[dict]:
    """Per model, {layer name: (mean, std)} of each output unit (the last axis) over `images`, accumulated
    batch by batch (memory: one batch's activations, whatever the number of images)."""
    return [_stats(model, names, images, batch_size) for model in models]


def _stats(model: nn.Module, names: list[str], images: torch.Tensor, batch_size: int) -> dict:
    # running sums only, taken inside the hook: taps.hooked_outputs would hold every layer's full output at once
    sums: dict[str, list] = {}

    def keep(name):
        def hook(module, args, output):  # returns None: the output is left as it is
            if name in seen:  # a module called twice: its first call, as in `repair`
                return
            seen.add(name)
            # the batch's own mean and spread (two passes in float32, no cancellation), merged into the running
            # ones in float64 by Chan et al.'s pairwise update
            flat = output.detach().float().reshape(-1, output.shape[-1])
            var, mean = torch.var_mean(flat, dim=0, correction=0)
            n_b, mean, m2 = flat.shape[0], mean.double(), var.double() * flat.shape[0]
            if name not in sums:
                sums[name] = [n_b, mean, m2]
                return
            n_a, mean_a, m2_a = sums[name]
            delta, n = mean - mean_a, n_a + n_b
            sums[name] = [n, mean_a + delta * (n_b / n), m2_a + m2 + delta**2 * (n_a * n_b / n)]
        return hook

    for batch in images.split(batch_size):
        seen: set[str] = set()
        _run_hooked(model, names, keep, batch)
    return {name: (mean.float(), (m2 / max(n - 1, 1)).sqrt().float()) for name, (n, mean, m2) in sums.items()}


def repair(fused: nn.Module, parents: list[nn.Module], images: torch.Tensor, correction_images: int = 64) -> int:
    """Rescale every hidden Linear layer of `fused` in place so that each output unit's mean and standard
    deviation equal the average of the same unit in `parents` (models in the fused basis). Parents and fused
    model are measured on the same first `correction_images` of `images`; the layers are corrected in forward
    order within one pass, each seeing the corrected layers before it. The moments of 64 images x their
    tokens are settled, and taking both sides from the same images leaves no sampling difference between
    target and measurement (digits ViTs one-shot: 39.13 vs 36.27 with the parents' moments over all 256
    calibration images; docs/ARCHITECTURE.md). The classifiers are left alone. Returns the number of layers
    corrected.

    Example:
        >>> repair(fused, [parent_a_aligned, parent_b], calib_images)
        16
    """
    heads = _classifiers(fused)
    names = [n for n, m in fused.named_modules() if isinstance(m, nn.Linear) and not any(m is h for h in heads)]
    images = images[:correction_images]
    targets = unit_stats(parents, names, images)
    done: set[str] = set()

    def correct(name):
        def hook(module, args, output):
            if name in done:  # a module called twice keeps its first correction
                return None
            done.add(name)
            mean, std = _moments(output)
            t_mean = torch.stack([t[name][0] for t in targets]).mean(0)
            t_std = torch.stack([t[name][1] for t in targets]).mean(0)
            scale = t_std / std.clamp_min(1e-6)
            with torch.no_grad():
                module.weight.mul_(scale[:, None])
                if module.bias is not None:  # without a bias only the spread can be restored
                    module.bias.copy_(scale * (module.bias - mean) + t_mean)
                if type(module) is not nn.Linear:  # a subclass may compute more than x W^T + b: run it again
                    return module(*args)
                # the layers after this one see its corrected output, x (s W)^T + s (b - mean) + t_mean, which is
                # the output already computed, moved: no second run of the layer
                moved = (output - mean) * scale + t_mean if module.bias is not None else output * scale
                return moved.to(output.dtype)

        return hook

    _run_hooked(fused, names, correct, images)
    return len(done)


def _run_hooked(model: nn.Module, names: list[str], make_hook, images: torch.Tensor) -> None:
    """One eval-mode, gradient-free forward with `make_hook(name)` as the forward hook of each named module."""
    with hooks(model, post={n: make_hook(n) for n in names}), evaluating(model), torch.no_grad():
        model(images)


def _moments(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    std, mean = torch.std_mean(output.detach().float().reshape(-1, output.shape[-1]), dim=0)
    return mean, std


def _classifiers(model: nn.Module) -> list[nn.Module]:
    """The output heads (timm's get_classifier: one head, or a tuple as in distilled DeiTs)."""
    get = getattr(model, "get_classifier", None)
    heads = get() if callable(get) else ()
    return list(heads) if isinstance(heads, tuple) else [heads]
