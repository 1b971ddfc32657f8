"""OT fusion of two or more models of one architecture (OTFusion; Transformer Fusion with OT).

Every non-anchor model is moved into the anchor's neuron basis, space by space (spaces come from the
alignment layer, so residual streams, heads, norms, tokens and biases move together), then all aligned
models are averaged with equal weights. Ground costs come from activation correlations streamed over the
calibration data (`ground="acts"`). BatchNorm statistics are recomputed on the fused model.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from compress.alignment import axes as ax
from compress.alignment.blocks import find_blocks
from compress.alignment.graph import state_tensors
from compress.alignment.spaces import Space, SpaceGraph, find_spaces
from compress.batchnorm import reestimate_batchnorm
from compress.device import DTYPES
from compress.errors import CompressError

from .config import FuseConfig
from .regmean import regmean_state
from .repair import repair
from .stats import cross_statistics
from .streams import stream_couplings
from .transport import Solution, correlation_cost, partners, solve, weight_maps


@dataclass
class FuseReport:
    seconds_trace: float = 0.0
    seconds_stats: float = 0.0
    seconds_solve: float = 0.0
    seconds_apply: float = 0.0
    seconds_repair: float = 0.0
    repaired: int = 0  # Linear layers whose output statistics REPAIR restored
    regmean: int = 0  # Linear layers merged by RegMean
    seconds_regmean: float = 0.0
    spaces: int = 0
    unmatched: list[str] = field(default_factory=list)  # spaces no activation site carried (left as they are)
    unaligned: list[str] = field(default_factory=list)  # spaces the invariance check dropped (averaged as they are)
    fallbacks: list[str] = field(default_factory=list)
    maps: dict = field(default_factory=dict, repr=False)  # space name -> latest coupling, for plots

    @property
    def partners(self) -> float:
        """Mean effective partners per neuron over the latest map of each space (1 = hard)."""
        if not self.maps:
            return 1.0
        return float(sum(partners(t) for t in self.maps.values()) / len(self.maps))

    @property
    def in_place(self) -> float:
        """Share of the units (over the latest map of each square space) whose mass stays at their own index:
        about 1 when the parents share their start (finetuned from the same weights), about 1/n when not."""
        square = [t for t in self.maps.values() if t.shape[0] == t.shape[1]]
        if not square:
            return 0.0
        kept = sum(int((t.argmax(1) == torch.arange(len(t), device=t.device)).sum()) for t in square)
        return kept / sum(len(t) for t in square)


# Correlations closer than RESOLUTION are ties (float32 moments of a permuted copy's own neurons come out
# 1e-6 apart, and the cost's square root turns that into 1e-3). Where a space has ties, its correlations are
# rounded to RESOLUTION and the weight cost (scaled to max 1), times TIE_BREAK, orders the tied partners: below
# the cost of one RESOLUTION step anywhere, so it never outweighs a measured difference.
RESOLUTION = 1e-4
TIE_BREAK = 1e-5


def calibration_batches(images: torch.Tensor, cfg: FuseConfig) -> list[torch.Tensor]:
    """Up to `cfg.calib` images in equal batches of `cfg.batch_size` (the traced graph fixes the batch size;
    a remainder is left out), or all of them in one batch when there are fewer: a user who can pool only 27
    images fuses on those 27.

    Example:
        >>> [len(b) for b in calibration_batches(torch.randn(27, 3, 32, 32), FuseConfig())]
        [27]
    """
    n = min(len(images), cfg.calib)
    if n == 0:
        raise CompressError("no calibration images", expected=">= 1 image", found="0")
    size = min(n, cfg.batch_size)
    return list(images[: n // size * size].split(size))


def align_to(model: nn.Module, anchor: nn.Module, batches: list[torch.Tensor], cfg: FuseConfig,
             report: FuseReport | None = None) -> dict[str, torch.Tensor]:
    """`model`'s state dict moved into `anchor`'s neuron basis (shapes become the anchor's).

    Example:
        >>> aligned = align_to(model_a, model_b, calibration_batches(x, cfg), cfg)
        >>> fused = {k: (aligned[k] + model_b.state_dict()[k]) / 2 for k in aligned}
    """
    report = report or FuseReport()
    t = time.perf_counter()
    sg_m = find_spaces(model, batches[0])
    # one architecture: the anchor takes the model's verdict on its spaces (the check perturbs weights, so it
    # depends on the structure only); another one (a wider anchor) is checked on its own
    same = [(k, v.shape) for k, v in model.state_dict().items()] == [(k, v.shape) for k, v in anchor.state_dict().items()]
    sg_a = find_spaces(anchor, batches[0], verify=sg_m if same else True)
    report.seconds_trace += time.perf_counter() - t
    report.unaligned += [n for n in dict.fromkeys(sg_m.rejected + sg_a.rejected) if n not in report.unaligned]
    if cfg.ground == "wts":
        # every tensor that shapes the function, non-persistent buffers too (BEiT's zero k_bias is in its spaces)
        maps = weight_matching(sg_m, sg_a, state_tensors(model), state_tensors(anchor), cfg, report)
        return _apply(sg_m, model, anchor, maps, report)
    t = time.perf_counter()
    stats = cross_statistics(sg_m, sg_a, state_tensors(model), state_tensors(anchor), batches, cfg.tokens,
                             cfg.window, sublayers=cfg.residual != "shared", attention=cfg.attention,
                             product_dtype=DTYPES[cfg.stats_precision])
    report.seconds_stats += time.perf_counter() - t
    t = time.perf_counter()

    def coupling(st, name: str) -> torch.Tensor:
        return _record(solve(correlation_cost(st.correlation()), cfg.solver, cfg.softness), name, report).coupling

    state_m, state_a = state_tensors(model), state_tensors(anchor)
    anchor_spaces = {s.name: s for s in sg_a.spaces}
    maps = {}
    for space in sg_m.spaces:  # in forward order: a weight cost sees the maps of the spaces before it
        if space.id not in stats.spaces:
            if space.name not in anchor_spaces:
                report.unmatched.append(space.name)
                continue
            # no activation carries it (a relative-position MLP run on a constant coordinate table, not on
            # the images): its weights are all there is to match it on
            report.fallbacks.append(f"{space.name}: no activation of the calibration images carries it; "
                                    "matched on weights")
            cost = weight_cost(sg_m, sg_a, space, anchor_spaces[space.name], state_m, state_a, maps,
                               _comparable(sg_m, space, maps))
            maps[space.id] = _record(solve(cost, cfg.solver, cfg.softness), space.name, report).maps()
            continue
        st = stats.spaces[space.id][1]
        corr = st.correlation()
        flat = max(st.degenerate[0] / st.n_a, st.degenerate[1] / st.n_b)
        width = max(st.n_a, st.n_b)
        cost = correlation_cost(corr)
        if (st.count < width or flat > 0.5) and space.name in anchor_spaces and not _unsolved_axes(sg_m, space, maps,
                                                                                                   own=True):
            # activations cannot tell these neurons apart (fewer samples than neurons: a pooled head layer; or
            # most of them constant over the calibration images): match them on their weights instead
            why = (f"{st.count} samples for {width} neurons" if st.count < width
                   else f"{flat:.0%} of its neurons constant over the calibration images")
            report.fallbacks.append(f"{space.name}: {why}; matched on weights")
            cost = weight_cost(sg_m, sg_a, space, anchor_spaces[space.name], state_m, state_a, maps,
                               _comparable(sg_m, space, maps))
        elif (tied := _tied(corr)) and space.name in anchor_spaces:
            # activations leave some neurons tied: constant over the calibration images (dead ReLUs), or active
            # on the same few of them (a correlation of 1 with two partners, LCNetV2's wide pointwise convs);
            # their weights break the tie (a small term: it cannot outweigh any measured correlation)
            report.fallbacks.append(f"{space.name}: {tied} of {width} neurons tied by their activations ("
                                    f"{max(st.degenerate)} constant over the calibration images); ties broken "
                                    "by weights")
            rounded = correlation_cost(torch.round(corr / RESOLUTION) * RESOLUTION)
            cost = rounded + TIE_BREAK * weight_cost(sg_m, sg_a, space, anchor_spaces[space.name], state_m, state_a,
                                                     maps, _comparable(sg_m, space, maps))
        maps[space.id] = _record(solve(cost, cfg.solver, cfg.softness), space.name, report).maps()
    report.spaces += len(maps)
    maps.update(_attention_maps(sg_m, stats, coupling))
    per_axis = {}
    if cfg.residual != "shared":  # the paper's per-sublayer maps on top of the shared ones
        per_axis = {k: {sid: weight_maps(c) for sid, c in v.items()}
                    for k, v in stream_couplings(sg_m, stats, coupling, cfg.residual).items()}
    report.seconds_solve += time.perf_counter() - t
    return _apply(sg_m, model, anchor, maps, report, per_axis)


def _tied(corr: torch.Tensor, tol: float = RESOLUTION) -> int:
    """How many neurons of either side have two partners within `tol` of their best correlation."""
    if min(corr.shape) < 2:
        return 0
    top_a, top_b = corr.topk(2, dim=1).values, corr.topk(2, dim=0).values
    return max(int((top_a[:, 0] - top_a[:, 1] <= tol).sum()), int((top_b[0] - top_b[1] <= tol).sum()))


def _unsolved(sg: SpaceGraph, member, space, maps: dict) -> bool:
    """Whether the member's tensor has an axis of another space not solved yet: a weight cost through it would
    compare unaligned rows, so that even a permuted copy's true pairs look distant (FasterNet's last-stage MLPs
    read a concatenation whose parts are solved after them; LCNetV2's squeeze-excite gates a channel from a
    space solved after it). The space itself on another axis of the tensor counts as unsolved: an LSTM's
    recurrent weight carries its hidden units on both axes, and its columns are not aligned yet."""
    return any(leaf.id not in maps if leaf.id != space.id else axis != member.axis
               for axis, atom in enumerate(sg.tensor_axes[member.tensor]) for leaf in ax.leaves(atom))


def _unsolved_axes(sg: SpaceGraph, space, maps: dict, own: bool = False) -> bool:
    """Whether any tensor carrying `space` (with `own`, only the neurons' own parameters, those producing
    them) has an axis of another space not solved yet."""
    return any(_unsolved(sg, m, space, maps) for m in space.members if not own or m.role == "out")


def _comparable(sg: SpaceGraph, space, maps: dict) -> list:
    """The members of `space` a weight cost compares in the activation path: every tensor whose other axes are
    solved; where there is none, the neurons' own parameters (the weights producing them, biases, norms)."""
    return ([m for m in space.members if not _unsolved(sg, m, space, maps)]
            or [m for m in space.members if m.role == "out"] or space.members)


