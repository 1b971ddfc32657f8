"""Physical model surgery driven by the spaces and blocks: slice spaces, drop residual units, factorise
linears. The result is a real smaller `nn.Module` (fewer parameters, fewer MACs), not a masked one.

Every edit is also a JSON-able *op*, so a checkpoint can record the edits and replay them on a fresh
instance before loading its weights (`apply_structure`):

- `{"op": "replace", "modules": {"blocks.2": "skip", "blocks.0.attn": "zero"}}`
- `{"op": "resize", "spaces": {"blocks.0.mlp.fc1.weight:0": 192}}` (space name -> units kept)
- `{"op": "factorize", "layers": {"blocks.0.mlp.fc1": 24}}` (linear -> rank)

Module code reads sizes from attributes (`num_heads`, `groups`, `in_features`); `_sync` is the one place
that updates them from the sliced weights. A space is only offered for slicing after `removable_spaces`
has checked, on a copy, that removing one unit whose outgoing weights are zero leaves the output
unchanged: code that hard-codes a size fails that check instead of producing a wrong model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..device import device_of
from ..errors import CompressError
from ..registry import Registry
from . import axes as ax
from .spaces import Space, SpaceGraph, find_spaces


class Skip(nn.Module):
    """A removed residual unit: returns its input (extra arguments such as masks are ignored)."""

    def forward(self, x, *args, **kwargs):
        return x


class Zero(nn.Module):
    """A removed residual branch (attention or MLP): contributes nothing to the stream."""

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


class LowRankLinear(nn.Module):
    """`up(down(x))`: a Linear of rank `rank`; keeps `in_features`/`out_features` for code that reads them."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.up(self.down(x))


_REPLACEMENTS = {"skip": Skip, "zero": Zero, "identity": nn.Identity}


def replace_modules(model: nn.Module, modules: dict[str, str]) -> nn.Module:
    """Swap the modules at the given paths for `skip`, `zero` or `identity`, in place.

    Example:
        >>> replace_modules(vit, {"blocks.3": "skip"})  # the fourth block is gone
    """
    for path, kind in modules.items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, _REPLACEMENTS[kind]())
    return model


def factorize_linears(model: nn.Module, ranks: dict[str, int],
                      factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """Replace each Linear at `ranks`' paths by a `LowRankLinear`, in place; `factors[path] = (down, up)`
    weights when given (an SVD), fresh ones otherwise (a checkpoint's weights are loaded afterwards)."""
    for path, rank in ranks.items():
        lin = model.get_submodule(path)
        low = LowRankLinear(lin.in_features, lin.out_features, int(rank), bias=lin.bias is not None)
        low.to(lin.weight.dtype)
        with torch.no_grad():
            if factors and path in factors:
                low.down.weight.copy_(factors[path][0])
                low.up.weight.copy_(factors[path][1])
            if lin.bias is not None:
                low.up.bias.copy_(lin.bias)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, low)
    return model


def resize(model: nn.Module, sg: SpaceGraph, keep: dict[int, torch.Tensor]) -> nn.Module:
    """Keep only the units `keep[space_id]` (sorted indices) of each space, slicing every parameter and
    buffer on it, in place. Module attributes follow the new shapes.

    Example:
        >>> sg = find_spaces(model, example)
        >>> hidden = next(s for s in sg.spaces if s.name.endswith("fc1.weight:0"))
        >>> resize(model, sg, {hidden.id: torch.arange(hidden.size // 2)})  # half the MLP units
    """
    depthwise = {n: m.out_channels // m.in_channels for n, m in model.named_modules()
                 if isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.in_channels > 1}
    state = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    for name, atoms in sg.tensor_axes.items():
        if name not in state or not any(s.id in keep for a in atoms for s in ax.leaves(a)):
            continue
        t = state[name].detach()
        for axis, atom in enumerate(atoms):
            if any(s.id in keep for s in ax.leaves(atom)):
                t = t.index_select(axis, ax.index_map(atom, keep))
        _assign(model, name, t.contiguous())
    for name, module in reversed(list(model.named_modules())):  # children first: parents read their sizes
        _sync(module, depthwise.get(name))
    return model


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(t, requires_grad=old.requires_grad))
    else:
        module._buffers[attr] = t


def _sync(m: nn.Module, depth_multiplier: int | None) -> None:
    """Update the size attributes module code reads, from the (sliced) weights."""
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.conv._ConvNd):
        m.out_channels = m.weight.shape[0]
        if depth_multiplier:  # depthwise: one group per channel, whatever the channel count now is
            m.groups = m.in_channels = m.out_channels // depth_multiplier
        else:
            m.in_channels = m.weight.shape[1] * m.groups
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        m.num_features = (m.weight if m.weight is not None else m.running_mean).shape[0]
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)
    elif isinstance(m, nn.GroupNorm) and m.weight is not None:
        m.num_channels = m.weight.shape[0]
    _sync_attention(m)


