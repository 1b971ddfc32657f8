"""Devices and numeric precision: where a run computes and in which float format.

`--device auto|cpu|cuda|cuda:N|mps` (auto: CUDA, else MPS, else CPU) and `--precision fp32|bf16|fp16`
(autocast; fp16 trains with gradient scaling). A device that is not there, or fp16 on a CPU (autocast has
no fp16 CPU kernels worth using), is a one-line error before any work.

Example:
    >>> dev = resolve_device("auto"); check_precision("bf16", dev)
    >>> with autocast(dev, "bf16"):
    ...     loss = model(x.to(dev)).float().mean()
"""

from __future__ import annotations

import contextlib
import os

import torch

from .config import PRECISIONS, check_device_name
from .errors import CompressError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # per precision name


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device `spec` names, checked to exist here. Under torchrun, `auto` and `cuda` mean this
    process's GPU (`cuda:LOCAL_RANK`).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    check_device_name(spec)
    local = os.environ.get("LOCAL_RANK")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(local) if local else torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None and local:
        device = torch.device("cuda", int(local))
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CompressError(f"--device {spec}: no CUDA GPU here", expected="a machine with a CUDA GPU",
                                hint="use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise CompressError(f"--device {spec}: no such GPU", expected=f"cuda:0 .. cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CompressError("--device mps: MPS is not available here", expected="an Apple-silicon Mac")
    return device


def hardware(cfg) -> tuple[torch.device, str]:
    """(device, precision) of a config with `device` / `precision` fields, checked against this machine."""
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    return device, cfg.precision


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise CompressError(f"unknown precision '{precision}'", expected=" | ".join(PRECISIONS))
    if precision == "fp16" and device.type == "cpu":
        raise CompressError("--precision fp16 on the CPU", expected="fp32 or bf16 on a CPU (fp16 needs a GPU)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CompressError(f"--precision bf16 on {torch.cuda.get_device_name(device)}",
                            expected="a GPU with bfloat16 (Ampere or newer)", hint="use fp16")


def autocast(device: torch.device, precision: str):
    """Autocast to `precision` on `device` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Gradient scaling for fp16 (bf16 and fp32 need none: the scaler is then disabled, a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (before reading a clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters (or buffers) are; CPU for a model without tensors."""
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")
