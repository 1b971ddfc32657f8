"""PTQ methods: how each one quantizes one site, given what the site saw on the calibration batch.

    minmax      weights symmetric per output channel, activations asymmetric per tensor, min-max ranges
    percentile  as minmax, activation ranges clipped at a percentile (default 99.99%)
    ptq4vit     symmetric everywhere, Hessian-guided grid search (3 rounds, W then A), head-wise attention
                operands, twin-uniform post-softmax and post-GELU (Yuan et al., ECCV 2022)
    repq        RepQ-ViT: post-LayerNorm inputs calibrated per channel and reparameterised into per tensor
                (folded into the LayerNorm and the next Linear, see `reparam.py`), asymmetric ranges chosen
                by the percentile with the lowest MSE, log-sqrt2 post-softmax (Li et al., ICCV 2023)
    qhyvit      Q-HyViT: per site, granularity (tensor / channel or head) and scheme (symmetric / asymmetric)
                chosen by the Hessian-weighted output error, asymmetric candidates whose zero point
                overflows refused; bridge blocks calibrated sequentially on quantized inputs and
                reconstructed (`calibrate.py`) (Lee et al., 2023)

A method is `fn(site, record, w_bits, a_bits, cfg) -> {role: Quantizer}`; register new ones in METHODS.

Deviations, stated: PTQ4ViT quantizes Linear weights per tensor (qkv in three blocks); every method here
quantizes weights per output channel, which the int8 backends run natively and which is never worse. The
range grid is searched coarse to fine (`SearchConfig.stride`; stride 1 scores every point, as the papers'
code does).
Q-HyViT's granularity / scheme candidates are compared on the half of the calibration batch they were not
fitted on (then the winner is refitted on all of it): compared in-sample, per-channel ranges always win
and then clip on new images (digits MobileViTv2 W8A8: logit SQNR 20.2 dB in-sample choice, 34.7 held-out).
"""

from __future__ import annotations

from .config import METHODS, SearchConfig
from .engine import Record, Site
from .quantizers import Log, Quantizer, TwinUniform, Uniform, same, snapshot
from .search import best_percentile_range, score, search, set_minmax, uniform_for


def _bits(role: str, w_bits: int, a_bits: int) -> int:
    return w_bits if role == "w" else a_bits


@METHODS.register("minmax")
def minmax(site: Site, rec: Record, w_bits: int, a_bits: int, cfg: SearchConfig, percentile=None) -> dict:
    quant = {}
    for role in site.roles:
        x = rec.inputs[role]
        if role == "w":
            quant[role] = set_minmax(uniform_for(site, role, x, w_bits, True, "channel"), x)
        else:
            quant[role] = set_minmax(uniform_for(site, role, x, a_bits, False, "tensor"), x, percentile)
    return quant


@METHODS.register("percentile")
def percentile(site: Site, rec: Record, w_bits: int, a_bits: int, cfg: SearchConfig) -> dict:
    return minmax(site, rec, w_bits, a_bits, cfg, percentile=cfg.percentile)


@METHODS.register("ptq4vit")
def ptq4vit(site: Site, rec: Record, w_bits: int, a_bits: int, cfg: SearchConfig) -> dict:
    quant: dict[str, Quantizer] = {}
    for role in site.roles:
        x = rec.inputs[role]
        if site.op == "softmax":
            quant[role] = TwinUniform(a_bits, "softmax")
        elif site.op == "gelu":
            quant[role] = TwinUniform(a_bits, "gelu")
        else:
            gran = "channel" if role == "w" or site.op == "matmul" else "tensor"
            quant[role] = set_minmax(uniform_for(site, role, x, _bits(role, w_bits, a_bits), True, gran), x)
    _alternate(site, rec, quant, cfg)
    return quant


def _alternate(site: Site, rec: Record, quant: dict, cfg: SearchConfig) -> float:
    """PTQ4ViT's alternating search: `rounds` passes, weight first, then each activation. A pass that leaves
    every quantizer as it found it ends the search: each role's search depends only on the data and the other
    roles' quantizers, so every later pass would repeat it (the same result in fewer op runs)."""
    order = [r for r in ("w", "a", "b", "out") if r in quant]
    best = float("inf")
    for _ in range(cfg.rounds if len(order) > 1 else 1):
        before = snapshot(quant)
        for role in order:
            best = search(site, rec, quant, role, cfg)
        if same(before, snapshot(quant)):
            break
    return best