def _sync_attention(m: nn.Module) -> None:
    """Attention modules keep their head count (and sizes derived from it) in attributes. Heads are sliced
    whole; the per-head width never changes, so `scale` stays right."""
    if not hasattr(m, "num_heads"):
        return
    if hasattr(m, "attention_biases"):  # EfficientFormer (v1 and v2): one bias row per head
        m.num_heads = m.attention_biases.shape[0]
        for per_head, total in (("key_dim", "key_attn_dim"), ("val_dim", "val_attn_dim"), ("d", "dh")):
            if hasattr(m, per_head) and hasattr(m, total):
                setattr(m, total, getattr(m, per_head) * m.num_heads)
        m.attention_bias_cache = {}
    elif hasattr(m, "relative_position_bias_table"):  # Swin: the bias table's last axis is the heads
        m.num_heads = m.relative_position_bias_table.shape[-1]
    elif hasattr(m, "head_dim") and isinstance(getattr(m, "qkv", None), nn.Linear):  # timm Attention
        # the output projection reads heads x head_dim whatever qkv holds (GCViT's global attention: k, v only)
        proj = getattr(m, "proj", None)
        m.num_heads = (proj.weight.shape[1] if isinstance(proj, nn.Linear) else m.qkv.weight.shape[0] // 3) \
            // m.head_dim
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.num_heads * m.head_dim


# ---- which spaces can be sliced ------------------------------------------------------------------------

def consumers(space: Space) -> list[tuple[str, int]]:
    """The (weight, axis) pairs that read the space's units (a next layer's input columns)."""
    return [(m.tensor, m.axis) for m in space.members if m.role == "in"]


@torch.no_grad()
def removable_spaces(model: nn.Module, sg: SpaceGraph, example: torch.Tensor,
                     candidates: list[Space], why: dict[str, str] | None = None) -> list[Space]:
    """The candidates that can be sliced: on a copy whose unit 0 of each candidate has zero outgoing
    weights, removing that unit must leave the output unchanged (a residual stream, where every unit is
    also normalised with the others, only has to keep the output's shape). Checked all at once, then one
    by one when the joint check fails; `why`, when given, receives the reason of each rejected space."""

    def fails(spaces: list[Space]) -> str | None:
        net = copy.deepcopy(model).eval()
        state = dict(net.state_dict(keep_vars=True))
        for s in spaces:
            if not s.residual:
                for name, axis in consumers(s):
                    idx = ax.index_map(sg.tensor_axes[name][axis], {s.id: torch.tensor([0])})
                    state[name].data.index_fill_(axis, idx, 0.0)
        ref = net(example)
        try:
            resize(net, sg, {s.id: torch.arange(1, s.size) for s in spaces})
            out = net(example)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            return f"the sliced model does not run ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
        if out.shape != ref.shape:
            return f"the sliced model's output changes shape ({tuple(ref.shape)} -> {tuple(out.shape)})"
        exact = [s for s in spaces if not s.residual]
        if exact and not torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item())):
            return "removing a unit with zero outgoing weights changes the output"
        return None

    candidates = [s for s in candidates if s.size > 1]
    if not candidates or fails(candidates) is None:
        return candidates
    kept = []
    for s in candidates:
        reason = fails([s])
        if reason is None:
            kept.append(s)
        elif why is not None:
            why[s.name] = reason
    return kept


# ---- replay ----------------------------------------------------------------------------------------------

STRUCTURE_OPS = Registry("structure op", group="compress.structure_ops")


@STRUCTURE_OPS.register("replace")
def _replace(model: nn.Module, op: dict, input_size: int, in_chans: int) -> nn.Module:
    return replace_modules(model, op["modules"])


@STRUCTURE_OPS.register("factorize")
def _factorize(model: nn.Module, op: dict, input_size: int, in_chans: int) -> nn.Module:
    return factorize_linears(model, op["layers"])


@STRUCTURE_OPS.register("resize")
def _resize(model: nn.Module, op: dict, input_size: int, in_chans: int) -> nn.Module:
    # replayed on fresh weights: the spaces the op names, as traced (pruning only ever sliced verified ones)
    sg = find_spaces(model, torch.randn(1, in_chans, input_size, input_size, device=device_of(model)), verify=False)
    by_name = {s.name: s for s in sg.spaces}
    missing = [n for n in op["spaces"] if n not in by_name]
    if missing:
        raise CompressError("cannot replay a resize", expected="spaces of this architecture",
                            found=f"unknown spaces {missing[:3]}")
    return resize(model, sg, {by_name[n].id: torch.arange(int(k)) for n, k in op["spaces"].items()})


def apply_structure(model: nn.Module, ops: list[dict], input_size: int, in_chans: int = 3) -> nn.Module:
    """Replay recorded edits on a fresh instance (weights are loaded afterwards). Each op kind is a
    `STRUCTURE_OPS` entry; pipelines register theirs (quantize's fake-quant wrapper) through the
    `compress.structure_ops` entry-point group, so the core never imports them.

    Example:
        >>> apply_structure(create_model("vit"), [{"op": "replace", "modules": {"blocks.3": "skip"}}], 32)
    """
    for op in ops:
        model = STRUCTURE_OPS.get(op["op"])(model, op, input_size, in_chans)
    return model