def _attention_maps(sg: SpaceGraph, stats, coupling) -> dict:
    """Attention's "full" / "shared_qk" maps: one map over all heads x head_dim of each projection (or of
    queries and keys together), under the keys `axes.transport` looks up. A projection alone on its
    (heads, head_dim) pair (the values) also lends its map to that pair, so the output projection's input
    columns move with the values, as in the paper."""
    names = {s.id: s.name for s in sg.spaces}
    maps, by_pair = {}, {}
    for key, (keys, st) in stats.joint.items():
        label = "x".join(names.get(i, str(i)) for i in keys[1]) + (f" #{key[1]}" if key[0] == "prod" else "")
        maps[key] = weight_maps(coupling(st, f"attention {label}"))
        by_pair.setdefault(keys[1], []).append(maps[key])
    return {**{pair: ms[0] for pair, ms in by_pair.items() if len(ms) == 1}, **maps}


def _record(sol: Solution, name: str, report: FuseReport) -> Solution:
    """Note a solved map in the report (fallbacks; the coupling, for plots and the partners count)."""
    if sol.note:
        report.fallbacks.append(f"{name}: {sol.note}")
    report.maps[name] = sol.coupling
    return sol


def _apply(sg_m: SpaceGraph, model: nn.Module, anchor: nn.Module, maps: dict, report: FuseReport,
           per_axis: dict | None = None) -> dict:
    t = time.perf_counter()
    aligned = sg_m.transport_state(model.state_dict(), maps, per_axis)
    report.seconds_apply += time.perf_counter() - t
    own = anchor.state_dict()
    bad = [k for k in own if k in aligned and aligned[k].shape != own[k].shape]
    if bad:
        raise CompressError("alignment left tensors in the wrong shape", expected="the anchor's shapes",
                            found=f"{len(bad)} tensors, e.g. {bad[0]} {tuple(aligned[bad[0]].shape)}")
    return aligned


