"""Axis algebra: a union-find over tensor axes with product and sum structure.

Every axis of every tensor in a traced model is an `Atom`. Two atoms are unified when the graph makes them
index the same neurons (a matmul contraction, an elementwise add, a norm's weight against its input). An
atom may be refined into a *product* of factors (a reshape of 3C into (3, heads, head_dim)) or a *sum* of
segments (a split of one conv output into query, key, value). An atom that some op reads by position (an
index, a roll, the image channels, the class logits) is *pinned*: permuting it would change the function.

After the trace, each free leaf class is one *space*: any permutation of it, applied to every parameter
axis that carries it, leaves the model's function unchanged.
"""

from __future__ import annotations

import itertools
from math import prod

import torch

_ids = itertools.count()


class Atom:
    """One axis (or factor of an axis) of size `size`; only the union-find root's fields are meaningful."""

    __slots__ = ("id", "size", "parent", "kind", "children", "pinned", "residual", "owner", "contracted")

    def __init__(self, size: int, pinned: bool = False):
        self.id = next(_ids)
        self.size = int(size)
        self.parent: Atom | None = None
        self.kind = "leaf"  # "leaf" | "prod" | "sum"
        self.children: list[Atom] = []
        self.pinned = pinned
        self.residual = False  # set when two computed activations are added on this axis
        self.owner: Atom | None = None  # the atom this one is a factor or segment of
        self.contracted = False  # this very axis object (not its class) is a weight's contracted axis

    def __repr__(self) -> str:
        r = find(self)
        return f"Atom({r.id}, {r.size}, {r.kind}{', pinned' if r.pinned else ''})"


def find(a: Atom) -> Atom:
    root = a
    while root.parent is not None:
        root = root.parent
    while a.parent is not None:  # path compression
        a.parent, a = root, a.parent
    return root


def pin(a: Atom) -> None:
    """Mark an axis as read by position: no permutation of it (or of any factor of it) is allowed."""
    r = find(a)
    r.pinned = True
    for c in r.children:
        pin(c)


def fresh(size: int, pinned: bool = True) -> Atom:
    return Atom(size, pinned)


def unify(a: Atom, b: Atom) -> None:
    """Declare that `a` and `b` index the same neurons; reconcile their structure or pin on conflict."""
    ra, rb = find(a), find(b)
    if ra is rb:
        return
    if ra.size != rb.size:  # cannot happen for a well-formed graph; stay safe by pinning
        pin(ra)
        pin(rb)
        return
    if ra.kind == "leaf" or rb.kind == "leaf":
        leaf, other = (ra, rb) if ra.kind == "leaf" else (rb, ra)
        leaf.parent = other
        other.residual |= leaf.residual
        if leaf.pinned:
            pin(other)
        return
    same_shape = ra.kind == rb.kind and [c.size for c in ra.children] == [c.size for c in rb.children]
    ra.parent = rb
    rb.residual |= ra.residual
    if not same_shape:  # incompatible structures: be conservative
        pin(rb)
        for c in ra.children:
            pin(c)
        return
    if ra.pinned:
        pin(rb)
    for ca, cb in zip(ra.children, rb.children):
        unify(ca, cb)


def _refine(r: Atom, kind: str, sizes: list[int]) -> list[Atom]:
    r.kind = kind
    r.children = [Atom(s, r.pinned) for s in sizes]
    for c in r.children:
        c.owner = r
    return r.children


def unbind_factor(u: Atom) -> list[dict[int, Atom]] | None:
    """Unbinding the product factor `u` (the 3 of a fused qkv reshaped to (3, heads, head_dim)) makes its
    slices independent: the owner axis becomes a sum of `u.size` segments, each a product of fresh copies
    of the other factors. Returns, per slice, a map from the old factors' root ids to their copies, or None
    when `u` is not such a factor (the caller pins it instead)."""
    owner = find(u.owner) if u.owner is not None else None
    if owner is None or owner.kind != "prod" or owner.pinned:
        return None
    roots = [find(c) for c in owner.children]
    if find(u) not in roots or sum(r is find(u) for r in roots) != 1:
        return None
    others = [r for r in roots if r is not find(u)]
    slices, segments = [], []
    for _ in range(u.size):
        copies: dict[int, Atom] = {}
        parts = [_clone(r, copies) for r in others]
        seg = _product(parts) if len(parts) > 1 else parts[0]
        segments.append(seg)
        slices.append(copies)
    owner.kind, owner.children = "sum", segments
    for seg in segments:
        seg.owner = owner
    return slices


