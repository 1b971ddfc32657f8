"""One training loop for every pipeline: AdamW, one-cycle LR, label smoothing, random shifts.

It saves a resumable state (model, optimizer, scheduler, epoch, RNG) atomically after each epoch, beside
the output, and picks it up with `resume=True`. It runs under torchrun too: with WORLD_SIZE > 1 it wraps
the model in DistributedDataParallel (gloo on CPU) and shards the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import atomic_write
from .errors import CompressError
from .report import progress


@dataclass
class TrainConfig:
    """Training hyper-parameters; the defaults reach >= 95% on digits with the small ViT and ResNet.

    Example:
        >>> TrainConfig(epochs=40, lr=2e-3)
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    max_shift: float = 1 / 16  # random translation, as a fraction of the image side
    seed: int = 0
    workers: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise CompressError("invalid training config", expected="epochs >= 1, batch_size >= 1, lr > 0",
                                found=f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}")


def random_shift(x: torch.Tensor, y: torch.Tensor, max_px: int, gen: torch.Generator):
    """Shift each image (and its mask, for segmentation) by up to `max_px` pixels, padding with the border."""
    if max_px < 1:
        return x, y
    n, _, h, w = x.shape
    pad = F.pad(x, (max_px,) * 4, mode="replicate")
    ypad = F.pad(y, (max_px,) * 4, value=0) if y.ndim == 3 else None
    offs = torch.randint(0, 2 * max_px + 1, (n, 2), generator=gen)
    xs = torch.stack([pad[i, :, r:r + h, c:c + w] for i, (r, c) in enumerate(offs.tolist())])
    if ypad is None:
        return xs, y
    return xs, torch.stack([ypad[i, r:r + h, c:c + w] for i, (r, c) in enumerate(offs.tolist())])


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return world, rank


def train(model: nn.Module, data: Dataset, cfg: TrainConfig, loss_fn=None, state_path: str | Path | None = None,
          resume: bool = False, description: str = "train") -> nn.Module:
    """Train `model` in place on `data` and return it.

    `loss_fn(model, x, y) -> loss` replaces cross-entropy (distillation passes its own). With `state_path`,
    a resumable state is written after each epoch and removed at the end.

    Example:
        >>> train(create_model("vit"), load_data("digits", InputSpec(32)).train, TrainConfig(epochs=40))
    """
    world, rank = _dist()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    sampler = (torch.utils.data.distributed.DistributedSampler(data, world, rank, seed=cfg.seed)
               if world > 1 else None)
    shuffle_gen = torch.Generator()  # re-seeded every epoch, so a resumed run sees the same batches
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        generator=shuffle_gen, num_workers=cfg.workers)
    if len(loader) == 0:
        raise CompressError("too little training data", expected=f"at least batch_size={cfg.batch_size} samples",
                            found=f"{len(data)}")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * len(loader),
                                                pct_start=0.15)
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y, label_smoothing=cfg.label_smoothing))
    start = 0
    state_path = Path(state_path) if state_path else None
    if resume and state_path and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        gen.set_state(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        start = int(st["epoch"])
    model.train()
    with progress(disable=rank != 0) as bar:
        task = bar.add_task(description, total=cfg.epochs * len(loader), completed=start * len(loader), loss=0.0)
        for epoch in range(start, cfg.epochs):
            shuffle_gen.manual_seed(cfg.seed * 100_003 + epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            for x, y in loader:
                x, y = random_shift(x, y, round(cfg.max_shift * x.shape[-1]), gen)
                loss = loss_fn(net, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(task, advance=1, loss=loss.item())
            if state_path and rank == 0:
                st = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "rng": gen.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch + 1}
                atomic_write(state_path, lambda tmp, st=st: torch.save(st, tmp))
    if state_path and rank == 0:
        state_path.unlink(missing_ok=True)
    return model.eval()


def segmentation_loss(label_smoothing: float = 0.0):
    return lambda m, x, y: F.cross_entropy(m(x), y, label_smoothing=label_smoothing)