def weight_matching(sg_m: SpaceGraph, sg_a: SpaceGraph, state_m: dict, state_a: dict, cfg: FuseConfig,
                    report: FuseReport) -> dict:
    """Ground cost from weights (Git Re-Basin's weight matching, with any of our solvers): for each space,
    neuron i of the model and j of the anchor are compared through every tensor carrying the space, the
    model's other axes moved by the current maps; passes over all spaces repeat up to `cfg.sweeps` times and
    stop after one that moves no map, and a space whose cost has not changed since its last solve keeps its map
    (Git Re-Basin iterates to convergence the same way: both skip only solves that would repeat)."""
    if [s.name for s in sg_m.spaces] != [s.name for s in sg_a.spaces]:
        raise CompressError("the models' spaces differ", expected="one architecture (widths may differ)")
    pairs = list(zip(sg_m.spaces, sg_a.spaces))
    maps: dict[int, dict[str, torch.Tensor]] = {}
    solved: dict[int, bytes] = {}  # a digest of each space's cost at its last solve (not the matrix: memory)
    t = time.perf_counter()
    for _ in range(cfg.sweeps):
        moved = False
        for sm, sa in pairs:
            # on the host, where the solvers run anyway (solve's own copy is then a no-op)
            cost = weight_cost(sg_m, sg_a, sm, sa, state_m, state_a, maps).detach().double().cpu().contiguous()
            digest = hashlib.blake2b(cost.numpy().data).digest()
            if solved.get(sm.id) == digest:
                continue  # the maps its cost reads did not move since: the solver would return the same map
            new = _record(solve(cost, cfg.solver, cfg.softness), sm.name, report).maps()
            moved |= sm.id not in maps or not all(torch.equal(new[k], maps[sm.id][k]) for k in new)
            maps[sm.id], solved[sm.id] = new, digest
        if not moved:  # every space kept its map: the next sweep would see the same costs and repeat this one
            break
    report.seconds_solve += time.perf_counter() - t
    report.spaces += len(maps)
    return maps


