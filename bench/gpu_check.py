"""GPU check (issue 19): training and distillation step time on a CUDA GPU against the CPU, and bf16 / fp16
against fp32, through the library's own loop (`compress.train.train`, `--device`, `--precision`).

Each row trains a fresh model after a one-epoch warm-up of another one (kernel selection, allocator), times
whole epochs with the device synchronised, and divides by the steps; top-1 is on the digits test split.

Run on a machine with a CUDA GPU:  python bench/gpu_check.py --out gpu_check.json [--cpu-threads 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import InputSpec, create_model  # noqa: E402
from compress.config import TrainConfig  # noqa: E402
from compress.data import load_data  # noqa: E402
from compress.device import synchronize  # noqa: E402
from compress.measure import top1  # noqa: E402
from compress.train import train  # noqa: E402
from distill import DistillConfig, Distiller  # noqa: E402

SLIM_RESNET = {"channels": (16, 32, 64, 128)}


def timed(build, data, cfg: TrainConfig, loss_fn=None) -> tuple[float, object]:
    """Seconds per step of `cfg.epochs` epochs of a fresh model, after a one-epoch warm-up of another."""
    train(build(), data, TrainConfig(**{**vars(cfg), "epochs": 1}), loss_fn=loss_fn, description="warm-up")
    model = build()
    device = torch.device("cuda") if cfg.device.startswith("cuda") else torch.device(cfg.device)
    synchronize(device)
    t = time.perf_counter()
    train(model, data, cfg, loss_fn=loss_fn, description=f"{cfg.device} {cfg.precision}")
    synchronize(device)
    steps = cfg.epochs * (len(data) // cfg.batch_size)
    return (time.perf_counter() - t) / steps, model


def row(task: str, device: str, precision: str, seconds: float, model, test) -> dict:
    net = getattr(model, "student", model)
    r = {"task": task, "device": device, "precision": precision, "step_ms": round(seconds * 1e3, 2),
         "top1": round(top1(net, test), 2)}
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    ap.add_argument("--tasks", nargs="+", default=["vit", "deit", "distill"])
    args = ap.parse_args()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    rows = [{"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
             "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}]
    digits = load_data("digits", InputSpec(size=32))
    runs = [(d, p) for d, p in [("cpu", "fp32"), ("cpu", "bf16"), ("cuda", "fp32"), ("cuda", "bf16"), ("cuda", "fp16")]
            if d in args.devices]

    # 1. the small ViT on digits (0.46 M parameters, 32 px, batch 64)
    for device, precision in runs if "vit" in args.tasks else []:
        cfg = TrainConfig(epochs=args.epochs, seed=0, device=device, precision=precision)
        sec, model = timed(lambda: create_model("vit", num_classes=10), digits.train, cfg)
        rows.append(row("train vit (digits, 32 px)", device, precision, sec, model, digits.test))

    # 2. DeiT-S at 224 px (22 M parameters, batch 64): the size users train; the CPU timed on fewer steps
    big = load_data("digits", InputSpec(size=224)) if "deit" in args.tasks else None
    subset = torch.utils.data.Subset(big.train, range(320)) if big else None
    for device, precision in runs if big else []:
        cfg = TrainConfig(epochs=1, seed=0, device=device, precision=precision, max_shift=0.0)
        sec, model = timed(lambda: create_model("deit_small_patch16_224", num_classes=10), subset, cfg)
        rows.append(row("train deit_small (224 px, 5 steps/epoch)", device, precision, sec, model, big.test))

    # 3. OFA-KD, slim ResNet teacher -> the small ViT (teacher forward + student + exit branches)
    teacher = create_model("resnet", num_classes=10, **SLIM_RESNET)
    if "distill" in args.tasks:
        train(teacher, digits.train, TrainConfig(epochs=5, seed=0))
    teacher = teacher.cpu().eval()
    spec = InputSpec(size=32)
    for device, precision in runs if "distill" in args.tasks else []:
        cfg = TrainConfig(epochs=args.epochs, seed=0, device=device, precision=precision)

        def build():
            return Distiller(create_model("vit", num_classes=10), teacher, DistillConfig("ofa"), spec, spec, 10)

        sec, dist = timed(build, digits.train, cfg, loss_fn=lambda net, x, y: net(x, y))
        rows.append(row("distill ofa resnet -> vit (digits)", device, precision, sec, dist, digits.test))
        teacher.cpu()
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
