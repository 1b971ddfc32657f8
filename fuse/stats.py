"""Streaming activation statistics between two models, one space at a time.

Both models are traced at the calibration batch size and run node by node in lockstep through their aten
graphs; at each producer node (convolutions, linear layers, residual adds, attention outputs) every space
the node carries contributes (samples, neurons) activations. Only running sums are kept: memory is
O(n_a * n_b) per space whatever the number of samples.

With `sublayers=True` each residual stream is also measured at every branch writing into it (the patch
embedding, each attention projection and fc2, a ResNet block's last conv), one set of sums per writer, for
the paper's per-sublayer residual maps (fuse/streams.py), together with the mean magnitude of both operands
of every residual add (the `weighted` policy).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from compress.alignment import axes as ax
from compress.alignment.spaces import SpaceGraph, op_name
from compress.errors import CompressError

SITES = {"convolution", "addmm", "mm", "add", "add_"}  # adds only where two activations meet (residuals)


def _is_site(node: fx.Node) -> bool:
    if node.op != "call_function" or op_name(node) not in SITES or not node.meta.get("compress_dynamic"):
        return False
    if op_name(node) in ("add", "add_"):  # an attention mask or a position bias added is not a neuron's output
        return sum(bool(a.meta.get("compress_dynamic")) for a in node.all_input_nodes) >= 2
    return True


@dataclass
class CrossStats:
    """Running first and second moments of two neuron sets observed on the same samples."""

    n_a: int
    n_b: int
    count: int = 0
    product_dtype: torch.dtype = torch.float32  # of the cross products a^T b (see `cross_statistics`)
    sa: torch.Tensor = field(init=False)
    sb: torch.Tensor = field(init=False)
    saa: torch.Tensor = field(init=False)
    sbb: torch.Tensor = field(init=False)
    sab: torch.Tensor = field(init=False)

    def __post_init__(self):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.sa, self.sb, self.saa, self.sbb, self.sab = z(self.n_a), z(self.n_b), z(self.n_a), z(self.n_b), z(
            self.n_a, self.n_b)
        self.shift_a, self.shift_b = torch.zeros(self.n_a), torch.zeros(self.n_b)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.float(), b.float()
        if self.count == 0:  # sums of shifted values: a large mean no longer swamps a small variance in float32
            self.shift_a, self.shift_b = a.mean(0), b.mean(0)
        a, b = a - self.shift_a, b - self.shift_b
        self.count += a.shape[0]
        self.sa += a.sum(0).double()
        self.sb += b.sum(0).double()
        self.saa += (a * a).sum(0).double()
        self.sbb += (b * b).sum(0).double()
        if self.product_dtype != torch.float32:
            a, b = a.to(self.product_dtype), b.to(self.product_dtype)
        self.sab += (a.T @ b).double()

    def correlation(self) -> torch.Tensor:
        """Pearson correlation (n_a, n_b), in [-1, 1]. A neuron whose activation does not vary over the samples
        (std below 1e-5 of its magnitude: float32 rounding of a constant) has no correlation to measure: its
        row / column is 0, and `degenerate` counts such neurons on each side."""
        n = max(self.count, 1)
        ma, mb = self.sa / n, self.sb / n
        va, vb = self.saa / n - ma**2, self.sbb / n - mb**2
        scale_a = va + (self.shift_a.double() + ma) ** 2  # E[x^2] of the unshifted activations
        scale_b = vb + (self.shift_b.double() + mb) ** 2
        flat_a = va <= 1e-10 * scale_a + 1e-20
        flat_b = vb <= 1e-10 * scale_b + 1e-20
        cov = self.sab / n - ma[:, None] * mb[None, :]
        corr = cov / (va.clamp_min(1e-20).sqrt()[:, None] * vb.clamp_min(1e-20).sqrt()[None, :])
        corr[flat_a, :] = 0.0
        corr[:, flat_b] = 0.0
        self.degenerate = (int(flat_a.sum()), int(flat_b.sum()))
        return corr.clamp(-1, 1).float()


@dataclass
class Statistics:
    """What `cross_statistics` measured. Keys are model A's space ids and node indices in its graph."""

    spaces: dict[int, tuple[int, CrossStats]]  # A space -> (B space, sums pooled over every site of the space)
    writers: dict[tuple[int, int], tuple[int, CrossStats]] = field(default_factory=dict)  # (node, A space) -> same
    operands: dict[int, list[float]] = field(default_factory=dict)  # residual add node -> B's mean |operand|
    joint: dict[tuple, tuple[tuple, CrossStats]] = field(default_factory=dict)  # key -> (joint_keys, sums)


