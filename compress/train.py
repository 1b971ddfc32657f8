"""One training loop for every pipeline: AdamW, one-cycle LR, label smoothing, random shifts.

A run shorter than the BatchNorms' running averages remember (under 44 steps at momentum 0.1) ends by
re-estimating their statistics on the training images, for the weights it ends with.

It saves a resumable state (model, optimizer, scheduler, epoch, RNG) atomically after each epoch, beside
the output, and picks it up with `resume=True`. It runs under torchrun too: with WORLD_SIZE > 1 it wraps
the model in DistributedDataParallel (gloo on CPU) and shards the data.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .batchnorm import batchnorm_outlives, keep_frozen_statistics, reestimate_batchnorm
from .checkpoint import Checkpoint, InputSpec, as_checkpoints, atomic_write, backbone_note, for_task
from .config import TrainConfig, TrainRun
from .data import as_data, spec_of, task_of
from .device import autocast, grad_scaler, hardware
from .errors import CompressError
from .registry import default_img_size, pretrained_input
from .report import progress
from .result import Result, measure_rows

__all__ = ["TrainConfig", "TrainRun", "train", "run", "rank", "random_shift"]


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


def _dist(device: torch.device):
    """(world size, rank) under torchrun: NCCL between GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return world, rank


def _gather(obj, world: int) -> list:
    """`obj` of every process, in rank order (a one-item list without torchrun)."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _read_state(path: Path, world: int, rank: int) -> dict | None:
    """The resumable state, read by rank 0 and sent to the others, so a multi-node run resumes without a
    shared file system and every process agrees on whether there is one."""
    st = torch.load(path, map_location="cpu", weights_only=True) if rank == 0 and path.exists() else None
    if world > 1:
        box = [st]
        torch.distributed.broadcast_object_list(box, src=0)
        st = box[0]
    return st


def rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 writes files."""
    return int(os.environ.get("RANK", "0"))


