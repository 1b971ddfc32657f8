"""Spaces: which parameter axes share one neuron basis, derived from the traced graph.

A *space* is a set of (tensor, axis) pairs that must be permuted (or transported, or sliced) together for
the model to compute the same function. Nothing here is written per model: one rule per aten op says how
the op ties the axes of its inputs and outputs (`_RULES`). Ops without a rule pin every axis they touch,
which is always safe (fewer spaces, never a wrong one) and is reported in `SpaceGraph.unknown_ops`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from . import axes as ax
from .axes import Atom, find, fresh, pin, unify
from .graph import TracedGraph, leading, non_persistent, state_tensors, trace


@dataclass
class Member:
    """One parameter axis in a space. `structured` when the space is only one factor or segment of that
    axis (the head axis of a qkv projection), so slicing code knows the axis is not plain."""

    tensor: str
    axis: int
    structured: bool
    role: str = "out"  # "in": the axis is contracted (a weight's input columns); "out": it carries the neurons


@dataclass
class Space:
    """A neuron basis shared by several parameter axes.

    Attributes:
        name: readable id, the first tensor axis that carries it (`blocks.0.mlp.fc1.weight:0`).
        size: number of neurons.
        members: every parameter axis carrying it.
        residual: True for a residual stream (two computed activations are added on it).
    """

    id: int
    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    residual: bool = False

    @property
    def tensors(self) -> list[str]:
        return sorted({m.tensor for m in self.members})


@dataclass
class SpaceGraph:
    spaces: list[Space]
    tensor_axes: dict[str, list[Atom]]  # every state tensor's axes
    unknown_ops: list[str]
    traced: TracedGraph | None = None
    node_axes: dict = field(default_factory=dict)  # fx.Node -> its axes (list[Atom]) for tensor-valued nodes
    roles: dict = field(default_factory=dict)  # (tensor, axis) -> "in" | "out"
    rejected: list[str] = field(default_factory=list)  # spaces whose permutation changed the function (dropped)

    def permute_state(self, state: dict[str, torch.Tensor], perms: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply one permutation per space id to a state dict (new[i] = old[perm[i]] on every member axis).

        Example:
            >>> sg = find_spaces(model, torch.randn(1, 3, 32, 32))
            >>> perms = {s.id: torch.randperm(s.size) for s in sg.spaces}
            >>> model.load_state_dict(sg.permute_state(model.state_dict(), perms))  # same logits
        """
        out = dict(state)
        for name, atoms in self.tensor_axes.items():
            if name not in out:
                continue
            t = out[name]
            for axis, atom in enumerate(atoms):
                if not any(s.id in perms for s in ax.leaves(atom)):
                    continue
                t = t.index_select(axis, ax.index_map(atom, perms).to(t.device))
            out[name] = t
        return out

    def transport_state(self, state: dict[str, torch.Tensor], maps: dict[int, dict[str, torch.Tensor]],
                        per_axis: dict | None = None) -> dict[str, torch.Tensor]:
        """Move a state dict into another basis: `maps[space_id]` holds an (n_old, n_new) matrix per role,
        `"out"` for axes that carry the neurons (rows, biases, norms, tokens) and `"in"` for contracted axes
        (a next layer's input columns). Tensors on no mapped space are returned unchanged. `per_axis`
        {(tensor, axis): {space_id: {role: matrix}}} overrides `maps` on single axes (per-sublayer maps of a
        residual stream, fuse/streams.py).

        Example:
            >>> maps = {s.id: {"out": P, "in": P} for s, P in zip(sg.spaces, permutation_matrices)}
            >>> sg.transport_state(model.state_dict(), maps)  # same as permute_state
        """
        out = dict(state)
        by_role = {role: {k: m[role] for k, m in maps.items()} for role in ("in", "out")}
        for name, atoms in self.tensor_axes.items():
            if name not in out or not out[name].dtype.is_floating_point:
                continue
            t = out[name]
            for axis, atom in enumerate(atoms):
                if any(s.id in maps for s in ax.leaves(atom)):
                    role = self.roles[(name, axis)]
                    own = {k: m[role] for k, m in (per_axis or {}).get((name, axis), {}).items()}
                    t = ax.transport(t, axis, atom, {**by_role[role], **own})
            out[name] = t
        return out

    def random_permutations(self, generator: torch.Generator | None = None) -> dict[int, torch.Tensor]:
        return {s.id: torch.randperm(s.size, generator=generator) for s in self.spaces}

    def coverage(self, state: dict[str, torch.Tensor]) -> float:
        """Fraction of parameter elements that lie on at least one free axis (a health check)."""
        total = covered = 0
        for name, atoms in self.tensor_axes.items():
            n = state[name].numel() if name in state else 0
            total += n
            if any(ax.leaves(a) for a in atoms):
                covered += n
        return covered / max(total, 1)


