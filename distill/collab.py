"""CNN-ViT online collaborative distillation (Zhu et al., "A Good Student is Cooperative and Reliable",
ICCV 2023): a CNN and a ViT trained together from scratch, each teaching the other where it is better.

- HFD (heterogeneous feature distillation): each peer's first-stage map, through a 1x1 adapter, mimics the
  other peer's (MSE, the target detached), in both directions.
- BSD region-wise: the second-stage maps are cut into a grid of regions; in each region the peer with the
  lower loss there teaches the other (adapter + MSE on that region), decided per region and per step.
- BSD pixel-wise (per sample for classification): the learner imitates the peer's prediction (KL) only where
  the peer is reliable (right, and more confident in the true class than the learner) and, by default
  (`pixel_rule="where_wrong"`), where the learner itself is wrong.
- Defaults per task (`COLLAB_DEFAULTS`): for classification a region's direction is decided by the whole
  image's loss; for segmentation the two feature terms are off (measured to cost the CNN peer), and the
  result's notes say so.
- `dml` is plain mutual learning (Zhang et al. 2018): symmetric KL between the peers, no selection.

Only the abstract could be read (../shared/research/hybrid.md): the loss forms, stages, region rule and
reliability rule are our reconstruction, each a config field, listed in docs/ARCHITECTURE.md. For
classification, a region's loss is that of a per-cell linear probe on the detached stage map (each cell
predicts the image's label): a measuring instrument that never trains the peer.

Example:
    >>> ckpt, result = distill.run(None, "digits", DistillRun(student="resnet", peer="vit", method="collab"))
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.checkpoint import Checkpoint, InputSpec, for_task, save, start_from
from compress.data import as_data, spec_of, task_of
from compress.device import device_of, hardware
from compress.ensemble import Ensemble
from compress.errors import CompressError
from compress.measure import complementarity, param_count, score
from compress.result import Result, below_as_printed, measure_rows
from compress.train import rank, train

from .config import DistillRun, register_method
from .distiller import TeacherInput, _Taps
from .losses import resize_map, whiten
from .methods import Method

IGNORE = 255


def region_teachers(e_a: torch.Tensor, e_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per region, which peer teaches: (a teaches b, b teaches a) where its loss is strictly lower; a tie
    transfers nothing.

    Example:
        >>> region_teachers(torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 2.0]]))
        (tensor([[ True, False]]), tensor([[False, False]]))
    """
    return e_a < e_b, e_b < e_a


def reliable(p_teacher: torch.Tensor, p_learner: torch.Tensor, y: torch.Tensor, rule: str) -> torch.Tensor:
    """Where the teacher's prediction is transferred: probabilities (B, C, ...) and labels (B, ...) give a
    mask (B, ...). Rules: `correct` (the teacher's argmax is the label), `confident` (the teacher is more
    confident in the label than the learner), `correct_and_confident` (both), `where_wrong` (both, where the
    learner's own argmax is wrong: only what the learner lacks). Ignored labels never transfer.

    Example:
        >>> p_t = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> p_l = torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.5, 0.5]])
        >>> reliable(p_t, p_l, torch.tensor([0, 0, 0]), "correct_and_confident")
        tensor([ True, False, False])
    """
    valid = y != IGNORE
    yy = y.clamp(0, p_teacher.shape[1] - 1).unsqueeze(1)
    correct = p_teacher.argmax(1) == y
    confident = p_teacher.gather(1, yy).squeeze(1) > p_learner.gather(1, yy).squeeze(1)
    wrong = p_learner.argmax(1) != y
    mask = {"correct": correct, "confident": confident, "correct_and_confident": correct & confident,
            "where_wrong": correct & confident & wrong}[rule]
    return mask & valid