def cross_statistics(sg_a: SpaceGraph, sg_b: SpaceGraph, state_a: dict, state_b: dict,
                     batches: list[torch.Tensor], tokens: str = "window", window: int = 6,
                     sublayers: bool = False, attention: str = "heads",
                     product_dtype: torch.dtype = torch.float32) -> Statistics:
    """Statistics between model A's spaces and model B's (`Statistics.spaces`: {A space id: (B space id,
    CrossStats)}), with `sublayers` per residual writer (`Statistics.writers`, `.operands`), and with
    `attention` "full" / "shared_qk" over all heads x head_dim of each query / key / value projection
    (`Statistics.joint`, keyed per projection or per (heads, head_dim) pair: see `axes.joint_keys`).

    `tokens` picks the positions of ViT-style sequences taken as samples (`select_tokens`): by default the
    reference's, the cls token and the central `window` x `window` patches of each image.

    `product_dtype` torch.bfloat16 takes the cross products (the O(rows x n_a x n_b) part) from bfloat16
    operands, summed in float32 and rounded to bfloat16 once per batch (4-5x faster where the CPU has AMX);
    means and variances stay float32. Measured effect: docs/BENCHMARKS.md (fusion, real sizes).

    Example:
        >>> stats = cross_statistics(sg_a, sg_b, a.state_dict(), b.state_dict(), calib_batches)
    """
    ga, gb = sg_a.traced, sg_b.traced
    nodes_a, nodes_b = list(ga.graph.nodes), list(gb.graph.nodes)
    if len(nodes_a) != len(nodes_b) or any(op_name(x) != op_name(y) for x, y in zip(nodes_a, nodes_b)):
        raise CompressError("the models do not have the same structure",
                            expected="one architecture (widths may differ)",
                            found=f"graphs of {len(nodes_a)} and {len(nodes_b)} ops")
    wanted = {s.id for s in sg_a.spaces}
    residual = {s.id for s in sg_a.spaces if s.residual}
    sites = [i for i, n in enumerate(nodes_a) if _is_site(n) and n in sg_a.node_axes]
    index = {n: i for i, n in enumerate(nodes_a)}
    free_at = defaultdict(list)
    last = {}
    for i, n in enumerate(nodes_a):
        for m in n.all_input_nodes:
            last[index[m]] = i
    for j, i in last.items():
        free_at[i].append(j)
    site_set = set(sites)
    stats: dict[int, tuple[int, CrossStats]] = {}
    out = Statistics(stats)
    interps = [fx.Interpreter(ga.module), fx.Interpreter(gb.module)]
    names_a, names_b = [ga.tensors[n] for n in ga.tensors], [gb.tensors[n] for n in gb.tensors]
    with torch.no_grad():
        for x in batches:
            flats = [iter(tree_flatten(({k: state_a[k] for k in names_a}, x))[0]),
                     iter(tree_flatten(({k: state_b[k] for k in names_b}, x))[0])]
            for i in range(len(nodes_a)):
                vals = []
                for interp, nodes, flat in zip(interps, (nodes_a, nodes_b), flats):
                    n = nodes[i]
                    if n.op == "placeholder":
                        v = next(flat)
                    elif n.op == "output":
                        v = None
                    else:
                        v = interp.run_node(n)
                    interp.env[n] = v
                    vals.append(v)
                if i in site_set:
                    # A residual stream is read where it is (the sums), not from the branches writing into it:
                    # measured on digits ViTs, this aligns better than pooling writers and sums.
                    axes = sg_a.node_axes[nodes_a[i]], sg_b.node_axes[nodes_b[i]]
                    is_add = op_name(nodes_a[i]) in ("add", "add_")
                    for la, lb, ra, rb in _leaf_views(vals, *axes, tokens, window):
                        if la.id not in wanted:
                            continue
                        if is_add or la.id not in residual:
                            _add(stats, la.id, la, lb, ra, rb, product_dtype)
                        elif sublayers:  # a branch writing into a residual stream: its own per-sublayer sums
                            _add(out.writers, (i, la.id), la, lb, ra, rb, product_dtype)
                    if sublayers and is_add:
                        mags = [interps[1].env[m].abs().mean().item() for m in nodes_b[i].all_input_nodes]
                        out.operands[i] = [a + b for a, b in zip(out.operands.get(i, [0.0] * len(mags)), mags)]
                    if attention != "heads" and not is_add:
                        _accumulate_joint(out.joint, vals, *axes, tokens, window,
                                          {"full": 0, "shared_qk": 1}[attention], product_dtype)
                for j in free_at[i]:
                    for interp, nodes in zip(interps, (nodes_a, nodes_b)):
                        interp.env.pop(nodes[j], None)
            for interp in interps:
                interp.env.clear()
    return out