def find_spaces(model: nn.Module, *example_inputs: torch.Tensor, verify: bool | SpaceGraph = True) -> SpaceGraph:
    """Derive the spaces of `model` from its aten graph on `example_inputs`. With `verify` (the default) the
    result is checked on the model itself: a random permutation of every space, on a weight-perturbed copy,
    must leave its outputs unchanged. Where it does not (an op whose rule is wrong for this model), each
    space is checked alone and the ones that change the function are dropped (`SpaceGraph.rejected`), so
    fusion and pruning leave those axes as they are instead of computing a wrong model. `verify` may instead
    be the verified graph of a model with the same structure (another copy of one architecture): its verdict
    is taken over, since the check depends on the structure only (it perturbs the weights).

    Example:
        >>> sg = find_spaces(timm.create_model("vit_tiny_patch16_224", img_size=32), torch.randn(1, 3, 32, 32))
        >>> [s.name for s in sg.spaces if s.residual]
        ['cls_token:2']
    """
    g = trace(model, *example_inputs)
    sg = _propagate(g, state_tensors(model), non_persistent(model))
    if isinstance(verify, SpaceGraph):
        _reject(sg, [s for s in sg.spaces if s.name in set(verify.rejected)])
    elif verify and sg.spaces:
        _verify(model, sg, example_inputs)
    return sg


def _verify(model: nn.Module, sg: SpaceGraph, inputs: tuple, tol: float = 1e-4, images: int = 8) -> None:
    """Drop the spaces whose permutation changes the model's outputs (relative to their scale), judged on
    the first `images` inputs: a wrong space changes any input's outputs, and the check's forwards on a
    whole calibration batch were most of the trace time of a ViT-B/16."""
    import copy

    from .hooks import drop_eval_caches

    inputs = leading(inputs, images)
    probe = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # break symmetric inits (norms at 1, zero biases) that could hide a wrong space
        for name, t in probe.state_dict().items():
            if name.endswith("running_var"):  # a variance stays positive
                t.mul_(1 + 0.5 * torch.rand(t.shape, generator=gen).to(t.device, t.dtype))
            elif t.dtype.is_floating_point and t.numel() > 1:
                noise = torch.randn(t.shape, generator=gen).to(t.device, t.dtype)
                t.add_(0.2 * (t.float().std().clamp_min(1e-3)).to(t.dtype) * noise)
            elif t.dtype.is_floating_point:
                t.add_(0.1)
        state = probe.state_dict()
        ref = probe(*inputs)
    if not isinstance(ref, torch.Tensor) or not torch.isfinite(ref).all():
        return  # nothing to compare against (a model whose perturbed copy overflows)
    twin = copy.deepcopy(probe)

    def changes(perms: dict[int, torch.Tensor]) -> bool:
        twin.load_state_dict(sg.permute_state(state, perms))
        drop_eval_caches(twin)  # timm caches attention-bias gathers in eval mode
        with torch.no_grad():
            out = twin(*inputs)
        return not torch.isfinite(out).all() or (out - ref).abs().max().item() > tol * max(1.0, ref.abs().max().item())

    if not changes(sg.random_permutations(torch.Generator().manual_seed(1))):
        return
    _reject(sg, [s for s in sg.spaces
                 if changes({s.id: torch.randperm(s.size, generator=torch.Generator().manual_seed(2))})])
    if changes(sg.random_permutations(torch.Generator().manual_seed(3))):  # spaces wrong only jointly: none kept
        _reject(sg, list(sg.spaces))