@METHODS.register("repq")
def repq(site: Site, rec: Record, w_bits: int, a_bits: int, cfg: SearchConfig) -> dict:
    quant: dict[str, Quantizer] = {}
    for role in site.roles:
        x = rec.inputs[role]
        if site.op == "softmax":
            quant[role] = Log(a_bits, sqrt2=True).set_range(x.min(), x.max())
        elif role == "w":
            quant[role] = best_percentile_range(uniform_for(site, role, x, w_bits, False, "channel"), x)
        else:
            quant[role] = best_percentile_range(uniform_for(site, role, x, a_bits, False, "tensor"), x)
    return quant


@METHODS.register("qhyvit")
def qhyvit(site: Site, rec: Record, w_bits: int, a_bits: int, cfg: SearchConfig) -> dict:
    """Weights symmetric per output channel (searched); each activation role takes the best of
    {tensor, channel/head} x {symmetric, asymmetric} by the Hessian-weighted error after its own search
    (on held-out calibration images, `_held_out`), or min-max's unsearched quantizer where that is better
    there. Twin-uniform quantizers are off, as in the Q-HyViT code."""
    quant: dict[str, Quantizer] = {}
    for role in site.roles:
        x = rec.inputs[role]
        if role == "w":
            quant[role] = set_minmax(uniform_for(site, role, x, w_bits, True, "channel"), x)
        else:
            quant[role] = set_minmax(uniform_for(site, role, x, a_bits, True, "tensor"), x)
    if "w" in quant:
        search(site, rec, quant, "w", cfg)
    halves = rec.halves(site)
    for role in [r for r in site.roles if r != "w"]:
        x = rec.inputs[role]
        choices = []
        grans = ("tensor",) if site.op in ("softmax", "gelu") else ("tensor", "channel")
        for gran in grans:
            for symmetric in (True, False):
                # asymmetric ranges hug the data (no forced zero), so the overflow check is what guards them
                q = set_minmax(uniform_for(site, role, x, a_bits, symmetric, gran, tight=True), x)
                if not symmetric and q.overflow:
                    continue  # Q-HyViT: a zero point outside the integer range is refused
                choices.append((_held_out(site, rec, halves, quant, role, q, cfg), q, True))
        if halves is not None:  # min-max's own quantizer, unsearched, judged the same way: a range searched
            # to clip on the images it was fitted on can clip more on new ones (convit W8A8: 32.6 dB, min-max 33.7)
            q = set_minmax(uniform_for(site, role, x, a_bits, False, "tensor"), halves[0].inputs[role])
            choices.append((float(score(site, halves[1], {**quant, role: q})), q, False))
        _, quant[role], searched = min(choices, key=lambda c: c[0])
        if searched:  # the winner refitted on the whole batch
            search(site, rec, quant, role, cfg)
        else:
            set_minmax(quant[role], x)
    if "w" in quant and len(quant) > 1:
        search(site, rec, quant, "w", cfg)  # one more weight pass against the chosen activation quantizers
    # the method extends min-max and must never be worse than it: min-max's own quantizers are the last
    # candidate, compared by the same Hessian-weighted output error on the half of the batch the choice was scored on
    baseline = minmax(site, rec, w_bits, a_bits, cfg)
    judge = halves[1] if halves is not None else rec
    if float(score(site, judge, baseline)) < float(score(site, judge, quant)):
        return baseline
    return quant


def _held_out(site: Site, rec: Record, halves, quant: dict, role: str, q: Uniform, cfg: SearchConfig) -> float:
    """A candidate's Hessian-weighted error on the half of the calibration batch it was not fitted on.
    Scored on the fitting data, a per-channel range always wins, and then clips on new images wherever a
    channel saw few values (a depthwise conv on a 2x2 map: 128 values per channel from 32 images)."""
    if halves is None:
        return search(site, rec, {**quant, role: q}, role, cfg)
    fit, held = halves
    set_minmax(q, fit.inputs[role])
    search(site, fit, {**quant, role: q}, role, cfg)
    return float(score(site, held, {**quant, role: q}))


def describe(quant: dict[str, Quantizer]) -> str:
    """Short text of a site's quantizers for the report, e.g. `w:s8/ch a:a8/t`."""
    parts = []
    for role, q in quant.items():
        if isinstance(q, Uniform):
            parts.append(f"{role}:{'s' if q.symmetric else 'a'}{q.bits}/{'t' if q.axis is None else 'ch'}")
        else:
            parts.append(f"{role}:{q.kind}{q.bits}")
    return " ".join(parts)
