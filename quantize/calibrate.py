"""The calibration driver: sites found, each method run on what its sites saw, bridge blocks handled.

Parallel calibration (PTQ4ViT): one pass records every site's input on the float model; each site is then
calibrated on float inputs. Q-HyViT adds sequential calibration of bridge blocks: sites up to the next
bridge block are recorded with the bridge blocks before them already quantized, so everything downstream of
a bridge is calibrated on inputs that carry its quantization error; each bridge then stays quantized and is
reconstructed (learned rounding, `reconstruct.py`).

Example:
    >>> qm, info = calibrate(model, images, QuantConfig(method="qhyvit", bits="w6a6"))
"""

from __future__ import annotations

import fnmatch
import time

import torch
import torch.nn.functional as F
from torch import nn

from compress.alignment import align
from compress.device import device_of

from .config import BRIDGES, GUARDED, HESSIAN, METHODS, QuantConfig, parse_bits
from .engine import QuantizedModel, Site, discover
from .methods import describe
from .prefix import Prefix
from .quantizers import same, snapshot
from .reconstruct import reconstruct_block
from .reparam import norm_readers, reparameterize

RECORD_BYTES = 4 * 1024**3  # calibration records held at once; sites beyond are recorded in another pass

__all__ = ["QuantConfig", "parse_bits", "calibrate", "sensitivity", "sqnr", "fisher_loss", "excluded"]


def excluded(site: Site, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(site.name, p) or fnmatch.fnmatch(site.module, p) for p in patterns)


def fisher_loss(reference: torch.Tensor):
    """The task loss whose output gradients weight the search: cross-entropy against the float model's own
    predictions (a Fisher / Hessian-diagonal proxy that needs no labels, per-pixel for segmentation)."""
    target = reference.argmax(dim=1)
    return lambda logits: F.cross_entropy(logits, target, reduction="sum")


def calibrate(model: nn.Module, images: torch.Tensor, cfg: QuantConfig) -> tuple[QuantizedModel, dict]:
    """Quantize `model` (a copy is not made: RepQ folds and reconstruction write its weights) with `cfg`
    on calibration `images`, on the model's device; returns the fake-quantized model and a report dict.
    Methods that reconstruct bridge blocks (Q-HyViT) get them from the alignment layer.

    Example:
        >>> qm, info = calibrate(model, images, QuantConfig(method="qhyvit", bits="w6a6"))
        >>> info["bridges"]
        ['stages.2.1', 'stages.3.1', 'stages.4.1']
    """
    w_bits, a_bits = cfg.w_bits, cfg.a_bits
    method = METHODS.get(cfg.method)
    images = images.to(device_of(model))
    blocks = align(model, images.shape[-1], images.shape[1]).blocks if cfg.method in BRIDGES else []
    start = time.perf_counter()
    model.eval().requires_grad_(False)
    found = discover(model, images[:1])
    skipped = {s.name: s.reason for s in found if s.op == "float"}
    skipped.update({s.name: "excluded by --exclude" for s in found if s.name not in skipped and excluded(s, cfg.exclude)})
    sites = [s for s in found if s.name not in skipped]
    qm = QuantizedModel(model, sites)
    with torch.no_grad():
        reference = model(images)
    grad_loss = fisher_loss(reference) if cfg.method in HESSIAN else None
    info: dict = {"sites": {}, "skipped": skipped, "bridges": [], "reconstruction": {}, "folded_norms": []}

    if cfg.method == "repq":
        readers = norm_readers(sites)
        info["folded_norms"] = reparameterize(model, readers, _norm_inputs(qm, readers, images), a_bits)

    bridges = [b.name for b in blocks if b.kind == "bridge"]
    todo, bridge_sites = [s.name for s in sites], []
    baselines: dict[str, dict] = {}
    while todo:
        nxt = next((b for b in bridges if b not in info["bridges"]), None)
        segment = todo if nxt is None else todo[: _last_index(todo, qm.sites, nxt) + 1]
        done = 0
        while done < len(segment):  # the segment's sites, as many per recording pass as RECORD_BYTES holds
            chunk = _fitting(segment[done:], qm.sites, len(images))
            qm.active = set(bridge_sites)  # bridges calibrated so far stay quantized; the rest records float
            recs = qm.record(_grad_input(images, grad_loss), chunk, grad_loss)
            for name in chunk:
                site = qm.sites[name]
                if name not in recs:  # did not run on this input (a branch not taken): nothing to calibrate
                    skipped[name] = "not executed on the calibration data"
                    continue
                quant = method(site, recs[name], w_bits, a_bits, cfg.search)
                for role, q in quant.items():
                    qm.quantizers[site.key(role)] = q
                info["sites"][name] = describe(quant)
                if cfg.method in GUARDED:
                    baselines[name] = METHODS.get("minmax")(site, recs[name], w_bits, a_bits, cfg.search)
            done += len(chunk)
            del recs
        todo = todo[len(segment):]
        if nxt is not None:
            info["bridges"].append(nxt)
            bridge_sites += [n for n in segment if qm.sites[n].inside(nxt)]
            qm.active = set(bridge_sites)
            before, after = reconstruct_block(qm, nxt, images, cfg.recon_iters, cfg.recon_lr, seed=cfg.seed)
            info["reconstruction"][nxt] = {"mse_before": before, "mse_after": after}
    qm.active = None
    reconstructed = set(bridge_sites)  # their weights now sit on the learned grid: theirs to keep
    info["minmax_sites"] = keep_better(qm, {k: v for k, v in baselines.items() if k not in reconstructed},
                                       images[:8])
    info["calib_seconds"] = time.perf_counter() - start
    return qm, info