def weight_cost(sg_m: SpaceGraph, sg_a: SpaceGraph, sm: Space, sa: Space, state_m: dict, state_a: dict,
                maps: dict, members: list | None = None) -> torch.Tensor:
    """Distance between neuron i of space `sm` (model) and j of `sa` (anchor) through every tensor carrying
    the space (or only `members` of it), the model's other axes first moved by `maps`; scaled to max 1."""
    members = members or sm.members
    gram = torch.zeros(sm.size, sa.size, dtype=torch.float64)
    sq_m, sq_a = torch.zeros(sm.size, dtype=torch.float64), torch.zeros(sa.size, dtype=torch.float64)
    moved = {}  # (tensor, axis) -> the model's tensor, moved once however many members read it
    for member in members:
        name, axis = member.tensor, member.axis
        if (name, axis) not in moved:
            # the member's own axis keeps the model's layout: its other spaces are averaged out or split off by
            # `paired_views` anyway, and a map that changes their width (a wider model into a narrower anchor)
            # would no longer match the model's axis structure
            own_axis = {leaf.id for leaf in ax.leaves(sg_m.tensor_axes[name][axis])}
            others = {k: v for k, v in maps.items() if k not in own_axis}
            moved[name, axis] = sg_m.transport_state({name: state_m[name]}, others)[name].float()
        views = ax.paired_views(moved[name, axis], sg_m.tensor_axes[name][axis], state_a[name].float(),
                                sg_a.tensor_axes[name][axis], axis)
        for lm, _, rm, ra in views:
            if lm.id == sm.id:
                gram += (rm.T @ ra).double()
                sq_m += (rm * rm).sum(0).double()
                sq_a += (ra * ra).sum(0).double()
    dist = (sq_m[:, None] + sq_a[None, :] - 2 * gram).clamp_min(0).sqrt()
    return (dist / dist.max().clamp_min(1e-12)).float()