def _reject(sg: SpaceGraph, bad: list[Space]) -> None:
    """Pin the spaces `bad` on every tensor axis that carries them and record them as rejected."""
    ids = {s.id for s in bad}
    for atoms in sg.tensor_axes.values():
        for a in atoms:
            for leaf in ax.leaves(a):
                if leaf.id in ids:
                    pin(leaf)
    sg.rejected += [s.name for s in bad]
    sg.spaces = [s for s in sg.spaces if s.id not in ids]


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _fixed_axes(t: torch.Tensor) -> list[bool]:
    """Per axis of a buffer the state dict does not carry: True when its values differ along that axis (a
    permutation would have to move them, and cannot); a zero k_bias, constant along its axis, stays free."""
    if t.ndim == 0 or not t.numel():
        return [True] * t.ndim
    return [t.shape[d] > 1 and not torch.equal(t, t.narrow(d, 0, 1).expand_as(t)) for d in range(t.ndim)]


def _live(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the outputs depend on, and every op that mutates an input (with what it reads)."""
    roots = [n for n in graph.nodes if n.op == "output" or (
        n.op == "call_function" and getattr(getattr(n.target, "_schema", None), "is_mutable", False))]
    live, todo = set(roots), list(roots)
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in live:
                live.add(a)
                todo.append(a)
    return live


def _fresh_like(val):
    if isinstance(val, (tuple, list)):
        return [_fresh_like(v) for v in val]
    return [fresh(s) for s in val.shape] if isinstance(val, torch.Tensor) else None


def _propagate(g: TracedGraph, state: dict[str, torch.Tensor], computed: set[str] = frozenset()) -> SpaceGraph:
    env: dict[fx.Node, object] = {}  # node -> list[Atom] (a tensor) or a list of those (a tuple)
    tensor_axes: dict[str, list[Atom]] = {}
    unknown: set[str] = set()
    live = _live(g.graph)
    for node in g.graph.nodes:
        if node.op == "call_function" and node not in live:
            env[node] = _fresh_like(_val(node))  # dead code (nn.LSTM's unused final states): no constraint
            continue
        if node.op == "placeholder":
            shape = _val(node).shape
            free = node in g.tensors
            node.meta["compress_dynamic"] = not free
            atoms = [Atom(s, pinned=not free) for s in shape]
            if free and g.tensors[node] in computed:
                atoms = [Atom(s, pinned=fixed) for s, fixed in zip(shape, _fixed_axes(state[g.tensors[node]]))]
            if free:
                tensor_axes[g.tensors[node]] = atoms
            env[node] = atoms
        elif node.op == "call_function":
            # does it depend on the model's input? (an add of two such tensors is a residual connection;
            # an add of a relative-position bias or a mask is not)
            node.meta["compress_dynamic"] = any(a.meta.get("compress_dynamic") for a in node.all_input_nodes)
            env[node] = _apply(node, env, unknown)
        elif node.op == "output":
            for a in _tensor_args(node.args, env):
                for atom in a:
                    pin(atom)  # the logits' class order is part of the function
    roles = {(name, axis): "in" if atom.contracted else "out"
             for name, atoms in tensor_axes.items() for axis, atom in enumerate(atoms)}
    order: dict[int, Space] = {}
    for name, atoms in tensor_axes.items():
        for axis, atom in enumerate(atoms):
            structured = find(atom).kind != "leaf"
            for k, leaf in enumerate(ax.leaves(atom)):
                label = f"{name}:{axis}" + (f".{k}" if structured else "")  # .k: k-th factor (a head axis...)
                sp = order.setdefault(leaf.id, Space(leaf.id, label, leaf.size, residual=leaf.residual))
                sp.members.append(Member(name, axis, structured, roles[(name, axis)]))
    spaces = [s for s in order.values() if len(s.tensors) > 1 or len(s.members) > 1]
    node_axes = {n: a for n, a in env.items() if isinstance(a, list) and a and isinstance(a[0], Atom)}
    return SpaceGraph(spaces, tensor_axes, sorted(unknown), g, node_axes, roles)


def _lookup(a, env):
    if isinstance(a, fx.Node):
        return env.get(a)
    if isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
        return [_lookup(x, env) for x in a]
    return a


def _tensor_args(args, env) -> list[list[Atom]]:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _tensor_args(a, env)
        elif isinstance(a, fx.Node) and isinstance(env.get(a), list) and (not env[a] or isinstance(env[a][0], Atom)):
            out.append(env[a])
    return out


def op_name(node) -> str:
    """The aten op's name without its overload: `upsample_bilinear2d` for aten.upsample_bilinear2d.vec."""
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _shape(node) -> list[int]:
    return list(_val(node).shape)


def _apply(node: fx.Node, env, unknown: set[str]):
    if node.target is operator.getitem:
        return env[node.args[0]][node.args[1]]
    op = op_name(node)
    rule = _RULES.get(op)
    if rule is not None:
        return rule(node, [_lookup(a, env) for a in node.args], env)
    # Unknown op: pin everything it reads, produce pinned outputs. Safe, and reported.
    unknown.add(op)
    for a in _tensor_args(node.args, env):
        for atom in a:
            pin(atom)
    return _fresh_like(_val(node))


# ---- rules ------------------------------------------------------------------------------------------

def _same(node, args, env):
    return args[0]


def _broadcast(node, args, env):
    """Elementwise op with numpy broadcasting: unify the axes that line up (size > 1 on both sides)."""
    out_shape = _shape(node)
    tensors = [a for a in args if isinstance(a, list) and (not a or isinstance(a[0], Atom))]
    out = [None] * len(out_shape)
    computed = sum(1 for a in node.args if isinstance(a, fx.Node) and a.meta.get("compress_dynamic"))
    for t in tensors:
        off = len(out_shape) - len(t)
        for i, atom in enumerate(t):
            if atom.size == 1 and out_shape[off + i] != 1:
                continue
            if out[off + i] is None:
                out[off + i] = atom
            else:
                unify(out[off + i], atom)
                if computed > 1 and node.target in _ADDS:
                    find(atom).residual = True
    return [a if a is not None else fresh(s) for a, s in zip(out, out_shape)]


def _reshape(node, args, env):
    return ax.regroup(args[0], _shape(node))


def _permute(node, args, env):
    return [args[0][d] for d in args[1]]


def _transpose(node, args, env):
    a = list(args[0])
    d0, d1 = (d % len(a) for d in args[1:3])
    a[d0], a[d1] = a[d1], a[d0]
    return a


def _t(node, args, env):
    return list(reversed(args[0]))


def _unsqueeze(node, args, env):
    a = list(args[0])
    d = args[1] % (len(a) + 1)
    return a[:d] + [fresh(1)] + a[d:]


def _expand(node, args, env):
    shape = _shape(node)
    a = args[0]
    lead = [fresh(s) for s in shape[: len(shape) - len(a)]]
    return lead + [atom if atom.size == s else fresh(s) for atom, s in zip(a, shape[len(lead):])]


def _static(node, i) -> bool:
    """True when argument `i` is computed from parameters only (a weight, or its transpose)."""
    a = node.args[i]
    return isinstance(a, fx.Node) and not a.meta.get("compress_dynamic")


def _mm(node, args, env):
    x, w = args[0], args[1]
    off = 1 if node.target is torch.ops.aten.addmm.default else 0
    for i, atom in ((0, x[1]), (1, w[0])):  # a weight's contracted axis is a consumer ("in") axis
        if _static(node, i + off):
            atom.contracted = True
    unify(x[1], w[0])
    return [x[0], w[1]]


def _addmm(node, args, env):
    out = _mm(node, args[1:], env)
    for b, o in zip(reversed(args[0]), reversed(out)):
        if b.size > 1:
            unify(b, o)
    return out


def _bmm(node, args, env):
    x, y = args[0], args[1]
    unify(x[0], y[0])
    unify(x[2], y[1])
    return [x[0], x[1], y[2]]


def _sdpa(node, args, env):
    q, k, v = args[0], args[1], args[2]
    for i in range(len(q) - 2):  # batch and head axes
        unify(q[i], k[i])
        unify(k[i], v[i])
    unify(q[-1], k[-1])
    unify(k[-2], v[-2])
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    if isinstance(mask, fx.Node) and isinstance(env.get(mask), list):
        # an additive mask is added to the scores (batch, heads, queries, keys): a per-head relative-position
        # bias (MaxViT, Swin V2 CR) must move with the heads it is added to
        scores = q[:-1] + [k[-2]]
        m = env[mask]
        for atom, target in zip(m[::-1], scores[::-1]):
            if atom.size > 1 and target.size == atom.size:
                unify(atom, target)
    out = q[:-1] + [v[-1]]
    val = _val(node)
    if isinstance(val, torch.Tensor):  # the math kernel returns the output alone
        return out
    return [out] + [[fresh(s) for s in t.shape] if isinstance(t, torch.Tensor) else None for t in val[1:]]


def _stack(node, args, env):
    parts = [p for p in args[0] if p is not None]
    dim = (node.args[1] if len(node.args) > 1 else 0) % (len(parts[0]) + 1)
    out = list(parts[0])
    for p in parts[1:]:
        for i in range(len(out)):
            if out[i].size > 1 and p[i].size > 1:
                unify(out[i], p[i])
    return out[:dim] + [fresh(len(parts))] + out[dim:]


def _along(node, args, env):
    """An op that reads one axis by position (cumsum, cumprod, sort along a dim): that axis is pinned."""
    x = args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    pin(x[dim % len(x)])
    return x


def _vector_norm(node, args, env):
    """linalg_vector_norm(x, ord, dim, keepdim): a reduction with its dims in third place."""
    dims = node.args[2] if len(node.args) > 2 and node.args[2] is not None else node.kwargs.get("dim")
    return _reduced(args[0], dims, node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False))


