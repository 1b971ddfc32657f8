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

    __slots__ = ("id", "size", "parent", "kind", "children", "pinned", "residual")

    def __init__(self, size: int, pinned: bool = False):
        self.id = next(_ids)
        self.size = int(size)
        self.parent: Atom | None = None
        self.kind = "leaf"  # "leaf" | "prod" | "sum"
        self.children: list[Atom] = []
        self.pinned = pinned
        self.residual = False  # set when two computed activations are added on this axis

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
    return r.children


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


def _product(group: list[Atom]) -> Atom:
    a = Atom(prod(g.size for g in group))
    a.kind, a.children = "prod", list(group)
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