def average(states: list[dict[str, torch.Tensor]], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Equal-weight average of float tensors; integer buffers (BatchNorm counters) come from `like`."""
    return {k: (sum(s[k] for s in states) / len(states)).to(v.dtype) if v.dtype.is_floating_point else v.clone()
            for k, v in like.items()}


def resolve_auto(cfg: FuseConfig, model: nn.Module, example: torch.Tensor, equal_widths: bool = True
                 ) -> tuple[FuseConfig, str]:
    """`cfg` with its `auto` settings made concrete for the model's family, and why (docs/BENCHMARKS.md):
    models that attend (ViT, Swin, hybrids) take weight matching (digits ViTs: best one-shot, 31.65 vs 22.75,
    and after the finetune, 98.24 vs 97.48), REPAIR (one-shot 31.65 -> 58.52; parents trained on
    different classes + a short finetune 82.6 -> 85.9; -0.26 after a long finetune of same-data parents)
    and RegMean (with REPAIR, one-shot 58.10 -> 76.41; two parents trained on different classes, after 80
    finetune steps 84.63 -> 88.16, after 160 90.60 -> 91.52; four, after 320 69.44 -> 77.25; only two
    parents finetuned for 320 steps or more end higher from the plain average: 93.70 vs 91.18 on split
    data, 97.98 vs 97.65 on the same data, `--merge mean` there). Conv nets take activation correlations
    (ResNets one-shot 98.82), where BatchNorm recomputation already restores the statistics, and the plain
    average (RegMean has only the classifier to merge there: two split-data ResNets one-shot 98.24 either way,
    97.73 vs 98.49 after the finetune). The paper's per-sublayer / cross-head maps, bf16 statistics and
    fusion into another width need activations.

    Example:
        >>> resolve_auto(FuseConfig(), vit, torch.randn(1, 3, 32, 32))[0].ground
        'wts'
    """
    if cfg.ground != "auto" and cfg.repair is not None and cfg.merge != "auto":
        return cfg, ""
    attends = any(b.kind in ("attention", "bridge") for b in find_blocks(model, example))
    family = "attention" if attends else "conv / MLP"
    ground = cfg.ground
    if ground == "auto":
        acts_only = cfg.residual != "shared" or cfg.attention != "heads" or cfg.stats_precision != "fp32"
        ground = "wts" if attends and equal_widths and not acts_only else "acts"
    repair = cfg.repair if cfg.repair is not None else attends
    merge = cfg.merge if cfg.merge != "auto" else "regmean" if attends else "mean"
    return (replace(cfg, ground=ground, repair=repair, merge=merge),
            f"{family} family: ground {ground}, REPAIR {'on' if repair else 'off'}, merge {merge}")


def fuse_models(models: list[nn.Module], images: torch.Tensor, cfg: FuseConfig,
                target: nn.Module | None = None) -> tuple[dict, FuseReport]:
    """Fuse `models` (one architecture) into the anchor's basis with equal weights, or into `target`'s
    basis when given (a narrower model, see `narrow`): every model, the anchor included, is then transported.

    With `cfg.repair` the average is then REPAIRed (fuse/repair.py) on the calibration images.
    Returns the fused state dict (load it into a copy of the anchor / target, then `recompute_batchnorm`).

    Example:
        >>> state, report = fuse_models([a, b], calib_images, FuseConfig(solver="emd"))
    """
    if len(models) < 2:
        raise CompressError("fusion needs at least two models", found=str(len(models)))
    anchor_i = cfg.anchor % len(models)
    basis = models[anchor_i] if target is None else target
    own = basis.state_dict()
    equal = all(m.state_dict()[k].shape == v.shape for m in models for k, v in own.items())
    cfg = resolve_auto(cfg, basis, images[:1], equal_widths=equal)[0]
    if cfg.ground == "wts" and not equal:
        raise CompressError("weight matching fuses models of one width", expected="--ground acts to fuse into "
                            "another width (--width, or parents of other widths)")
    batches = calibration_batches(images, cfg)
    report = FuseReport()
    aligned = [basis.state_dict() if m is basis else align_to(m, basis, batches, cfg, report) for m in models]
    state = average(aligned, basis.state_dict())
    if cfg.merge == "mean" and not cfg.repair:
        return state, report
    # both measure the aligned parents as modules (neither changes them) on the calibration images
    parents, calib = [_with_state(basis, s) for s in aligned], torch.cat(batches)
    if cfg.merge == "regmean":
        t = time.perf_counter()
        state, report.regmean = regmean_state(parents, state, calib[: cfg.regmean_images], cfg.regmean_alpha)
        report.seconds_regmean = time.perf_counter() - t
    if cfg.repair:
        t = time.perf_counter()
        fused = _with_state(basis, state)
        recompute_batchnorm(fused, calib)  # hybrids: the Linear layers see settled BatchNorms
        report.repaired = repair(fused, parents, calib)
        state = fused.state_dict()
        report.seconds_repair = time.perf_counter() - t
    return state, report


def _with_state(model: nn.Module, state: dict) -> nn.Module:
    model = copy.deepcopy(model)
    model.load_state_dict(state)
    return model


def vanilla_average(models: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Plain weight averaging (the baseline OT must beat); needs identical shapes."""
    states = [m.state_dict() for m in models]
    for k, v in states[0].items():
        for s in states[1:]:
            if s[k].shape != v.shape:
                raise CompressError("vanilla averaging needs identical shapes", found=f"{k}: {tuple(v.shape)} vs "
                                    f"{tuple(s[k].shape)}")
    return average(states, states[-1])


def recompute_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> int:
    """Reset and re-estimate every BatchNorm's running statistics on `images` (fused weights invalidate them);
    the model is left in eval mode. Returns the number of BatchNorm layers updated.

    Example:
        >>> recompute_batchnorm(fused, calibration_images)
        20
    """
    # near-equal batches: a last batch of one image has no batch statistics (BatchNorm refuses it)
    return reestimate_batchnorm(model.eval(), images.tensor_split(max(1, -(-len(images) // batch_size))))
