"""`compress distill` as a function: the student trained from the teacher, the baselines on the same
budget (scratch, KD), stage CKA, and the measurements.

Example:
    >>> ckpt, result = run("resnet.pt", "digits", DistillRun(student="vit", method="ofa", epochs=8))
    >>> result["top1"], result["scratch_top1"], result["kd_top1"]
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from compress.alignment import align
from compress.checkpoint import Checkpoint, InputSpec, as_checkpoints, for_task, load, save, start_from
from compress.data import as_data, spec_of, task_of
from compress.device import device_of, hardware
from compress.errors import CompressError
from compress.measure import macs, param_count, score
from compress.registry import default_img_size, is_architecture, pretrained_input
from compress.result import Result, batch_of, below_as_printed, measure_rows
from compress.train import only_classifier_trains, rank, train

from .cka import cka_matrix
from .config import METHODS, PEER_METHODS, DistillConfig, DistillRun
from .distiller import Distiller

__all__ = ["run", "DistillRun"]


def run(inputs, data, cfg: DistillRun, *, state: str | Path | None = None,
        resume: bool = False) -> tuple[Checkpoint, Result]:
    """Distill the teacher (the input checkpoint, or with `cfg.train_teacher` an architecture name trained
    here first) into `cfg.student`. `state` keeps resumable states (`<state>.<method>.resume.pt`) and the
    trained teacher (`<state>.teacher.pt`, reused on resume).

    Example:
        >>> ckpt, result = run("resnet.pt", "digits", DistillRun(student="vit", method="ofa", epochs=8))
        >>> result["top1"], result["kd_top1"], result.notes
    """
    if not cfg.student:
        raise CompressError("distill needs a student", expected="--student ARCH (or a checkpoint to start from)")
    if cfg.method in PEER_METHODS:
        from .collab import run_collab

        return run_collab(inputs, data, cfg, state=state, resume=resume)
    task = task_of(data)
    base = start_from(cfg.student, cfg.student_args, task, "--student")
    d = as_data(data, base.input, task, cfg.subset)
    base, started = for_task(base, task, d.num_classes, seed=cfg.seed)
    teacher_ckpt = _teacher(inputs, data, d, base, cfg, state, resume)
    if teacher_ckpt.num_classes != d.num_classes:
        raise CompressError("teacher and data predict different classes", expected=f"{d.num_classes} ({d.name})",
                            found=f"{teacher_ckpt.num_classes} in {teacher_ckpt.source}")
    if teacher_ckpt.task != d.task or base.task != d.task:
        raise CompressError("teacher, student and data disagree on the task", expected=f"{d.task} ({d.name})",
                            found=f"teacher {teacher_ckpt.task}, student {base.task}")
    base.num_classes = d.num_classes
    teacher = teacher_ckpt.build()
    mim_ckpt = load(cfg.mim_teacher) if cfg.mim_teacher else None
    mim = mim_ckpt.build().eval() if mim_ckpt else None
    notes = started
    if cfg.method == "transkd" and teacher_ckpt.arch != base.arch:
        notes.append(f"TransKD pairs one family at two sizes in the paper (MiT-B2 -> B0); across families "
                     f"({teacher_ckpt.arch} -> {base.arch}) it can lose to the student alone (resnet -> "
                     "efficientformer on digit-scenes: -2.4 mIoU, docs/BENCHMARKS.md)")
    metric = "miou" if d.task == "segmentation" else "top1"
    tcfg = cfg.training()
    hardware(cfg)  # a missing device or an unusable precision is refused before any training
    t0 = time.perf_counter()

    def fit(method: str) -> tuple[Distiller, float]:
        torch.manual_seed(cfg.seed)
        student = base.build() if base.state_dict else base.instantiate()
        dc = DistillConfig(**{k: getattr(cfg, k) for k in DistillConfig.__dataclass_fields__} | {"method": method})
        dist = Distiller(student, teacher, dc, base.input, teacher_ckpt.input, d.num_classes,
                         cache_teacher=cfg.cache_teacher and method != "scratch",
                         mim_teacher=mim if method == "hybrid" else None,
                         mim_spec=mim_ckpt.input if mim_ckpt else None)
        t = time.perf_counter()
        train(dist, d.train, tcfg, loss_fn=lambda net, x, y: net(x, y),
              state_path=f"{state}.{method}.resume.pt" if state else None, resume=resume,
              description=f"{method} {base.arch}")
        return dist, time.perf_counter() - t

    main, seconds = fit(cfg.method)
    student = main.student.eval()

    def test(model):
        return score(model, d.test, d.num_classes, d.task)

    seen_by_teacher = nn.Sequential(main.teacher_input, teacher).eval()  # the student's data, as the teacher sees it
    values = {"teacher": teacher_ckpt.source, "student": cfg.student, "method": cfg.method, "data": d.name,
              "metric": metric, "epochs": cfg.epochs, metric: test(student), "train_seconds": round(seconds, 2),
              f"teacher_{metric}": test(seen_by_teacher), "student_params": param_count(student),
              "teacher_params": param_count(teacher), "student_macs": macs(student, base.input.size),
              "teacher_macs": macs(teacher, teacher_ckpt.input.size), "extra_parameters": main.extra_parameters(),
              "reconciled": main.teacher_input.changes, "families": main.shapes.families, "gamma": cfg.gamma,
              "paper_form": cfg.paper_form, "cache_teacher": cfg.cache_teacher}
    notes += [f"teacher input reconciled: {c}" for c in main.teacher_input.changes]
    candidates = ("scratch", "kd", "fd") if cfg.method == "hybrid" else ("scratch", "kd")
    baselines = [m for m in candidates if m != cfg.method and d.task in METHODS.get(m).tasks] \
        if cfg.baselines else []
    models = [(f"teacher {teacher_ckpt.arch}", teacher)]
    scores = {f"teacher {teacher_ckpt.arch}": values[f"teacher_{metric}"]}
    times = {}
    trained = {}
    for m in baselines:
        dist, sec = fit(m)
        trained[m] = dist
        values[f"{m}_{metric}"] = test(dist.student.eval())
        values[f"{m}_seconds"] = round(sec, 2)
        models.append((f"student {base.arch}: {m}", dist.student))
        scores[models[-1][0]], times[models[-1][0]] = values[f"{m}_{metric}"], sec
    models.append((f"student {base.arch}: {cfg.method}", student))
    scores[models[-1][0]], times[models[-1][0]] = values[metric], seconds
    alone = values.get(f"scratch_{metric}")
    if alone is not None and below_as_printed(values[f"teacher_{metric}"], alone, digits=1):
        notes.append(f"the teacher ({values[f'teacher_{metric}']:.1f}%) is weaker than the student trained alone "
                     f"({alone:.1f}%): it can only hold the student back; train the teacher longer or use a "
                     "stronger one")
    notes += below_baselines(values, metric, cfg.method, baselines)
    x = batch_of(d.test, 256).to(device_of(student))
    if cfg.method == "hybrid":
        values.update(_hybrid_values(main, trained.get("fd"), mim, x[:64], base, cfg))
        notes.append(f"hybrid: masking ({cfg.mask_schedule} schedule) removed up to {cfg.mask_max:.0%} of the "
                     f"student's tokens, {values['masking_flops_saving']:.0%} of its training forward FLOPs over the "
                     f"schedule; redundancy scored by the {values['mask_score']} CLS attention")
    nets = [getattr(m, "backbone", m) for m in (teacher, student)]  # a segmentation network's backbone
    with torch.no_grad():
        t_feats = align(nets[0], teacher_ckpt.input.size).features(main.teacher_input(x))
        s_feats = align(nets[1], base.input.size).features(x)
    values["cka"] = [[round(v, 4) for v in row] for row in cka_matrix(t_feats, s_feats)]
    if cfg.cka_plot and rank() == 0:
        plot_cka(values["cka"], cfg.cka_plot, f"CKA {teacher_ckpt.arch} vs {base.arch} ({cfg.method})")
    rows = []
    if rank() == 0:  # the teacher is timed at its own resolution, the students side by side at theirs
        t_in, s_in = teacher_ckpt.input, base.input
        device = device_of(student)
        rows = (measure_rows(models[:1], d.test, d.num_classes, t_in.size, d.task, len(t_in.mean), scores=scores,
                             device=device)
                + measure_rows(models[1:], d.test, d.num_classes, s_in.size, d.task, len(s_in.mean), seconds=times,
                               scores=scores, device=device))
    parents = [teacher_ckpt] + ([base] if base.state_dict else [])
    ckpt = base.derive(student, "distill", parents, spec_of(data), cfg, {
        k: values.get(k) for k in (metric, f"teacher_{metric}", f"scratch_{metric}", f"kd_{metric}")},
        num_classes=d.num_classes)
    cka = {"linear CKA, teacher stages (rows) vs student stages": [
        {"teacher stage": i, **{f"student {j}": v for j, v in enumerate(row)}} for i, row in enumerate(values["cka"])]}
    return ckpt, Result("distill", metric, values[metric], values, rows, notes, time.perf_counter() - t0, cka)


def _hybrid_values(main: Distiller, fd: Distiller | None, mim: nn.Module, x: torch.Tensor, base: Checkpoint,
                   cfg: DistillRun) -> dict:
    """Hybrid's own measurements: the masking's FLOPs saving, and the mean attention distance and query-key
    NMI per head at the relation layers (student, features-only student, MIM teacher): the diversity the paper
    claims."""
    from .hybrid import attention_distances, attention_nmis, masking_flops_saving

    method = main.method
    pairs = method.relation_pairs
    s_layers, t_layers = [s for s, _ in pairs], [t for _, t in pairs]
    measures = {"attention_distance": attention_distances, "attention_nmi": attention_nmis}
    diversity = {}
    for key, measure in measures.items():
        diversity[key] = {"student": measure(main.student, s_layers, x),
                          "mim_teacher": measure(mim, t_layers, main.mim_input(x))}
        if fd is not None:
            diversity[key]["fd_student"] = measure(fd.student, s_layers, x)
    return {"masking_flops_saving": round(masking_flops_saving(main.student, method.student, base.input.size,
                                                               len(base.input.mean), cfg.epochs, cfg.mask_max,
                                                               cfg.mask_full_share,
                                                               method.blocks if method.schedule == "layer" else None),
                                         4),
            "mask_schedule": cfg.mask_schedule,
            "mask_score": method.score_from, "relation_layers": [list(p) for p in pairs],
            **diversity}


# how the report names each baseline's student
BASELINE_NAMES = {"scratch": "trained alone (no teacher)", "kd": "distilled by plain KD (logits only)",
                  "fd": "distilled from the discriminative teacher's features only"}


def below_baselines(values: dict, metric: str, method: str, baselines) -> list[str]:
    """A note for each baseline of the run that ends above the distilled student, as printed (two decimals):
    a method that loses to a simpler one on the same budget says so, and names the command that does better.

    Example:
        >>> note, = below_baselines({"top1": 80.0, "scratch_top1": 82.5, "kd_top1": 79.0}, "top1", "ofa",
        ...                         ["scratch", "kd"])
        >>> note[-48:]
        ': --method scratch gives the better student here'
    """
    ours = values[metric]
    return [f"the student distilled by {method} ({ours:.2f}) ends below the same student {BASELINE_NAMES[m]} "
            f"({values[f'{m}_{metric}']:.2f}): --method {m} gives the better student here"
            for m in baselines if below_as_printed(ours, values[f"{m}_{metric}"])]


def _teacher(inputs, data, d, student: Checkpoint, cfg: DistillRun, state, resume: bool) -> Checkpoint:
    """The teacher checkpoint. An architecture name needs `train_teacher` (trained here from scratch) or
    `pretrained` / `pretrained_file` (timm's published weights; when the data has another class count, the
    re-initialised head is finetuned on it first, the whole teacher with `train_teacher`)."""
    name = inputs[0] if isinstance(inputs, (list, tuple)) and len(inputs) == 1 else inputs
    source = cfg.pretrained_file or cfg.pretrained
    if not cfg.train_teacher and not source:
        if isinstance(name, str) and not Path(name).is_file() and is_architecture(name):
            raise CompressError(f"'{name}' is an architecture, not a trained teacher", expected="a teacher checkpoint",
                                hint=f"train one first (compress train --arch {name} --data {spec_of(data)} --out "
                                     f"teacher.pt), add --train-teacher, or --pretrained / --pretrained-file")
        return as_checkpoints(inputs, at_most=1, at_least=1)[0]
    if not isinstance(name, str) or not is_architecture(name):
        raise CompressError(f"--train-teacher / --pretrained need an architecture name, not '{name}'",
                            expected="an alias, a timm model name or package.module:function")
    path = Path(f"{state}.teacher.pt") if state else None
    if resume and path is not None and path.is_file():
        return load(path)
    if source:
        ckpt = Checkpoint.create(name, d.num_classes, d.task, cfg.teacher_args, seed=cfg.seed, pretrained=source)
        head_only = not cfg.train_teacher and pretrained_input(name)[3] != d.num_classes
        if not cfg.train_teacher and not head_only:
            return ckpt  # published weights for these very classes
    else:
        # a segmentation network works at any size: the teacher sees the student's resolution
        size = student.input.size if d.task == "segmentation" else default_img_size(name, cfg.teacher_args)
        ckpt = Checkpoint.create(name, d.num_classes, d.task, cfg.teacher_args, input=InputSpec(size=size),
                                 seed=cfg.seed)
        head_only = False
    model = ckpt.build().train()
    if head_only:  # the published features stay; only the re-initialised classifier learns the data's classes
        only_classifier_trains(model)
    tc = cfg.teacher_training()
    if d.task == "segmentation":
        tc.label_smoothing = 0.0
    train(model, as_data(spec_of(data), ckpt.input, d.task, cfg.subset).train, tc,
          description=f"teacher {name}" + (" (head)" if head_only else ""))
    model.requires_grad_(True)
    from compress.config import TrainRun

    teacher = ckpt.derive(model, "train", [], spec_of(data), TrainRun(
        arch=name, arch_args=cfg.teacher_args, epochs=tc.epochs, seed=cfg.seed, label_smoothing=tc.label_smoothing,
        subset=cfg.subset, pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file, head_only=head_only))
    if path is not None and rank() == 0:
        save(teacher, path)
        teacher.source = str(path)
    return teacher


def plot_cka(matrix, path: str, title: str) -> None:
    """The teacher-vs-student stage CKA heatmap (PNG)."""
    from compress.plots import figure, save_figure

    fig, a = figure(4, 3.5)
    im = a.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    a.set_xlabel("student stage"), a.set_ylabel("teacher stage"), a.set_title(title, fontsize=8)
    fig.colorbar(im)
    save_figure(fig, path)