def _conv(node, args, env):
    x, w, b = args[0], args[1], args[2]
    transposed, groups = node.args[6], node.args[8]
    out_shape = _shape(node)
    if transposed:
        for a in x + w:
            pin(a)
        return [fresh(s) for s in out_shape]
    for a in w[2:]:
        pin(a)  # kernel taps are read by position
    cin, cout = x[1].size, w[0].size
    xin = ax.regroup([x[1]], [groups, cin // groups]) if groups > 1 else [None, x[1]]
    wout = ax.regroup([w[0]], [groups, cout // groups]) if groups > 1 else [None, w[0]]
    if groups > 1:
        unify(xin[0], wout[0])
    if _static(node, 1):
        w[1].contracted = True
    if w[1].size > 1 or xin[1].size > 1:
        unify(xin[1], w[1])
    if b is not None:
        unify(b[0], w[0])
    stride, padding = node.args[3], node.args[4]
    if all(a.size == 1 for a in w[2:]) and all(s == 1 for s in stride) and not any(padding):
        return [x[0], w[0]] + x[2:]  # pointwise: each position maps to itself (EfficientViM's 1x1 over states)
    for a in x[2:]:
        pin(a)  # the kernel reads its input's positions: they cannot be permuted alone
    return [x[0], w[0]] + [fresh(s) for s in out_shape[2:]]


_CONSTANT_STATE = {"zeros", "new_zeros", "zeros_like", "full", "new_full", "full_like"}
_VIEWS = {"select", "slice", "view", "_unsafe_view", "reshape", "clone", "contiguous", "expand", "unsqueeze", "squeeze",
          "alias", "_to_copy"}


def _constant_fill(a) -> bool:
    """Whether graph value `a` is a constant fill (nn.LSTM's zero initial state, selected per layer)."""
    while isinstance(a, fx.Node) and op_name(a) in _VIEWS:
        a = a.args[0]
    return isinstance(a, fx.Node) and op_name(a) in _CONSTANT_STATE


def _rnn_layer(node, args, env):
    """One LSTM layer and direction (`mkldnn_rnn_layer`, what nn.LSTM runs on CPU): its hidden units are a space
    shared by the four gates' rows of both weights and biases, the recurrent weight's columns, the states and
    the output features. The input's features are contracted with the input weight; the time axis is read in
    order (pinned). A zero initial state (nn.LSTM's default) is the same under any permutation; a given one
    carries the space. Other cells (GRU's three gates) pin everything."""
    x, w_ih, w_hh, b_ih, b_hh, hx, cx = args[:7]
    hidden, batch_first = node.args[10], node.args[14]
    outs = [[fresh(s) for s in v.shape] for v in _val(node)]
    if w_ih[0].size != 4 * hidden or len(x) != 3:
        for a in [*x, *w_ih, *w_hh, *(b_ih or []), *(b_hh or []), *(hx or []), *(cx or [])]:
            pin(a)
        return outs
    h = fresh(hidden, pinned=False)
    for rows in (w_ih[0], w_hh[0], *(b[0] for b in (b_ih, b_hh) if b is not None)):
        gate, unit = ax.regroup([rows], [4, hidden])
        pin(gate)
        unify(unit, h)
    for i, (col, feat) in enumerate(((w_ih[1], x[-1]), (w_hh[1], h)), start=1):
        if _static(node, i):
            col.contracted = True
        unify(col, feat)
    for i, state in ((5, hx), (6, cx)):
        if state is not None and not _constant_fill(node.args[i]):
            unify(state[-1], h)
    time = 1 if batch_first else 0
    pin(x[time])
    out = list(x)
    out[time], out[-1] = outs[0][time], h
    return [out, outs[1][:-1] + [h], outs[2][:-1] + [h], outs[3]]


def _layer_norm(node, args, env):
    x, nshape, w, b = args[0], args[1], args[2], args[3]
    k = len(nshape)
    for p in (w, b):
        if p is not None:
            for pa, xa in zip(p, x[-k:]):
                unify(pa, xa)
    stats = [fresh(s) for s in _val(node)[1].shape]
    return [x, stats, list(stats)]


def _batch_norm(node, args, env):
    x = args[0]
    for p in args[1:5]:
        if p is not None:
            unify(p[0], x[1])
    rest = [[fresh(s) for s in v.shape] for v in _val(node)[1:]]
    return [x] + rest


def _group_norm(node, args, env):
    x, w, b, groups = args[0], args[1], args[2], node.args[6]
    c = x[1].size
    if 1 < groups < c:
        ax.regroup([x[1]], [groups, c // groups])
    for p in (w, b):
        if p is not None:
            unify(p[0], x[1])
    rest = [[fresh(s) for s in v.shape] for v in _val(node)[1:]]
    return [x] + rest


def _reduce(node, args, env):
    dims = node.args[1] if len(node.args) > 1 else None
    return _reduced(args[0], dims, node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))


def _reduced(x: list, dims, keep: bool) -> list:
    """The axes of `x` reduced over `dims` (None: all; an int or a list), kept as size-1 axes with `keep`."""
    dims = range(len(x)) if dims is None else [dims] if isinstance(dims, int) else dims
    dims = {d % len(x) for d in dims}
    return [fresh(1) if i in dims else a for i, a in enumerate(x) if keep or i not in dims]


def _spatial(node, args, env):
    """Pooling / resizing over the last 1, 2 or 3 axes (by the op's name): channels (and batch) kept, the
    positions it reads pinned (they cannot be permuted alone), new ones out."""
    x, out = args[0], _val(node)
    shape = (out[0] if isinstance(out, tuple) else out).shape
    name = op_name(node)
    n_sp = 1 if "1d" in name else 3 if "3d" in name else 2
    for a in x[len(x) - n_sp:]:
        pin(a)
    res = x[: len(shape) - n_sp] + [fresh(s) for s in shape[len(shape) - n_sp:]]
    return [res, [fresh(s) for s in shape]] if isinstance(out, tuple) else res


def _cat(node, args, env):
    parts = [p for p in args[0] if p is not None]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(parts[0])
    out = list(parts[0])
    for p in parts[1:]:
        for i in range(len(out)):
            if i != dim and out[i].size > 1 and p[i].size > 1:
                unify(out[i], p[i])
    out[dim] = ax.concat([p[dim] for p in parts])
    return out


def _split(node, args, env):
    x = args[0]
    sizes = node.args[1]
    dim = (node.args[2] if len(node.args) > 2 else 0) % len(x)
    if isinstance(sizes, int):  # split.Tensor: equal chunks
        sizes = [v.shape[dim] for v in _val(node)]
    outs, start = [], 0
    for s in sizes:
        outs.append(x[:dim] + [ax.segment(x[dim], start, start + s)] + x[dim + 1:])
        start += s
    return outs


def _slice(node, args, env):
    x = args[0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(x)
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else x[dim].size
    step = node.args[4] if len(node.args) > 4 else 1
    size = x[dim].size
    start, end = max(start + size if start < 0 else start, 0), min(end + size if end < 0 else end, size)
    if step != 1:
        pin(x[dim])
        return x[:dim] + [fresh(_shape(node)[dim])] + x[dim + 1:]
    return x[:dim] + [ax.segment(x[dim], start, end)] + x[dim + 1:]


def _select(node, args, env):
    x, dim = args[0], node.args[1] % len(args[0])
    pin(x[dim])
    return x[:dim] + x[dim + 1:]


def _unbind(node, args, env):
    x = args[0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(x)
    rest = x[:dim] + x[dim + 1:]
    slices = ax.unbind_factor(x[dim])
    if slices is None:
        pin(x[dim])
        return [list(rest) for _ in range(x[dim].size)]
    # q, k and v of a fused projection get their own head axes; the attention op ties q and k back together
    return [[ax.substitute(a, copies) for a in rest] for copies in slices]


def _index(node, args, env):
    x, indices = args[0], node.args[1]
    used = [i for i, t in enumerate(indices) if t is not None]
    for i in used:
        pin(x[i])
    out_shape = _shape(node)
    if used and used == list(range(used[0], used[-1] + 1)):
        before, after = x[: used[0]], x[used[-1] + 1:]
        mid = len(out_shape) - len(before) - len(after)
        return before + [fresh(s) for s in out_shape[len(before): len(before) + mid]] + after
    for a in x:
        pin(a)
    return [fresh(s) for s in out_shape]


def _roll(node, args, env):
    x = args[0]
    dims = node.args[2] if len(node.args) > 2 else list(range(len(x)))
    for d in [dims] if isinstance(dims, int) else dims:
        pin(x[d])
    return x


def _pad(node, args, env):
    x, pad = args[0], node.args[1]
    out = list(x)
    for i in range(len(pad) // 2):
        d = len(x) - 1 - i
        if pad[2 * i] or pad[2 * i + 1]:
            pin(x[d])
            out[d] = fresh(_shape(node)[d])
    return out


def _restride(node, args, env):
    """as_strided only changes memory layout when the shape is unchanged (timm's channels-last norms)."""
    if list(_val(node.args[0]).shape) == _shape(node):
        return args[0]
    for a in args[0]:
        pin(a)
    return _new(node, args, env)


def _new(node, args, env):
    return [fresh(s) for s in _shape(node)]


_ADDS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}  # an add of two activations = residual
_RULES = {}
for _op in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "addcmul", "where", "maximum", "minimum",
            "rsub", "pow", "eq", "ne", "lt", "gt", "le", "ge", "masked_fill", "lerp", "bitwise_and", "bitwise_or",
            "logical_and", "logical_or", "atan2", "fmod", "remainder", "floor_divide", "copysign", "hypot"):
    _RULES[_op] = _broadcast
for _op in ("alias", "clone", "contiguous", "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardswish",
            "hardswish_", "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "elu", "exp", "neg", "sqrt", "rsqrt",
            "abs", "erf", "detach", "_to_copy", "to", "dropout", "native_dropout", "_softmax", "_log_softmax",
            "softmax", "log_softmax", "clamp", "clamp_min", "clamp_max", "sign", "reciprocal", "mish", "lift_fresh_copy",
            "lift_fresh", "_safe_softmax", "sin", "cos", "log", "log1p", "expm1", "floor", "ceil", "round", "trunc",
            "bitwise_not", "logical_not", "sgn", "square", "gelu_", "relu6", "softplus", "logit", "fill", "zeros_like",
            "ones_like", "full_like", "empty_like", "isnan", "isinf", "nan_to_num", "frac", "erfinv", "_conj",
            "hardsigmoid_", "sigmoid_", "tanh_", "elu_", "leaky_relu_", "threshold", "celu", "selu", "silu_"):
    _RULES[_op] = _same
_RULES.update({
    "view": _reshape, "_unsafe_view": _reshape, "reshape": _reshape, "flatten": _reshape, "unflatten": _reshape,
    "squeeze": _reshape, "permute": _permute, "transpose": _transpose, "t": _t, "unsqueeze": _unsqueeze,
    "expand": _expand, "mm": _mm, "addmm": _addmm, "bmm": _bmm,
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa, "_scaled_dot_product_flash_attention": _sdpa,
    "_scaled_dot_product_efficient_attention": _sdpa, "_scaled_dot_product_attention_math": _sdpa,
    "_scaled_dot_product_cudnn_attention": _sdpa, "convolution": _conv, "stack": _stack, "cumsum": _along,
    "cumprod": _along, "linalg_vector_norm": _vector_norm, "prod": _reduce, "amin": _reduce,
    "native_layer_norm": _layer_norm, "native_batch_norm": _batch_norm,
    "_native_batch_norm_legit_no_training": _batch_norm, "native_group_norm": _group_norm,
    "mkldnn_rnn_layer": _rnn_layer,
    "mean": _reduce, "sum": _reduce, "amax": _reduce, "var": _reduce, "avg_pool2d": _spatial,
    **{op: _spatial for op in (
        "avg_pool1d", "avg_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "_adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
        "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
        "_upsample_nearest_exact2d", "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
        "upsample_bicubic2d", "_upsample_bicubic2d_aa", "upsample_trilinear3d")}, "cat": _cat, "split_with_sizes": _split,
    "split": _split, "slice": _slice, "select": _select, "unbind": _unbind, "index": _index, "roll": _roll,
    "constant_pad_nd": _pad, "empty": _new, "zeros": _new, "ones": _new, "full": _new, "arange": _new,
    "scalar_tensor": _new, "as_strided": _restride, "as_strided_": _restride,
})
