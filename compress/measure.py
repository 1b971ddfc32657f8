"""Measurements: accuracy, mIoU, parameters, MACs, file size and latency, all measured, never assumed."""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .device import device_of, synchronize


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, batch_size: int = 256):
    """Yield (outputs, targets) batches with the model in eval mode, on the model's device."""
    model.eval()
    device = device_of(model)
    for x, y in DataLoader(data, batch_size=batch_size, pin_memory=device.type == "cuda"):
        yield model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)


def top1(model: nn.Module, data: Dataset) -> float:
    """Top-1 accuracy in percent."""
    correct = total = 0
    for out, y in predict(model, data):
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(total, 1)


def miou(model: nn.Module, data: Dataset, num_classes: int) -> float:
    """Mean intersection-over-union in percent, over classes present in targets or predictions."""
    inter = torch.zeros(num_classes, device=device_of(model))
    union = torch.zeros(num_classes, device=device_of(model))
    for out, y in predict(model, data, batch_size=64):
        p = out.argmax(1)
        for c in range(num_classes):
            pc, yc = p == c, y == c
            inter[c] += (pc & yc).sum()
            union[c] += (pc | yc).sum()
    present = union > 0
    return 100.0 * (inter[present] / union[present]).mean().item()


def top1_by_class(model: nn.Module, data: Dataset, num_classes: int) -> tuple[float, list[float]]:
    """Top-1 overall and per class (percent; NaN for a class with no test image).

    Example:
        >>> overall, per_class = top1_by_class(model, data.test, 10)
    """
    right = seen = torch.zeros(num_classes, device=device_of(model))
    for out, y in predict(model, data):
        hit = (out.argmax(1) == y).float()
        right = right.index_add(0, y, hit)
        seen = seen.index_add(0, y, torch.ones_like(hit))
    return 100.0 * right.sum().item() / max(seen.sum().item(), 1), (100.0 * right / seen).tolist()


def score(model: nn.Module, data: Dataset, num_classes: int, task: str = "classification") -> float:
    """The task's test metric in percent: mIoU for segmentation, top-1 otherwise."""
    return miou(model, data, num_classes) if task == "segmentation" else top1(model, data)


@torch.no_grad()
def complementarity(a: nn.Module, b: nn.Module, data: Dataset, ignore_index: int = 255) -> tuple[float, float]:
    """What each of two models knows that the other does not: of the labelled test positions (images, or
    pixels for segmentation), the percent only `a` gets right and the percent only `b` gets right.

    Example:
        >>> only_cnn, only_vit = complementarity(cnn, vit, data.test)
    """
    counts = torch.zeros(3, device=device_of(a))  # only a, only b, labelled
    for (za, y), (zb, _) in zip(predict(a, data), predict(b, data)):
        ra, rb, seen = za.argmax(1) == y, zb.to(za.device).argmax(1) == y, y != ignore_index
        counts += torch.stack([(ra & ~rb & seen).sum(), (rb & ~ra & seen).sum(), seen.sum()]).float()
    only_a, only_b, seen = counts.tolist()
    return 100.0 * only_a / max(seen, 1), 100.0 * only_b / max(seen, 1)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def macs(model: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward at batch 1 (torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(1, in_chans, input_size, input_size, device=device_of(model)))
    return counter.get_total_flops() // 2


@contextmanager
def threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def latency_ms(model: nn.Module, input_size: int, batch: int = 1, warmup: int = 5, runs: int = 30,
               num_threads: int | None = None, in_chans: int = 3) -> float:
    """Median wall-clock milliseconds of one forward at `batch`, after warm-up, on the model's device (which
    is synchronised before each clock reading)."""
    model.eval()
    device = device_of(model)
    x = torch.randn(batch, in_chans, input_size, input_size, device=device)
    with threads(num_threads):
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(runs):
            synchronize(device)
            t = time.perf_counter()
            model(x)
            synchronize(device)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def compare_latency(models: list[nn.Module], input_size: int | list[int], batch: int = 1, rounds: int = 3,
                    runs: int = 20, num_threads: int | None = None, in_chans: int | list[int] = 3) -> list[float]:
    """Median latency (ms) of each model, measured in interleaved rounds so that load on the machine
    affects every model alike; a ratio of two entries is a side-by-side measurement. `input_size` and
    `in_chans` may be one per model."""
    sizes = input_size if isinstance(input_size, list) else [input_size] * len(models)
    chans = in_chans if isinstance(in_chans, list) else [in_chans] * len(models)
    per = [[] for _ in models]
    for _ in range(rounds):
        for i, m in enumerate(models):
            per[i].append(latency_ms(m, sizes[i], batch, warmup=3, runs=runs, num_threads=num_threads,
                                     in_chans=chans[i]))
    return [statistics.median(p) for p in per]


def file_size(path) -> int:
    return os.path.getsize(path)