def train(model: nn.Module, data: Dataset, cfg: TrainConfig, loss_fn=None, state_path: str | Path | None = None,
          resume: bool = False, description: str = "train") -> nn.Module:
    """Train `model` in place on `data` (on `cfg.device`, in `cfg.precision`) and return it, on that device.

    `loss_fn(model, x, y) -> loss` replaces cross-entropy (distillation passes its own). A model may define
    `param_groups(lr)` (parts trained at their own rates), `set_epoch(epoch, epochs)` (called before each
    epoch, resumed runs included) and `statistics_forward(x)` (runs every network it trains, where a short run
    re-estimates BatchNorm statistics; `model(x)` otherwise). With `state_path`,
    a resumable state is written after each epoch and removed at the end. Batches come from pinned memory
    with `cfg.workers` loading processes and move to the device once each.

    Example:
        >>> train(create_model("vit"), load_data("digits", InputSpec(32)).train, TrainConfig(epochs=40))
    """
    device, precision = hardware(cfg)
    world, rank = _dist(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    sampler = (torch.utils.data.distributed.DistributedSampler(data, world, rank, seed=cfg.seed)
               if world > 1 else None)
    shuffle_gen = torch.Generator()  # re-seeded every epoch, so a resumed run sees the same batches
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        generator=shuffle_gen, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise CompressError("too little training data", expected=f"at least batch_size={cfg.batch_size} samples",
                            found=f"{len(data)}")
    model.to(device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    # a model that trains parts at their own rates (collaborative peers) names its parameter groups; AdamW is
    # per parameter, so groups with their own learning rates are independent optimizers in one object
    groups = model.param_groups(cfg.lr) if hasattr(model, "param_groups") else [
        {"params": [p for p in net.parameters() if p.requires_grad], "lr": cfg.lr}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups],
                                                total_steps=cfg.epochs * len(loader), pct_start=0.15)
    scaler = grad_scaler(device, precision)
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y, label_smoothing=cfg.label_smoothing))
    start = 0
    state_path = Path(state_path) if state_path else None
    st = _read_state(state_path, world, rank) if resume and state_path else None
    if st is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if "scaler" in st:
            scaler.load_state_dict(st["scaler"])
        # each process continues its own random streams (its shifts, dropout) where it stopped
        rng, torch_rng = st["rngs"][rank] if len(st.get("rngs", ())) == world else (st["rng"], st["torch_rng"])
        gen.set_state(rng)
        torch.set_rng_state(torch_rng)
        start = int(st["epoch"])
    model.train()
    keep_frozen_statistics(model)  # a frozen backbone's BatchNorms keep their statistics (a linear probe)
    shift = round(cfg.max_shift * loader.dataset[0][0].shape[-1])
    with progress(disable=rank != 0) as bar:
        task = bar.add_task(description, total=cfg.epochs * len(loader), completed=start * len(loader), loss=0.0)
        for epoch in range(start, cfg.epochs):
            shuffle_gen.manual_seed(cfg.seed * 100_003 + epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            if hasattr(model, "set_epoch"):  # schedules that follow the epoch (Hybrid Distill's token masking)
                model.set_epoch(epoch, cfg.epochs)
            finite = torch.ones((), dtype=torch.bool, device=device)  # read once an epoch: no sync per step
            for step, (x, y) in enumerate(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                x, y = random_shift(x, y, shift, gen)
                with autocast(device, precision):
                    loss = loss_fn(net, x, y)
                finite &= torch.isfinite(loss.detach())
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                # reading the loss waits for the device: every tenth step is enough for the display
                shown = {"loss": loss.item()} if step % 10 == 0 or step == len(loader) - 1 else {}
                bar.update(task, advance=1, **shown)
            _check_finite(finite, world, epoch, cfg, precision)  # before the epoch's state replaces the last good one
            if state_path:
                rngs = _gather((gen.get_state(), torch.get_rng_state()), world)
                if rank == 0:
                    st = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": rngs[0][0],
                          "torch_rng": rngs[0][1], "rngs": rngs, "epoch": epoch + 1}
                    atomic_write(state_path, lambda tmp, st=st: torch.save(st, tmp))
    if batchnorm_outlives(model, cfg.epochs * len(loader)):
        # a run shorter than the running averages' memory leaves them holding statistics of the weights it
        # started from: re-estimated for the final ones on the training images (each process on its shard)
        with autocast(device, precision):
            reestimate_batchnorm(model, (x.to(device, non_blocking=True) for x, _ in loader), training_only=True,
                                 forward=getattr(model, "statistics_forward", None))
    if state_path and rank == 0:
        state_path.unlink(missing_ok=True)
    return model.eval()


def _check_finite(finite: torch.Tensor, world: int, epoch: int, cfg: TrainConfig, precision: str) -> None:
    """Refuse to go on from an epoch whose loss was NaN or infinite on any process: its weights are then
    not finite either, and a model trained on from them would be saved and reported as if it had learnt."""
    if world > 1:  # every process stops together, or the others would wait for it forever
        flag = finite.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = flag.bool()
    if not bool(finite):
        fix = f"lower the learning rate, {cfg.lr:g} here" + ("" if precision == "fp32" else " or train in fp32")
        raise CompressError(f"training diverged in epoch {epoch + 1} of {cfg.epochs}", expected="a finite loss",
                            found="NaN or infinity", hint=f"{fix}; the last epoch's resumable state, if any, is kept")


def only_classifier_trains(model: nn.Module) -> None:
    """Freeze everything but the classifier head(s) (timm's `get_classifier`; distilled DeiTs have two), or a
    segmentation network's head (all but its backbone). `train()` keeps the frozen BatchNorms' statistics."""
    from .segmentation import SegmentationNet

    if isinstance(model, SegmentationNet):
        model.requires_grad_(True)
        model.backbone.requires_grad_(False)
        return
    if not hasattr(model, "get_classifier"):
        raise CompressError(f"{type(model).__name__} does not say which layer is its classifier",
                            expected="a timm model (get_classifier)")
    heads = model.get_classifier()
    model.requires_grad_(False)
    for head in heads if isinstance(heads, tuple) else (heads,):
        head.requires_grad_(True)


def segmentation_loss(label_smoothing: float = 0.0):
    return lambda m, x, y: F.cross_entropy(m(x), y, label_smoothing=label_smoothing)


def run(inputs, data, cfg: TrainRun, *, state: str | Path | None = None,
        resume: bool = False) -> tuple[Checkpoint, Result]:
    """Train `cfg.arch` (or the optional input checkpoint) on `data`; returns the checkpoint and its result.

    `state` is where a resumable state is kept (`<state>.resume.pt`, after each epoch); `resume` continues
    from it.

    Example:
        >>> ckpt, result = run(None, "digits", TrainRun(arch="vit", epochs=40))
        >>> save(ckpt, "vit.pt"); result.score
        98.2
    """
    init = as_checkpoints(inputs, at_most=1)
    if not cfg.arch and not init:
        raise CompressError("train needs an architecture or an initial checkpoint",
                            expected="--arch NAME or --init CHECKPOINT")
    base = init[0] if init else None
    if base is not None and cfg.arch and cfg.arch != base.arch:
        raise CompressError(f"--arch {cfg.arch} disagrees with the initial checkpoint", expected=base.arch)
    task = task_of(data)
    hardware(cfg)  # a missing device or an unusable precision is refused before any work
    source = cfg.pretrained_file or cfg.pretrained
    if source and base is not None:
        raise CompressError("pretrained weights start a model of --arch", expected="--pretrained without --init")
    notes = []
    if source:  # fed the way the weights were trained: their size, mean and std
        size, mean, std, classes = pretrained_input(cfg.arch)
        spec = InputSpec(int(cfg.arch_args.get("img_size", size)), mean, std)
    else:
        spec = base.input if base else InputSpec(size=default_img_size(cfg.arch, cfg.arch_args))
    d = as_data(data, spec, task, cfg.subset)
    if base is None:
        base = Checkpoint.create(cfg.arch, d.num_classes, d.task, cfg.arch_args, input=spec, seed=cfg.seed,
                                 pretrained=source)
        if source and d.task == "segmentation":
            notes.append(backbone_note(cfg.arch, "timm's pretrained classifier"))
        elif source and classes != d.num_classes:
            notes.append(f"classifier re-initialised: the weights predict {classes} classes, {d.name} has "
                         f"{d.num_classes}")
    if (base.task, d.task) == ("classification", "segmentation"):  # a classifier's backbone under a fresh head
        base, started = for_task(base, d.task, d.num_classes, seed=cfg.seed)
        notes += started
    if base.num_classes != d.num_classes or base.task != d.task:
        raise CompressError("checkpoint and data disagree", expected=f"{d.num_classes} classes, task {d.task}",
                            found=f"{base.num_classes} classes, task {base.task}")
    model = base.build().train()
    if cfg.head_only:  # a linear probe: the features stay as they are
        only_classifier_trains(model)
    if cfg.objective == "mim":
        return _pretrain_mim(model, base, init, d, data, cfg, state, resume, notes)
    start = time.perf_counter()
    train(model, d.train, cfg, state_path=f"{state}.resume.pt" if state else None, resume=resume,
          description=f"train {base.arch}")
    model.requires_grad_(True)
    seconds = time.perf_counter() - start
    metric = "miou" if d.task == "segmentation" else "top1"
    from .measure import param_count, score

    test, val = score(model, d.test, d.num_classes, d.task), score(model, d.val, d.num_classes, d.task)
    values = {"arch": base.arch, "data": d.name, metric: test, f"val_{metric}": val, "params": param_count(model),
              "epochs": cfg.epochs, "seed": cfg.seed, "train_seconds": round(seconds, 2), "subset": cfg.subset,
              "train_images": len(d.train), "train_counts": d.train_counts}
    rows = measure_rows([(f"{base.arch} trained", model)], d.test, d.num_classes, spec.size, d.task,
                        len(spec.mean), seconds={f"{base.arch} trained": seconds}, scores={f"{base.arch} trained": test}
                        ) if rank() == 0 else []
    ckpt = base.derive(model, "train", init, spec_of(data), cfg, values)
    return ckpt, Result("train", metric, test, values, rows, notes, seconds)


def _pretrain_mim(model, base, init, d, data, cfg: TrainRun, state, resume, notes) -> tuple[Checkpoint, Result]:
    """`--objective mim`: MAE pretraining of `model` (of a segmentation network, its backbone) on the data's
    images, labels unused; the checkpoint is the model with its classifier or segmentation head untouched."""
    from .measure import param_count
    from .mim import MaskedAutoencoder, reconstruction_loss

    encoder = model.backbone if d.task == "segmentation" else model
    mae = MaskedAutoencoder(encoder, cfg.mask_ratio, cfg.decoder_dim, cfg.decoder_depth)
    start = time.perf_counter()
    train(mae, d.train, cfg, loss_fn=lambda net, x, y: net(x), state_path=f"{state}.resume.pt" if state else None,
          resume=resume, description=f"mim {base.arch}")
    seconds = time.perf_counter() - start
    loss = reconstruction_loss(mae, d.test, seed=cfg.seed)
    model = model.requires_grad_(True).eval()
    values = {"arch": base.arch, "data": d.name, "objective": "mim", "mim_loss": round(loss, 5),
              "mask_ratio": cfg.mask_ratio, "params": param_count(model), "decoder_params": param_count(mae) -
              param_count(encoder), "epochs": cfg.epochs, "seed": cfg.seed, "train_seconds": round(seconds, 2),
              "subset": cfg.subset, "train_images": len(d.train)}
    notes.append("masked-image-modelling pretraining: the segmentation head is untrained (finetune with compress "
                 "train --init, or start a collab peer from it)" if d.task == "segmentation" else
                 "masked-image-modelling pretraining: the classifier is untrained (a teacher for --method hybrid's "
                 "--mim-teacher, or finetune with compress train --init)")
    ckpt = base.derive(model, "train", init, spec_of(data), cfg, values)
    return ckpt, Result("train", "mim_loss", round(loss, 5), values, [], notes, seconds)