def select_tokens(t: torch.Tensor, atoms: list, mode: str, window: int) -> tuple[torch.Tensor, list]:
    """Keep some positions of a token sequence (prefix tokens + a patch grid, as in ViT/DeiT): `cls` the
    prefix tokens, `window` the prefix plus the central window x window patches. Tensors without such a
    sequence (conv maps, Swin windows) keep all positions."""
    if mode == "all":
        return t, atoms
    for d, a in enumerate(atoms):
        r = ax.find(a)
        if r.kind != "sum" or not r.pinned or len(r.children) != 2:
            continue
        grid = [ax.find(c).size for c in ax.find(r.children[1]).children]
        prefix = r.children[0].size
        if len(grid) != 2:
            continue
        if mode == "cls":
            idx = torch.arange(prefix)
        else:
            gh, gw = grid
            k_h, k_w = min(window, gh), min(window, gw)
            rows = torch.arange(k_h) + (gh - k_h) // 2
            cols = torch.arange(k_w) + (gw - k_w) // 2
            idx = torch.cat([torch.arange(prefix), prefix + (rows[:, None] * gw + cols[None, :]).reshape(-1)])
        return t.index_select(d, idx), atoms[:d] + [ax.fresh(len(idx))] + atoms[d + 1:]
    return t, atoms


def _free_axes(vals, axes_a, axes_b, tokens: str, window: int, keep_joint: bool = False):
    """For each free (neuron) axis of a site's output in both models: (atom_a, atom_b, xa, xb, axis) with
    every other free axis averaged out. Only pinned axes (batch, tokens, pixels) pair up as samples; other
    neuron axes are ordered differently in each model (and may differ in width)."""
    ta, tb = vals
    if not isinstance(ta, torch.Tensor) or not ta.dtype.is_floating_point:
        return
    ta, axes_a = ax.expand_products(ta, axes_a, keep_joint)
    tb, axes_b = ax.expand_products(tb, axes_b, keep_joint)
    if len(axes_a) != len(axes_b):
        return
    ta, axes_a = select_tokens(ta, axes_a, tokens, window)
    tb, axes_b = select_tokens(tb, axes_b, tokens, window)
    free = [k for k, atom in enumerate(axes_a) if ax.leaves(atom)]
    for axis in free:
        others = [k for k in free if k != axis]
        xa, xb = (ta.mean(dim=others), tb.mean(dim=others)) if others else (ta, tb)
        yield axes_a[axis], axes_b[axis], xa, xb, axis - sum(k < axis for k in others)


def _accumulate_joint(stats, vals, axes_a, axes_b, tokens: str, window: int, key: int,
                      product_dtype: torch.dtype) -> None:
    """Sums over each projection's heads x head_dim as one neuron set (attention's "full" maps)."""
    for atom_a, atom_b, xa, xb, pos in _free_axes(vals, axes_a, axes_b, tokens, window, keep_joint=True):
        for keys, ra, rb in ax.joint_views(xa, atom_a, xb, atom_b, pos):
            if keys[key] not in stats:
                stats[keys[key]] = (keys, CrossStats(ra.shape[1], rb.shape[1], product_dtype=product_dtype))
            stats[keys[key]][1].update(ra, rb)


def _leaf_views(vals, axes_a, axes_b, tokens: str, window: int):
    """(leaf_a, leaf_b, rows_a, rows_b) for every space a site's output carries (see `axes.paired_views`)."""
    for atom_a, atom_b, xa, xb, pos in _free_axes(vals, axes_a, axes_b, tokens, window):
        yield from ax.paired_views(xa, atom_a, xb, atom_b, pos)


def _add(stats: dict, key, la, lb, ra: torch.Tensor, rb: torch.Tensor, product_dtype: torch.dtype) -> None:
    if key not in stats:
        stats[key] = (lb.id, CrossStats(la.size, lb.size, product_dtype=product_dtype))
    stats[key][1].update(ra, rb)