def substitute(a: Atom, copies: dict[int, Atom]) -> Atom:
    """`a` with every atom of its tree whose root id is in `copies` replaced by that copy (a new product or
    sum where a factor or segment changed): after `unbind_factor`, an axis that merged a cloned factor with
    another one (SAM's `reshape(3, B * heads, N, -1)`: the batch merged with the heads) must carry the
    slice's own copy, or q, k and v keep the old heads and lose their tie to the weights."""
    r = find(a)
    if r.id in copies:
        return copies[r.id]
    if r.kind == "leaf":
        return r
    kids = [substitute(c, copies) for c in r.children]
    if all(k is find(c) for k, c in zip(kids, r.children)):
        return r
    if r.kind == "prod":
        return _product(kids)
    return concat(kids)


def factors(a: Atom) -> list[Atom]:
    """The leaf-level product factors of an axis (size-1 factors dropped)."""
    r = find(a)
    if r.kind == "prod":
        return [f for c in r.children for f in factors(c)]
    return [r] if r.size > 1 else []


def regroup(atoms: list[Atom], sizes: list[int]) -> list[Atom]:
    """Reshape: axes `atoms` (row-major) become axes of `sizes`, splitting factors where needed."""
    queue = [f for a in atoms for f in factors(a)]
    out: list[Atom] = []
    for s in sizes:
        if s == 1:
            out.append(fresh(1))
            continue
        group, p = [], 1
        while p < s:
            if not queue:
                return _opaque(atoms, sizes)
            f = find(queue.pop(0))
            if f.kind == "prod":  # refined since it was queued
                queue[0:0] = factors(f)
                continue
            if p * f.size <= s:
                group.append(f)
                p *= f.size
                continue
            need = s // p
            if f.kind == "sum" and not s % p and _equal_segments(f, need):
                # a concatenation of `need` equal parts viewed as (need, rest): BEiT / EVA's qkv bias,
                # cat(q_bias, k_bias, v_bias). The parts share one neuron order (a coarser but exact symmetry);
                # the part index is read by position.
                rest = find(f.children[0])
                for c in f.children[1:]:
                    unify(rest, c)
                group.append(fresh(need))
                queue.insert(0, find(rest))
                p *= need
                continue
            if s % p or f.size % need or f.kind == "sum":
                return _opaque(atoms, sizes)
            head, tail = _refine(f, "prod", [need, f.size // need])
            group.append(head)
            queue.insert(0, tail)
            p *= need
        if p != s:
            return _opaque(atoms, sizes)
        out.append(group[0] if len(group) == 1 else _product(group))
    return out


def _equal_segments(a: Atom, n: int) -> bool:
    r = find(a)
    return r.kind == "sum" and len(r.children) == n and len({c.size for c in r.children}) == 1


def _clone(a: Atom, copies: dict[int, Atom]) -> Atom:
    """A fresh atom with the structure of `a`; `copies` maps every old root id in the tree to its copy."""
    r = find(a)
    c = Atom(r.size, r.pinned)
    c.kind = r.kind
    c.children = [_clone(k, copies) for k in r.children]
    for k in c.children:
        k.owner = c
    copies[r.id] = c
    return c


def _product(group: list[Atom]) -> Atom:
    a = Atom(prod(g.size for g in group))
    a.kind, a.children = "prod", list(group)
    for g in group:
        g.owner = g.owner or a
    return a


def _opaque(atoms: list[Atom], sizes: list[int]) -> list[Atom]:
    for a in atoms:
        pin(a)
    return [fresh(s) for s in sizes]


def segment(a: Atom, start: int, stop: int) -> Atom:
    """The atom for positions [start, stop) of axis `a`, refining it into a sum of segments."""
    r = find(a)
    if start == 0 and stop >= r.size:
        return r
    if r.kind == "leaf":
        sizes = [s for s in (start, stop - start, r.size - stop) if s > 0]
        kids = _refine(r, "sum", sizes)
        return kids[1] if start > 0 else kids[0]
    if r.kind == "sum":
        bounds = [0] + list(itertools.accumulate(c.size for c in r.children))
        if start in bounds and stop in bounds:
            i, j = bounds.index(start), bounds.index(stop)
            if j - i == 1:
                return r.children[i]
            s = Atom(stop - start)
            s.kind, s.children = "sum", r.children[i:j]
            return s
        # a cut inside one segment: refine that segment further
        for i, c in enumerate(r.children):
            lo, hi = bounds[i], bounds[i + 1]
            if lo <= start and stop <= hi:
                return segment(c, start - lo, stop - lo)
    pin(r)
    return fresh(stop - start)


def concat(atoms: list[Atom]) -> Atom:
    atoms = [a for a in atoms if a.size > 0]
    if len(atoms) == 1:
        return atoms[0]
    s = Atom(sum(a.size for a in atoms))
    s.kind, s.children = "sum", list(atoms)
    return s


def leaves(a: Atom) -> list[Atom]:
    """Free leaf classes (spaces) reachable from an axis, in index order."""
    r = find(a)
    if r.kind != "leaf":
        return [x for c in r.children for x in leaves(c)]
    return [] if r.pinned or r.size < 2 else [r]


def index_map(a: Atom, perms: dict[int, torch.Tensor]) -> torch.Tensor:
    """Gather indices for axis `a` when each space id in `perms` is permuted: new[i] = old[idx[i]]."""
    r = find(a)
    if r.kind == "leaf":
        return perms[r.id] if r.id in perms else torch.arange(r.size)
    parts = [index_map(c, perms) for c in r.children]
    if r.kind == "sum":
        offsets = itertools.accumulate([0] + [c.size for c in r.children[:-1]])
        return torch.cat([p + o for p, o in zip(parts, offsets)])
    idx = torch.zeros((), dtype=torch.long)
    for c, p in zip(r.children, parts):  # row-major: idx = ((i0 * n1) + i1) * n2 + i2 ...
        idx = idx.unsqueeze(-1) * c.size + p
    return idx.reshape(-1)


def transport(t: torch.Tensor, axis: int, atom: Atom, maps: dict) -> torch.Tensor:
    """Move axis `axis` of `t` into another basis: for each space id in `maps`, new = old @ M along that
    factor, where M is (n_old, n_new). Product factors are transported independently (a Kronecker map),
    sum segments blockwise, unless `maps` holds a map of the whole product under one of its `joint_keys`
    (attention's cross-head "full" maps over all heads x head_dim). With permutation matrices this equals
    `index_map`.
    """
    r = find(atom)
    if r.kind == "leaf":
        if r.id not in maps:
            return t
        m = maps[r.id]
        idx = permutation_index(m)
        if idx is not None:  # a permutation map: gather, exact and O(n) instead of a dense product
            return t.index_select(axis, idx.to(t.device))
        return (t.movedim(axis, -1) @ m.to(t.dtype)).movedim(-1, axis)
    if r.kind == "sum":
        parts = t.split([c.size for c in r.children], dim=axis)
        return torch.cat([transport(p, axis, c, maps) for p, c in zip(parts, r.children)], dim=axis)
    joint = next((maps[k] for k in joint_keys(r) if k in maps), None)
    if joint is not None:
        return (t.movedim(axis, -1) @ joint.to(t.dtype)).movedim(-1, axis)
    shape = list(t.shape)
    t = t.reshape(shape[:axis] + [c.size for c in r.children] + shape[axis + 1:])
    for k, c in enumerate(r.children):
        t = transport(t, axis + k, c, maps)
    return t.reshape(shape[:axis] + [-1] + shape[axis + 1:])


def permutation_index(m: torch.Tensor) -> torch.Tensor | None:
    """For a square 0/1 matrix with one 1 per column, the row of each column's 1 (so that old @ m ==
    old[..., idx]); None for any other map."""
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        return None
    nonzero = m != 0
    if not (nonzero.sum(0) == 1).all() or not (m[nonzero] == 1).all():
        return None
    return nonzero.float().argmax(0)


def paired_views(ta: torch.Tensor, a: Atom, tb: torch.Tensor, b: Atom, axis: int):
    """For two tensors whose `axis` has the same structure (two models of one architecture), yield
    (leaf_a, leaf_b, rows_a, rows_b): each leaf's activations as (samples, neurons) matrices. Other axes are
    samples; sibling factors of a product (the head_dim beside the head axis) are averaged out, since each
    model orders them differently and pairing them as samples would compare unrelated neurons."""
    ra, rb = find(a), find(b)
    if ra.kind != rb.kind or len(ra.children) != len(rb.children):
        return
    if ra.kind == "leaf":
        if ra.size > 1 and not ra.pinned:
            yield ra, rb, ta.movedim(axis, -1).reshape(-1, ra.size), tb.movedim(axis, -1).reshape(-1, rb.size)
        return
    if ra.kind == "sum":
        pa = ta.split([c.size for c in ra.children], dim=axis)
        pb = tb.split([c.size for c in rb.children], dim=axis)
        for xa, ca, xb, cb in zip(pa, ra.children, pb, rb.children):
            yield from paired_views(xa, ca, xb, cb, axis)
        return
    sa, sb = list(ta.shape), list(tb.shape)
    ta = ta.reshape(sa[:axis] + [c.size for c in ra.children] + sa[axis + 1:])
    tb = tb.reshape(sb[:axis] + [c.size for c in rb.children] + sb[axis + 1:])
    n = len(ra.children)
    for k, (ca, cb) in enumerate(zip(ra.children, rb.children)):
        others = [axis + j for j in range(n) if j != k]
        xa = ta.mean(dim=others) if others else ta
        xb = tb.mean(dim=others) if others else tb
        yield from paired_views(xa, ca, xb, cb, axis)


def joint_keys(a: Atom) -> tuple:
    """Keys under which a product of free leaves (heads x head_dim) may have one map of its own: the
    product's class (one segment, e.g. the queries alone) and its tuple of leaf ids (every segment with
    those factors, e.g. queries and keys together). Empty for anything else."""
    r = find(a)
    kids = [find(c) for c in r.children]
    if r.kind != "prod" or len(kids) < 2 or any(c.kind != "leaf" or c.pinned or c.size < 2 for c in kids):
        return ()
    return (("prod", r.id), tuple(c.id for c in kids))


def joint_views(ta: torch.Tensor, a: Atom, tb: torch.Tensor, b: Atom, axis: int):
    """Like `paired_views`, for the products of free leaves on `axis` (found through sums), each flattened:
    yield (joint_keys of a's product, rows_a, rows_b) with all heads x head_dim as neurons."""
    ra, rb = find(a), find(b)
    if ra.kind == "sum" and rb.kind == "sum" and len(ra.children) == len(rb.children):
        pa = ta.split([c.size for c in ra.children], dim=axis)
        pb = tb.split([c.size for c in rb.children], dim=axis)
        for xa, ca, xb, cb in zip(pa, ra.children, pb, rb.children):
            yield from joint_views(xa, ca, xb, cb, axis)
    elif joint_keys(ra) and joint_keys(rb):
        yield joint_keys(ra), ta.movedim(axis, -1).reshape(-1, ra.size), tb.movedim(axis, -1).reshape(-1, rb.size)


def expand_products(t: torch.Tensor, atoms: list[Atom], keep_joint: bool = False) -> tuple[torch.Tensor, list[Atom]]:
    """Reshape `t` so that every product factor of every axis is an axis of its own (batch x tokens merged
    by a view become two axes again); returns the tensor and the atom of each new axis. `keep_joint` leaves
    products of free leaves (heads x head_dim) whole, for `joint_views`."""
    shape, out = [], []
    for size, a in zip(t.shape, atoms):
        fs = [find(a)] if keep_joint and joint_keys(a) else _prod_factors(a)
        if size != prod(f.size for f in fs):
            fs = [find(a)]
        shape += [f.size for f in fs]
        out += fs
    return t.reshape(shape), out


def _prod_factors(a: Atom) -> list[Atom]:
    r = find(a)
    return [f for c in r.children for f in _prod_factors(c)] if r.kind == "prod" else [r]


def unit_sums(t: torch.Tensor, axis: int, atom: Atom):
    """For each free leaf on axis `axis` of `t`, yield (leaf, per-unit sum of `t` over everything else):
    a head axis inside (heads, head_dim) gets one number per head."""
    r = find(atom)
    if r.kind == "leaf":
        if r.size > 1 and not r.pinned:
            yield r, t.movedim(axis, 0).reshape(r.size, -1).sum(1)
        return
    if r.kind == "sum":
        for part, c in zip(t.split([c.size for c in r.children], dim=axis), r.children):
            yield from unit_sums(part, axis, c)
        return
    shape = list(t.shape)
    t = t.reshape(shape[:axis] + [c.size for c in r.children] + shape[axis + 1:])
    n = len(r.children)
    for k, c in enumerate(r.children):
        others = [axis + j for j in range(n) if j != k]
        yield from unit_sums(t.sum(dim=others) if others else t, axis, c)
