"""Hybrid Distill (Shi et al., ICLR 2024): a ViT student learns the final token features of a
discriminative teacher (through a projector) and the token relations (per-head attention maps) of a
masked-image-modelling teacher at intermediate layers, L = alpha * L_feat + beta * L_rel (alpha = beta = 1),
while the tokens the CLS token attends least are removed from its input, a share rising over training.

Only the abstract and reviews of the paper could be read (../shared/research/hybrid.md): the loss forms,
the layer set, the masking score and schedule are our reconstruction, each a config field, each listed in
docs/ARCHITECTURE.md. `fd` is the same student with the feature term alone (the features-only baseline).

Example:
    >>> ckpt, result = distill.run("sup.pt", "digits", DistillRun(student="vit", method="hybrid",
    ...                                                           mim_teacher="mim.pt"))
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from compress.alignment import attention_maps, gather_tokens, keep_tokens, keep_tokens_from, token_layout
from compress.alignment.taps import _first, hooked_outputs
from compress.errors import CompressError
from compress.mim import random_keep

from .config import register_method
from .losses import resize_map, whiten
from .methods import Method


def mask_ratio(epoch: int, epochs: int, r_max: float, full_share: float = 0.0, schedule: str = "epoch") -> float:
    """Progressive masking: 0 at the first epoch rising linearly to `r_max` at the last masked epoch; the
    last `full_share` of the epochs see every token again. The layer schedule masks `r_max` (before the
    student's last block, `layer_ratios`) in every masked epoch.

    Example:
        >>> [mask_ratio(e, 5, 0.5) for e in range(5)]
        [0.0, 0.125, 0.25, 0.375, 0.5]
        >>> [mask_ratio(e, 5, 0.5, full_share=0.2) for e in range(5)]
        [0.0, 0.16666666666666666, 0.3333333333333333, 0.5, 0.0]
        >>> [mask_ratio(e, 5, 0.5, full_share=0.2, schedule="layer") for e in range(5)]
        [0.5, 0.5, 0.5, 0.5, 0.0]
    """
    masked = epochs - round(full_share * epochs)
    if epoch >= masked:
        return 0.0
    return r_max if masked <= 1 or schedule == "layer" else r_max * epoch / (masked - 1)


def layer_ratios(blocks: int, r_max: float) -> list[float]:
    """The layer schedule: the share of patches removed before each block, 0 at the first rising linearly to
    `r_max` at the last (token pruning inside the student).

    Example:
        >>> layer_ratios(5, 0.5)
        [0.0, 0.125, 0.25, 0.375, 0.5]
    """
    return [r_max * i / (blocks - 1) if blocks > 1 else r_max for i in range(blocks)]


def kept_count(patches: int, ratio: float) -> int:
    """Patches kept at a masking ratio (at least one)."""
    return max(1, patches - round(ratio * patches))


def least_attended_dropped(cls_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, keep) sorted positions of the patches the CLS token attends most (the rest are redundant).

    Example:
        >>> least_attended_dropped(torch.tensor([[0.1, 0.5, 0.2, 0.2]]), 2)
        tensor([[1, 2]])
    """
    return cls_attention.topk(keep, dim=1).indices.sort(dim=1).values


def select_relations(a: torch.Tensor, keep: torch.Tensor, prefix: int) -> torch.Tensor:
    """Rows and columns of the prefix tokens and the kept patches of full attention maps (B, H, P+N, P+N),
    each row renormalised over the kept keys."""
    b, h = a.shape[:2]
    idx = torch.cat([torch.arange(prefix, device=a.device).expand(b, -1), keep.to(a.device) + prefix], 1)
    n = idx.shape[1]
    a = a.gather(2, idx[:, None, :, None].expand(-1, h, -1, a.shape[-1]))
    a = a.gather(3, idx[:, None, None, :].expand(-1, h, n, -1))
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def match_heads(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal head counts pass; when one count divides the other, the larger side's heads are averaged in
    consecutive groups; otherwise both are averaged over all heads."""
    ht, hs = teacher.shape[1], student.shape[1]
    if ht == hs:
        return teacher, student
    if ht % hs == 0:
        return teacher.unflatten(1, (hs, ht // hs)).mean(2), student
    if hs % ht == 0:
        return teacher, student.unflatten(1, (ht, hs // ht)).mean(2)
    return teacher.mean(1, keepdim=True), student.mean(1, keepdim=True)


def relation_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between attention distributions (B, H, N, N), averaged over rows, heads, batch.

    Example:
        >>> a = torch.softmax(torch.randn(2, 3, 5, 5), -1)
        >>> relation_loss(a, a).item()
        0.0
    """
    teacher, student = match_heads(teacher, student)
    t = teacher.clamp_min(1e-8)
    return (t * (t.log() - student.clamp_min(1e-8).log())).sum(-1).mean()


def feature_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between projected student tokens and the teacher's tokens whitened by a LayerNorm without
    affine (FD's target normalisation)."""
    return F.smooth_l1_loss(student_tokens, whiten(teacher_tokens, dim=-1))


def teacher_tokens(feature_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A teacher's final NCHW map at the student's patch grid, as tokens (B, N, C): averaged down when finer,
    bilinear up when coarser (a CNN teacher's stride-32 map)."""
    return resize_map(feature_map, grid).flatten(2).transpose(1, 2)


def mean_attention_distance(a: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """Per head, the attention-weighted distance (in patches) from each patch query to the patch keys,
    averaged over queries and images (Dosovitskiy et al.'s measure; Hybrid Distill's diversity measure).

    Example:
        >>> a = torch.eye(5).expand(1, 2, 5, 5)          # every patch attends only to itself
        >>> mean_attention_distance(a, (2, 2), 1).tolist()
        [0.0, 0.0]
    """
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], 1).float().to(a.device)
    dist = torch.cdist(pos, pos)  # (N, N)
    p = a[:, :, prefix:, prefix:]
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return (p * dist).sum(-1).mean((0, 2))


def attention_nmi(a: torch.Tensor, prefix: int) -> torch.Tensor:
    """Per head, the normalised mutual information between query and key positions of the patch-to-patch
    attention (Park et al. 2023's measure of how much a map depends on its query; Hybrid Distill's second
    diversity measure): queries uniform, p(q, k) = A[q, k] / N, NMI = I(Q; K) / ((H(Q) + H(K)) / 2) (the
    arithmetic normalisation, scikit-learn's default), averaged over images. 0: every query attends alike
    (collapsed, global); 1: each query attends to its own key.

    Example:
        >>> attention_nmi(torch.eye(5).expand(1, 2, 5, 5), 1).tolist()   # each patch only to itself
        [1.0, 1.0]
        >>> attention_nmi(torch.full((1, 1, 5, 5), 0.2), 1).tolist()     # every query alike
        [0.0]
    """
    p = a[:, :, prefix:, prefix:].double()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)  # rows over the patch keys
    n = p.shape[-1]
    pk = p.mean(-2, keepdim=True)  # p(k): the key marginal over uniform queries
    mi = (p * (p.clamp_min(1e-30).log() - pk.clamp_min(1e-30).log())).sum((-2, -1)) / n
    hk = -(pk * pk.clamp_min(1e-30).log()).sum((-2, -1))
    return (mi / ((math.log(n) + hk) / 2)).mean(0).float()


@register_method("fd")
class FeatureDistill(Method):
    """The discriminative teacher's final token features through a linear projector (smooth-L1 against the
    whitened teacher), plus cross-entropy on the labels: Hybrid Distill without its relation term and without
    masking (the features-only baseline)."""

    teacher_features = True
    relations = False

    def setup(self, d) -> nn.ModuleDict:
        cfg = d.cfg
        self.student = token_layout(d.student, "student of --method " + cfg.method)
        self.last = d.student_taps.all[-1].module  # the last block: its output tokens are the student's features
        self.ratio = 0.0
        self.schedule = cfg.mask_schedule if self.relations else "epoch"
        # the layer schedule prunes at each attention's block: the module whose first argument is the sequence
        self.blocks = [a.rpartition(".")[0] for a in self.student.attention]
        self.relation_pairs: list[tuple[str, str]] = []
        self.score_from = None
        if self.relations:
            self._relations(d)
        width = int(getattr(d.student, "num_features", d.student_taps.all[-1].channels))
        return nn.ModuleDict({"proj": nn.Linear(width, d.shapes.teacher[-1][0])})

    def _relations(self, d) -> None:
        cfg, s = d.cfg, self.student
        if d.mim_teacher is None:
            raise CompressError("--method hybrid needs a masked-image-modelling teacher",
                                expected="--mim-teacher CHECKPOINT (make one: compress train --objective mim)")
        m = token_layout(d.mim_teacher, "MIM teacher")
        if m.grid != s.grid or m.prefix != s.prefix:
            raise CompressError("the MIM teacher's token grid cannot be matched to the student's",
                                expected=f"a {s.grid[0]}x{s.grid[1]} patch grid with {s.prefix} prefix tokens at the "
                                         "student's input", found=f"{m.grid[0]}x{m.grid[1]} with {m.prefix}")
        if cfg.mask_max > 0 and cfg.mask_schedule == "epoch" and not s.droppable:
            raise CompressError("the student cannot drop tokens from its sequence",
                                expected="a timm ViT-like student, or --mask-max 0")
        n_s, n_t = len(s.attention), len(m.attention)
        layers = cfg.relation_layers or auto_relation_layers(n_s)
        if not all(1 <= v <= n_s for v in layers):
            raise CompressError("relation layer out of range", expected=f"1-based indices in 1..{n_s}",
                                found=str(list(layers)))
        self.relation_pairs = [(s.attention[v - 1], m.attention[max(1, round(v * n_t / n_s)) - 1]) for v in layers]
        self.mim_last = m.attention[-1]
        try:  # the discriminative teacher can score redundancy with a CLS attention on the student's grid
            t = token_layout(d.teacher, "teacher")
        except CompressError:
            t = None
        usable = t is not None and t.grid == s.grid and t.prefix == s.prefix >= 1
        self.score_from = cfg.mask_score if cfg.mask_score != "auto" else "teacher" if usable else "mim"
        if self.score_from == "teacher":
            if not usable:
                raise CompressError("--mask-score teacher needs the teacher's CLS attention on the student's grid",
                                    expected=f"{s.grid} with a CLS token",
                                    found=f"{t.grid}, {t.prefix} prefix tokens" if t else type(d.teacher).__name__)
            self.teacher_last = t.attention[-1]

    def set_epoch(self, epoch: int, epochs: int, cfg) -> None:
        self.ratio = mask_ratio(epoch, epochs, cfg.mask_max, cfg.mask_full_share, self.schedule) if self.relations \
            else 0.0

    def step(self, d, x, y):
        cfg, grid, prefix = d.cfg, self.student.grid, self.student.prefix
        with torch.no_grad():
            t_in = d.teacher_input(x)
            reads = [self.teacher_last] if self.score_from == "teacher" else []
            with attention_maps(d.teacher, only=reads) as t_maps:
                _, t_feats, _ = d.teacher_taps(d.teacher, t_in)
            t_maps = dict(t_maps)
            m_maps = {}
            if self.relations:
                reads = [t for _, t in self.relation_pairs] + ([self.mim_last] if self.score_from == "mim" else [])
                with attention_maps(d.mim_teacher, only=sorted(set(reads))) as got:
                    d.mim_teacher(d.mim_input(x))
                m_maps = dict(got)
            seen = self.seen_patches(x, t_maps, m_maps)
            target = teacher_tokens(t_feats[-1], grid)
            if seen[-1] is not None:  # the last block's tokens are the student's features
                target = gather_tokens(target, seen[-1])
        if self.schedule == "layer":
            ctx = keep_tokens_from(d.student, {b: k for b, k in zip(self.blocks, seen) if k is not None})
        else:
            ctx = keep_tokens(d.student, seen[0]) if seen[0] is not None else contextlib.nullcontext()
        with ctx, attention_maps(d.student, only=[s for s, _ in self.relation_pairs], detach=False) as s_maps, \
                hooked_outputs(d.student, [self.last]) as outs:
            logits = d.student(x)
        tokens = _first(outs[self.last])[:, prefix:]
        loss = cfg.ce_weight * F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        loss = loss + cfg.feat_weight * feature_loss(d.helpers["proj"](tokens), target)
        if self.relation_pairs:  # each block's attention compares over the tokens that block sees
            keep = dict(zip(self.student.attention, seen))
            rel = sum(relation_loss(m_maps[t] if keep[s] is None else select_relations(m_maps[t], keep[s], prefix),
                                    s_maps[s]) for s, t in self.relation_pairs)
            loss = loss + cfg.relation_weight * rel / len(self.relation_pairs)
        return loss

    def seen_patches(self, x, t_maps, m_maps) -> list[torch.Tensor | None]:
        """Per student block, the patches it sees this step (None: all of them). The epoch schedule removes
        the least attended at the input (the same for every block); the layer schedule removes more before each
        block (`layer_ratios`), from one ranking, so each block's patches lie among the previous block's."""
        b, n, blocks = x.shape[0], self.student.patches, len(self.blocks)
        counts = ([kept_count(n, r) for r in layer_ratios(blocks, self.ratio)] if self.schedule == "layer"
                  else [kept_count(n, self.ratio)] * blocks)
        if min(counts) >= n:
            return [None] * blocks
        if self.schedule == "epoch":
            keep = (random_keep(b, n, counts[0], x.device) if self.score_from == "random"
                    else least_attended_dropped(self.cls_attention(t_maps, m_maps), counts[0]))
            return [keep] * blocks
        score = torch.rand(b, n, device=x.device) if self.score_from == "random" else self.cls_attention(t_maps, m_maps)
        order = score.argsort(dim=1, descending=True, stable=True)  # ties broken once, for every block
        return [order[:, :k].sort(dim=1).values if k < n else None for k in counts]

    def cls_attention(self, t_maps, m_maps) -> torch.Tensor:
        """(B, N) the scoring teacher's last-layer CLS attention to each patch, averaged over heads."""
        a = t_maps[self.teacher_last] if self.score_from == "teacher" else m_maps[self.mim_last]
        return a[:, :, 0, self.student.prefix:].mean(1)


@register_method("hybrid")
class Hybrid(FeatureDistill):
    """Hybrid Distill: `fd`'s feature term + the MIM teacher's token relations (KL between per-head attention
    maps) at intermediate layers + progressive removal of the tokens the CLS token attends least."""

    relations = True


def auto_relation_layers(depth: int) -> list[int]:
    """The default relation layers: blocks 8-11 of 12 (1-based; the intermediate layers below the last one)
    at the same relative depth for `depth` blocks.

    Example:
        >>> auto_relation_layers(12), auto_relation_layers(4), auto_relation_layers(6)
        ([8, 9, 10, 11], [3], [4, 5])
    """
    layers = [v for v in range(1, depth + 1) if 8 / 12 <= v / depth <= 11 / 12 + 1e-9]
    return layers or [max(1, depth - 1)]


def masking_flops_saving(student: nn.Module, layout, input_size: int, in_chans: int, epochs: int,
                         r_max: float, full_share: float = 0.0, blocks: list[str] | None = None) -> float:
    """1 - (mean over the schedule's epochs of the student's forward FLOPs at the kept tokens) / (its FLOPs on
    every token): the compute the masking saves in the student (its backward scales the same way). With
    `blocks` (the layer schedule) each masked epoch prunes before those blocks, by `layer_ratios`."""
    from torch.utils.flop_counter import FlopCounterMode

    from compress.device import device_of

    x = torch.zeros(1, in_chans, input_size, input_size, device=device_of(student))
    n = layout.patches

    def flops(counts: tuple[int, ...]) -> int:  # patches kept: at the input, or before each of `blocks`
        def idx(k):
            return torch.arange(k, device=x.device).unsqueeze(0)
        ctx = (keep_tokens(student, idx(counts[0])) if blocks is None
               else keep_tokens_from(student, {b: idx(k) for b, k in zip(blocks, counts) if k < n}))
        with torch.no_grad(), FlopCounterMode(display=False) as counter, ctx:
            student(x)
        return counter.get_total_flops()

    ratios = [mask_ratio(e, epochs, r_max, full_share, "epoch" if blocks is None else "layer") for e in range(epochs)]
    plans = [(kept_count(n, r),) if blocks is None else tuple(kept_count(n, q) for q in layer_ratios(len(blocks), r))
             for r in ratios]
    cache: dict[tuple[int, ...], int] = {}
    per_epoch = [cache.setdefault(p, flops(p)) for p in plans]
    full = (n,) if blocks is None else (n,) * len(blocks)
    return 1 - sum(per_epoch) / (epochs * (cache[full] if full in cache else flops(full)))


@torch.no_grad()
def attention_distances(model: nn.Module, layers: list[str], x: torch.Tensor) -> dict[str, list[float]]:
    """Per attention module in `layers`, the mean attention distance of each head (in patches) on `x`."""
    layout = token_layout(model)
    return _per_head(model, layers, x, lambda a: mean_attention_distance(a, layout.grid, layout.prefix))


@torch.no_grad()
def attention_nmis(model: nn.Module, layers: list[str], x: torch.Tensor) -> dict[str, list[float]]:
    """Per attention module in `layers`, the query-key NMI of each head on `x` (`attention_nmi`)."""
    prefix = token_layout(model).prefix
    return _per_head(model, layers, x, lambda a: attention_nmi(a, prefix))


def _per_head(model: nn.Module, layers: list[str], x: torch.Tensor, measure) -> dict[str, list[float]]:
    with attention_maps(model, only=layers) as maps:
        model(x)
    return {name: [round(v, 4) for v in measure(maps[name]).tolist()] for name in layers}