def pixel_kl(z_learner: torch.Tensor, z_teacher: torch.Tensor, mask: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """tau^2 * mean over positions of mask * KL(softmax(z_teacher / tau) || softmax(z_learner / tau)), the
    teacher detached; positions are samples (B, C) or pixels (B, C, H, W)."""
    log_l = F.log_softmax(z_learner / tau, 1)
    p_t = F.softmax(z_teacher.detach() / tau, 1)
    kl = (p_t * (p_t.clamp_min(1e-8).log() - log_l)).sum(1)
    return tau * tau * (kl * mask).mean()


def _adapter(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


class Peers(nn.Module):
    """Two models trained together: `forward(x)` is the student's logits, `forward(x, y)` the sum of both
    peers' losses (every cross-term detaches its target, so each peer's gradient is its own loss's).

    Example:
        >>> peers = Peers(cnn, vit, cnn_spec, vit_spec, DistillRun(student="resnet", peer="vit", method="collab"),
        ...               num_classes=10, task="classification")
        >>> train(peers, data.train, cfg, loss_fn=lambda net, x, y: net(x, y))
    """

    def __init__(self, a: nn.Module, b: nn.Module, a_spec: InputSpec, b_spec: InputSpec, cfg: DistillRun,
                 num_classes: int, task: str):
        super().__init__()
        cfg = cfg.for_task(task)
        self.a, self.b, self.cfg, self.task, self.mode = a, b, cfg, task, cfg.method
        self.b_input = TeacherInput(a_spec, b_spec)
        self.taps = [_Taps(a, a_spec, True, False), _Taps(b, b_spec, True, False)]
        for who, t, arch in zip(("student", "peer"), self.taps, (cfg.student, cfg.peer)):
            if len(t.all) < 2:
                raise CompressError(f"the {who} ({arch}) and its peer's stages cannot be paired",
                                    expected="two or more canonical stages in each (HFD on the first, regions on the "
                                             "second)", found=f"{len(t.all)} in {t.name}")
            t.stages = t.all[:2]
        x = torch.zeros(2, len(a_spec.mean), a_spec.size, a_spec.size, device=device_of(a))
        with torch.no_grad():
            a.eval(), b.eval()
            _, fa, _ = self.taps[0](a, x)
            _, fb, _ = self.taps[1](b, self.b_input(x))
            a.train(), b.train()
        ca, cb = [f.shape[1] for f in fa], [f.shape[1] for f in fb]
        self.side = min(fa[1].shape[-1], fb[1].shape[-1])
        self.grid = min(cfg.region_grid, self.side)
        if self.mode == "collab":  # adapters for the feature terms that are on
            self.a_side, self.b_side = nn.ModuleDict(), nn.ModuleDict()
            for term, i, weight in (("hfd", 0, cfg.hfd_weight), ("region", 1, cfg.region_weight)):
                if weight:
                    self.a_side[term], self.b_side[term] = _adapter(ca[i], cb[i]), _adapter(cb[i], ca[i])
            # per-cell probes that score each region (on detached maps: they never train a peer)
            if task == "classification" and cfg.region_weight and cfg.region_metric == "cell":
                self.a_side["probe"] = nn.Conv2d(ca[1], num_classes, 1)
                self.b_side["probe"] = nn.Conv2d(cb[1], num_classes, 1)
        # transfers counted on the device, read once per epoch: regions b->a, a->b, positions b->a, a->b, totals.
        # Not a buffer: DDP would overwrite every process's counts with rank 0's before each forward.
        self.counts = torch.zeros(6)
        self.history: list[dict] = []

    def param_groups(self, lr: float) -> list[dict]:
        """Each peer (with its own adapters and probe) at its own learning rate: two optimizers in one AdamW."""
        own_a = list(self.a.parameters()) + (list(self.a_side.parameters()) if hasattr(self, "a_side") else [])
        own_b = list(self.b.parameters()) + (list(self.b_side.parameters()) if hasattr(self, "b_side") else [])
        return [{"params": own_a, "lr": lr}, {"params": own_b, "lr": self.cfg.peer_lr or lr}]

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.record(epoch - 1)

    def statistics_forward(self, x: torch.Tensor) -> None:
        """Both peers on a batch (the training loop re-estimates BatchNorm statistics through it), uncounted."""
        self.a(x), self.b(self.b_input(x))

    # The transfer history and the open epoch's counts travel in the state dict, so that a resumed run reports
    # every epoch (the resumable state is saved at an epoch's end, before `record` closes that epoch).
    def get_extra_state(self) -> dict:
        return {"history": list(self.history), "counts": self.counts.tolist()}

    def set_extra_state(self, state: dict) -> None:
        self.history = list(state["history"])
        # the file holds rank 0's open counts (the others' are in no file): summed once in `record`, not per rank
        self.counts = torch.tensor(state["counts"] if rank() == 0 else [0.0] * 6, device=self.counts.device)

    def record(self, epoch: int) -> None:
        """Close an epoch's transfer counts (shares of regions and positions, in each direction), summed over
        the processes of a torchrun run (every process calls it)."""
        self.counts = self.counts.to(next(self.a.parameters()).device)  # NCCL reduces device tensors only
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(self.counts)
        c = self.counts.tolist()
        if c[4] or c[5]:  # the region shares only where the region term is on
            shares = {"regions_b_to_a": round(c[0] / c[4], 4), "regions_a_to_b": round(c[1] / c[4], 4)} if c[4] else {}
            self.history.append({"epoch": epoch + 1, **shares, "positions_b_to_a": round(c[2] / max(c[5], 1), 4),
                                 "positions_a_to_b": round(c[3] / max(c[5], 1), 4)})
        self.counts.zero_()

    def forward(self, x, y=None):
        if y is None:
            return self.a(x)
        za, fa, _ = self.taps[0](self.a, x)
        zb, fb, _ = self.taps[1](self.b, self.b_input(x))
        self.counts = self.counts.to(za.device)  # a no-op once there
        # a ViT's maps are its tokens permuted (channels-last strides): the adapters' weight gradients would
        # follow, and DDP's buckets expect contiguous ones (a warning at every torchrun step, and a copy)
        fa, fb = [f.contiguous() for f in fa], [f.contiguous() for f in fb]
        if self.task == "segmentation" and zb.shape[-2:] != za.shape[-2:]:
            zb = F.interpolate(zb, size=za.shape[-2:], mode="bilinear", align_corners=False)
        ls = self.cfg.label_smoothing
        ce_a = F.cross_entropy(za, y, ignore_index=IGNORE, label_smoothing=ls)
        ce_b = F.cross_entropy(zb, y, ignore_index=IGNORE, label_smoothing=ls)
        tau = self.cfg.pixel_temperature  # one tau for DML's KL and collab's pixel term: only the selection differs
        if self.mode == "dml":
            every = (y != IGNORE).float()
            return ce_a + ce_b + pixel_kl(za, zb, every, tau) + pixel_kl(zb, za, every, tau)
        cfg, zero = self.cfg, za.new_zeros(())
        loss_a, loss_b, probes = ce_a, ce_b, zero
        if cfg.hfd_weight:  # HFD: first-stage maps, each through its adapter at the other's grid and width
            loss_a = loss_a + cfg.hfd_weight * F.mse_loss(resize_map(self.a_side["hfd"](fa[0]), fb[0].shape[-2:]),
                                                          whiten(fb[0]))
            loss_b = loss_b + cfg.hfd_weight * F.mse_loss(resize_map(self.b_side["hfd"](fb[0]), fa[0].shape[-2:]),
                                                          whiten(fa[0]))
        regions = [zero, zero, zero]  # regions b -> a, a -> b, all: counted only where the term is on
        if cfg.region_weight:  # BSD region-wise on the second-stage maps at a common grid
            ma, mb = resize_map(fa[1], (self.side, self.side)), resize_map(fb[1], (self.side, self.side))
            e_a, e_b, probes = self._region_losses(ma, mb, za, zb, y)
            a_teaches, b_teaches = region_teachers(e_a, e_b)
            sq_a = (self.a_side["region"](ma) - whiten(mb)).pow(2).mean(1, keepdim=True)  # a learning from b
            sq_b = (self.b_side["region"](mb) - whiten(ma)).pow(2).mean(1, keepdim=True)
            loss_a = loss_a + cfg.region_weight * (F.adaptive_avg_pool2d(sq_a, self.grid).squeeze(1) * b_teaches).mean()
            loss_b = loss_b + cfg.region_weight * (F.adaptive_avg_pool2d(sq_b, self.grid).squeeze(1) * a_teaches).mean()
            regions = [b_teaches.sum(), a_teaches.sum(), zero + b_teaches.numel()]
        # BSD pixel-wise (per sample for classification)
        with torch.no_grad():
            # the reconstruction's p = softmax(z / tau) decides reliability too (argmax is the same at any tau)
            pa, pb = F.softmax(za / tau, 1), F.softmax(zb / tau, 1)
            b_to_a = reliable(pb, pa, y, cfg.pixel_rule)
            a_to_b = reliable(pa, pb, y, cfg.pixel_rule)
        loss_a = loss_a + cfg.pixel_weight * pixel_kl(za, zb, b_to_a, tau)
        loss_b = loss_b + cfg.pixel_weight * pixel_kl(zb, za, a_to_b, tau)
        with torch.no_grad():
            self.counts += torch.stack([regions[0], regions[1], b_to_a.sum(), a_to_b.sum(), regions[2],
                                        (y != IGNORE).sum()]).float()
        return loss_a + loss_b + probes

    def _region_losses(self, ma, mb, za, zb, y):
        """Per region (B, R, R): each peer's loss there, and the probes' own training loss (classification)."""
        if self.cfg.region_metric == "sample":  # each image's loss decides all its regions
            out = []
            for z in (za, zb):
                ce = F.cross_entropy(z.detach(), y, ignore_index=IGNORE, reduction="none")
                ce = ce.flatten(1).mean(1) if ce.ndim > 1 else ce
                out.append(ce.view(-1, 1, 1).expand(-1, self.grid, self.grid))
            return out[0], out[1], 0.0
        if self.task == "segmentation":
            valid = (y != IGNORE).float().unsqueeze(1)
            out = []
            for z in (za, zb):
                ce = F.cross_entropy(z.detach(), y, ignore_index=IGNORE, reduction="none").unsqueeze(1)
                total = F.adaptive_avg_pool2d(ce * valid, self.grid)
                out.append((total / F.adaptive_avg_pool2d(valid, self.grid).clamp_min(1e-6)).squeeze(1))
            return out[0], out[1], 0.0
        cells = []
        for m, side in ((ma, self.a_side), (mb, self.b_side)):
            z = side["probe"](m.detach())  # (B, classes, S, S): each cell predicts the image's label
            target = y.view(-1, 1, 1).expand(-1, z.shape[-2], z.shape[-1])
            cells.append(F.cross_entropy(z, target, reduction="none"))
        probes = cells[0].mean() + cells[1].mean()
        e = [F.adaptive_avg_pool2d(c.detach().unsqueeze(1), self.grid).squeeze(1) for c in cells]
        return e[0], e[1], probes


def run_collab(inputs, data, cfg: DistillRun, *, state=None, resume: bool = False) -> tuple[Checkpoint, Result]:
    """`compress distill --method collab|dml --student CNN --peer VIT`: both peers trained together (from
    scratch, or each from a checkpoint; a classifier's backbone starts a segmentation peer), and, with
    `cfg.baselines`, each alone and both by plain mutual learning on the same budget. Returns the student's
    checkpoint; the peer's is saved to `cfg.peer_out` (or `<state>.peer.pt`).

    Example:
        >>> ckpt, result = run_collab(None, "digits", DistillRun(student="resnet", peer="vit", method="collab"))
        >>> result["top1"], result["peer_top1"], result["solo_top1"], result["dml_top1"]
    """
    if inputs:
        raise CompressError(f"--method {cfg.method} trains two peers together: it takes no teacher",
                            found=f"--teacher {inputs[0] if isinstance(inputs, (list, tuple)) else inputs}")
    task = task_of(data)
    asked, cfg = cfg, cfg.for_task(task)
    bases = [start_from(name, args, task, flag) for name, args, flag in
             ((cfg.student, cfg.student_args, "--student"), (cfg.peer, cfg.peer_args, "--peer"))]
    specs = [b.input for b in bases]
    if task == "segmentation":  # a CNN backbone works at any size, a ViT's is fixed: fresh peers and a
        # classifier's backbone at the larger one, a segmentation network's checkpoint at its own
        size = max(b.input.size for b in bases)
        specs = [b.input if b.state_dict and b.task == task else InputSpec(size, b.input.mean, b.input.std)
                 for b in bases]
    d = as_data(data, specs[0], task, cfg.subset)
    started = []  # how a checkpoint was made this task's start
    for i, (b, flag) in enumerate(zip(bases, ("--student", "--peer"))):
        try:
            bases[i], note = for_task(b, task, d.num_classes, specs[i].size, cfg.seed + i)
        except CompressError as e:
            raise CompressError(f"{flag}: {e}") from None
        bases[i].input, bases[i].num_classes = specs[i], d.num_classes
        started += note
    names = [b.arch for b in bases]
    metric = "miou" if task == "segmentation" else "top1"
    tcfg = cfg.training()
    hardware(cfg)
    t0 = time.perf_counter()

    def test(model, spec_in=None):
        net = model if spec_in is None else nn.Sequential(spec_in, model)
        return score(net.eval(), d.test, d.num_classes, task)

    def init(i: int) -> nn.Module:
        # each peer from its own seed (or its checkpoint's weights), the same in every row: a peer alone starts
        # where it starts beside the other
        torch.manual_seed(cfg.seed + i)
        return bases[i].build().train() if bases[i].state_dict else bases[i].instantiate()

    def fit(mode: str) -> tuple[Peers, float]:
        a, b = init(0), init(1)
        peers = Peers(a, b, specs[0], specs[1], _with_method(cfg, mode), d.num_classes, task)
        t = time.perf_counter()
        train(peers, d.train, tcfg, loss_fn=lambda net, x, y: net(x, y),
              state_path=f"{state}.{mode}.resume.pt" if state else None, resume=resume,
              description=f"{mode} {names[0]} + {names[1]}")
        peers.record(cfg.epochs - 1)
        return peers, time.perf_counter() - t

    def solo(i: int) -> tuple[nn.Module, float]:
        model = init(i)
        c = cfg.training()
        c.lr = cfg.lr if i == 0 else (cfg.peer_lr or cfg.lr)
        c.label_smoothing = cfg.label_smoothing  # the peers' own cross-entropy: the same objective alone
        t = time.perf_counter()
        train(model, as_data(data, specs[i], task, cfg.subset).train, c,
              state_path=f"{state}.solo{i}.resume.pt" if state else None, resume=resume,
              description=f"alone {bases[i].arch}")
        return model.eval(), time.perf_counter() - t

    main, seconds = fit(cfg.method)
    a, b = main.a.eval(), main.b.eval()
    values = {"method": cfg.method, "student": cfg.student, "peer": cfg.peer, "data": d.name, "metric": metric,
              "epochs": cfg.epochs, metric: test(a), f"peer_{metric}": test(b, main.b_input),
              "train_seconds": round(seconds, 2), "student_params": param_count(a), "peer_params": param_count(b),
              "transfers": main.history}
    models, scores, times = [], {}, {}

    def show(name: str, model: nn.Module, value: float, sec: float) -> None:  # a row of the report's table
        models.append((name, model))
        scores[name], times[name] = value, sec

    show(f"student {names[0]}: {cfg.method}", a, values[metric], seconds)
    show(f"peer {names[1]}: {cfg.method}", b, values[f"peer_{metric}"], seconds)
    solos = []
    if cfg.baselines:
        for i, who in enumerate(("", "peer_")):
            model, sec = solo(i)
            # the peer alone sees the test images as the peer trained with it does: through its input map
            solos.append(model if i == 0 else nn.Sequential(TeacherInput(specs[0], specs[1]), model))
            values[f"{who}solo_{metric}"], values[f"{who}solo_seconds"] = test(solos[i]), round(sec, 2)
            show(f"{('student', 'peer')[i]} {bases[i].arch}: alone", model, values[f"{who}solo_{metric}"], sec)
        # what each peer, trained alone, knows that the other lacks: what collaboration has to pass on
        values[f"solo_ensemble_{metric}"] = test(Ensemble(solos))
        values["only_student_right"], values["only_peer_right"] = complementarity(*solos, d.test, IGNORE)
        if cfg.method != "dml":
            dml, sec = fit("dml")
            values[f"dml_{metric}"], values[f"peer_dml_{metric}"] = test(dml.a), test(dml.b, dml.b_input)
            values["dml_seconds"] = round(sec, 2)
            show(f"student {names[0]}: dml", dml.a.eval(), values[f"dml_{metric}"], sec)
            show(f"peer {names[1]}: dml", dml.b.eval(), values[f"peer_dml_{metric}"], sec)
    notes = started
    notes += defaults_off(asked, task)
    notes += little_to_teach(values, metric)
    notes += peers_below_baselines(values, metric)
    rows = []
    if rank() == 0:
        device = device_of(a)
        rows = (measure_rows([m for m in models if m[0].startswith("student")], d.test, d.num_classes,
                             specs[0].size, task, scores=scores, seconds=times, device=device)
                + measure_rows([m for m in models if m[0].startswith("peer")],
                               as_data(data, specs[1], task, cfg.subset).test, d.num_classes, specs[1].size, task,
                               scores=scores, seconds=times, device=device))
    keys = (metric, f"peer_{metric}", f"solo_{metric}", f"peer_solo_{metric}", f"dml_{metric}", f"peer_dml_{metric}")
    summary = {k: values.get(k) for k in keys}
    parents = [[base] if base.state_dict else [] for base in bases]  # a peer started from a checkpoint
    ckpt = bases[0].derive(a, "distill", parents[0], spec_of(data), cfg, summary, num_classes=d.num_classes)
    peer_path = cfg.peer_out or (f"{Path(str(state)).with_suffix('')}.peer.pt" if state else None)
    if peer_path and rank() == 0:
        save(bases[1].derive(b, "distill", parents[1], spec_of(data), cfg, summary, num_classes=d.num_classes),
             peer_path)
        values["peer_out"] = str(peer_path)
        notes.append(f"peer saved: {peer_path}")
    transfers = {"share of regions / positions taught, per epoch (b = peer, a = student)": main.history}
    return ckpt, Result("distill", metric, values[metric], values, rows, notes, time.perf_counter() - t0, transfers)


def little_to_teach(values: dict, metric: str) -> list[str]:
    """Notes for each peer whose partner, trained alone, knows little it lacks: the two alone models' output
    ensemble is no better than that peer alone. Collaboration cannot be expected to lift it.

    Example:
        >>> little_to_teach({"solo_miou": 26.5, "peer_solo_miou": 14.5, "solo_ensemble_miou": 24.8,
        ...                  "only_student_right": 5.1, "only_peer_right": 0.4}, "miou")[0][:60]
        'trained alone, the two peers ensemble to 24.80 miou, no bett'
    """
    ensemble = values.get(f"solo_ensemble_{metric}")
    if ensemble is None:
        return []
    notes = []
    for who, other, key in (("student", "peer", ""), ("peer", "student", "peer_")):
        alone = values[f"{key}solo_{metric}"]
        if ensemble <= alone:
            notes.append(f"trained alone, the two peers ensemble to {ensemble:.2f} {metric}, no better than the "
                         f"{who} alone ({alone:.2f}): the {other} knows little the {who} lacks (alone it is right on "
                         f"{values[f'only_{other}_right']:.1f}% of the labelled test positions where the {who} is "
                         f"wrong; the {who} on {values[f'only_{who}_right']:.1f}% where the {other} is)")
    return notes


def peers_below_baselines(values: dict, metric: str) -> list[str]:
    """Notes for each peer that ends below a baseline measured in the same run: itself trained alone, or the same
    pair trained by plain mutual learning (scores compared as printed, to two decimals).

    Example:
        >>> peers_below_baselines({"method": "collab", "top1": 99.2, "solo_top1": 98.8, "dml_top1": 99.2,
        ...                  "peer_top1": 95.5, "peer_solo_top1": 95.4, "peer_dml_top1": 96.6}, "top1")[0][:52]
        'the peer trained by collab (95.50) ends below the sa'
    """
    notes = []
    for who, key in (("student", ""), ("peer", "peer_")):
        ours, alone, dml = (values.get(f"{key}{k}{metric}") for k in ("", "solo_", "dml_"))
        partner = "its peer" if who == "student" else "the student"
        if alone is not None and below_as_printed(ours, alone):
            notes.append(f"the {who} trained with {partner} ({ours:.2f}) ends below the same model trained alone "
                         f"({alone:.2f})")
        if dml is not None and below_as_printed(ours, dml):
            notes.append(f"the {who} trained by {values['method']} ({ours:.2f}) ends below the same pair trained by "
                         f"plain mutual learning ({dml:.2f}): --method dml gives the better {who} here")
    return notes


def defaults_off(asked: DistillRun, task: str) -> list[str]:
    """The note saying which collab feature terms the task's defaults turned off (none the user set).

    Example:
        >>> defaults_off(DistillRun(student="resnet", peer="vit", method="collab", hfd_weight=1.0), "segmentation")
        ['segmentation: the region feature term is off by default (...); --region-weight 1 turns it on']
    """
    cfg = asked.for_task(task)
    off = [t for t in ("hfd", "region") if getattr(asked, f"{t}_weight") is None and not getattr(cfg, f"{t}_weight")]
    if asked.method != "collab" or not off:
        return []
    names = " and ".join(t.upper() if t == "hfd" else t for t in off)
    many = len(off) > 1
    return [f"{task}: the {names} feature term{'s are' if many else ' is'} off by default (on digit-scenes they cost "
            f"the CNN peer up to 15 mIoU: docs/BENCHMARKS.md); {' '.join(f'--{t}-weight 1' for t in off)} turns "
            f"{'them' if many else 'it'} on"]


def _with_method(cfg: DistillRun, method: str) -> DistillRun:
    from dataclasses import replace

    return replace(cfg, method=method)


@register_method("collab")
class Collab(Method):
    """CNN-ViT collaborative learning (HFD + BSD): an online method, run by `Peers` (no teacher)."""

    tasks = ("classification", "segmentation")
    online = True

    def loss(self, *args, **kwargs):
        raise CompressError("collab trains two peers together", expected="distill.run with --peer (run_collab)")


@register_method("dml")
class DML(Collab):
    """Deep mutual learning: the two peers' symmetric KL, no selection (collab's baseline)."""