def keep_better(qm: QuantizedModel, baselines: dict[str, dict], images: torch.Tensor) -> list[str]:
    """A method that extends min-max must never be worse than it: per site, the logits' SQNR with only that
    site quantized, by the method's quantizers and by min-max's (`baselines`); min-max's are kept where they
    are better (two forwards per site, on a few calibration images). Per-site choices need not add up (errors
    of sites compound), so the whole model is then compared once more with min-max at every guarded site, and
    the better of the two kept. Returns the sites that hold min-max's quantizers."""
    kept = []
    with torch.no_grad():
        prefix = Prefix(qm, images)  # the float pass; each site's forwards replay the units before it
        ref = prefix.logits
        for name, base in baselines.items():
            site = qm.sites[name]
            ours = {role: qm.quantizers[site.key(role)] for role in base if site.key(role) in qm.quantizers}
            if same(snapshot(ours), snapshot(base)):  # the method chose min-max's quantizers itself: nothing to compare
                continue
            qm.active = {name}
            with prefix.skipping(site.module):
                mine = sqnr(ref, qm(images))
                qm.quantizers.update({site.key(role): q for role, q in base.items()})
                if sqnr(ref, qm(images)) > mine:
                    kept.append(name)
                else:
                    qm.quantizers.update({site.key(role): q for role, q in ours.items()})
        qm.active = None
        if baselines and len(kept) < len(baselines):
            mixed, chosen = sqnr(ref, qm(images)), dict(qm.quantizers)
            for name, base in baselines.items():
                qm.quantizers.update({qm.sites[name].key(role): q for role, q in base.items()})
            if sqnr(ref, qm(images)) > mixed:
                return list(baselines)
            qm.quantizers.update(chosen)
    return kept


def _norm_inputs(qm: QuantizedModel, readers: dict[str, list[Site]], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per normalisation module, the input its readers received (the first that ran), recorded in as many
    passes as RECORD_BYTES needs; one input is kept per module (its readers all received it)."""
    norm_of = {s.name: norm for norm, group in readers.items() for s in group}
    names, inputs = list(norm_of), {}
    while names:
        chunk = _fitting(names, qm.sites, len(images))
        for name, rec in qm.record(images, chunk).items():
            inputs.setdefault(norm_of[name], rec.inputs["a"])
        names = names[len(chunk):]
    return inputs


def _grad_input(images: torch.Tensor, grad_loss) -> torch.Tensor:
    # parameters are frozen; the input carries requires_grad so site outputs get gradients
    return images.clone().requires_grad_(grad_loss is not None)


def _fitting(names: list[str], sites: dict[str, Site], images: int) -> list[str]:
    """The longest head of `names` whose records fit in RECORD_BYTES (at least one site): a model's records are
    taken in as many passes as that needs, not all at once (DeiT-S at 32 images: about 5 GiB of them)."""
    total = 0
    for i, name in enumerate(names):
        total += sites[name].record_bytes(images)
        if total > RECORD_BYTES and i > 0:
            return names[:i]
    return names


def _last_index(todo: list[str], sites: dict[str, Site], block: str) -> int:
    idx = [i for i, n in enumerate(todo) if sites[n].inside(block)]
    return idx[-1] if idx else -1


def sensitivity(qm: QuantizedModel, images: torch.Tensor) -> dict[str, float]:
    """Per site, the SQNR (dB) of the logits when only that site is quantized: low means sensitive."""
    images = images.to(device_of(qm))
    with torch.no_grad():
        prefix = Prefix(qm, images)
        out = {}
        for name, site in qm.sites.items():
            if not qm.site_quantizers(site):
                continue
            qm.active = {name}
            with prefix.skipping(site.module):
                out[name] = sqnr(prefix.logits, qm(images))
        qm.active = None
    return out


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2), in dB."""
    noise = (ref - approx).pow(2).sum().clamp_min(1e-20)
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
