"""The paper's per-sublayer residual maps (Imfeld et al., `resid_policy` in the reference code).

A residual stream is one space, so one shared map moves it exactly when the map is a permutation
(`residual="shared"`, fuse/fusion.py). The paper instead gives every branch writing into the stream its own
map, solved from that branch's output activations, and carries `policy(T_stream, T_branch)` past each
residual add: `mean` = (T_stream + T_branch) / 2, or `weighted` by the mean |activation| of the two operands
(measured on the anchor). Every parameter axis on the stream then takes the map of the activation it
writes (rows, biases, norm and LayerScale vectors: "out") or reads (a next layer's input columns: "in").

Nothing here is architecture-specific: the walk follows the traced graph, so it covers ViT blocks, the
patch embedding with its cls and position tokens, and ResNet blocks with or without a downsample shortcut.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from compress.alignment import axes as ax
from compress.alignment.spaces import SpaceGraph

from .stats import CrossStats, Statistics


def stream_couplings(sg: SpaceGraph, stats: Statistics, solve: Callable[[CrossStats, str], torch.Tensor],
                     policy: str) -> dict[tuple[str, int], dict[int, torch.Tensor]]:
    """Couplings of the residual-stream axes, one per parameter axis: {(tensor, axis): {space id: T}}.

    `solve(stats, name)` turns one writer's statistics into a coupling. Axes the walk does not reach keep
    the space's shared map (they are left out of the result).

    Example:
        >>> stats = cross_statistics(sg_a, sg_b, state_a, state_b, batches, sublayers=True)
        >>> couplings = stream_couplings(sg_a, stats, lambda st, name: solve(cost(st)).coupling, "mean")
    """
    nodes = list(sg.traced.graph.nodes)
    placeholder = {name: node for node, name in sg.traced.tensors.items()}
    out: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    for space in (s for s in sg.spaces if s.residual):
        carried: dict[fx.Node, torch.Tensor] = {}  # node -> coupling of the activation it computes
        for i, n in enumerate(nodes):
            if n in sg.node_axes and not _carries(sg, n, space.id):
                continue  # (tuple-valued nodes such as native_layer_norm have no axes: they pass maps on)
            if (i, space.id) in stats.writers:
                carried[n] = solve(stats.writers[(i, space.id)][1], f"{space.name}@{n.name}")
                continue
            ins = [m for m in n.all_input_nodes if m in carried]
            if len(ins) == 1:
                carried[n] = carried[ins[0]]
            elif ins:  # a residual add: the stream meets a branch
                w = stats.operands.get(i) if policy == "weighted" else None
                w = w if w and len(w) == len(ins) else [1.0] * len(ins)
                carried[n] = sum(wi * carried[m] for wi, m in zip(w, ins)) / sum(w)
        for m in space.members:
            t = _coupling_at(placeholder[m.tensor], m.role, space.id, sg, carried) if m.tensor in placeholder else None
            if t is not None:
                out.setdefault((m.tensor, m.axis), {})[space.id] = t
    return out


def _carries(sg: SpaceGraph, n: fx.Node, space_id: int) -> bool:
    return any(leaf.id == space_id for a in sg.node_axes[n] for leaf in ax.leaves(a))


def _coupling_at(param: fx.Node, role: str, space_id: int, sg: SpaceGraph, carried: dict) -> torch.Tensor | None:
    """The map of the activation a parameter writes ("out": the first node it reaches that computes on the
    stream) or reads ("in": the stream activation its consumer contracts it with)."""
    frontier, seen = [param], {param}
    while frontier:
        n = frontier.pop(0)
        for u in n.users:
            if role == "out" and u in carried:
                return carried[u]
            if role == "in":
                read = [m for m in u.all_input_nodes if m in carried and m is not n]
                if read:
                    return carried[read[0]]
            if u not in seen and u in sg.node_axes and _carries(sg, u, space_id):
                seen.add(u)
                frontier.append(u)
    return None
