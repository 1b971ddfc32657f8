"""The layer-alignment abstraction: the one place that knows a model's structure.

Every pipeline asks an `Alignment` and none pokes at timm internals by itself:

- *taps* (`stages`, `features`, `embedding`, `attention_maps`): where to read representations, as NCHW;
- *spaces* (`spaces`): which parameter axes share one neuron basis, derived from the traced graph;
- *blocks* (`blocks`): the ordered residual units with their kind (conv / attention / mlp / bridge);
- *tokens* (`tokens`, `keep_tokens`): a transformer's patch grid, prefix tokens and readable attention, and
  its token sequence shortened to chosen patches.

Example:
    >>> al = align(create_model("vit"), input_size=32)
    >>> [s.module for s in al.stages]
    ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3']
    >>> len(al.spaces.spaces), al.blocks[0].kind
    (13, 'attention')
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import nn

from ..device import device_of
from ..errors import CompressError
from .blocks import Block, find_blocks
from .spaces import Member, Space, SpaceGraph, find_spaces
from .taps import (
    Stage,
    all_stages,
    attention_maps,
    canonical_stages,
    embedding_features,
    logits_and_features,
    stage_features,
)
from .tokens import TokenLayout, gather_tokens, keep_tokens, keep_tokens_from, token_layout

__all__ = ["Alignment", "align", "Block", "Space", "SpaceGraph", "Member", "Stage", "attention_maps",
           "logits_and_features", "TokenLayout", "token_layout", "keep_tokens", "keep_tokens_from", "gather_tokens"]


class Alignment:
    """Structure of one model at one input size. Spaces and blocks are traced lazily, once."""

    def __init__(self, model: nn.Module, input_size: int = 32, in_chans: int = 3):
        self.model = model
        self.input_size = input_size
        self.example = torch.randn(1, in_chans, input_size, input_size, device=device_of(model))

    @cached_property
    def stages(self) -> list[Stage]:
        return canonical_stages(self.model)

    @cached_property
    def all_stages(self) -> list[Stage]:
        return all_stages(self.model)

    @cached_property
    def spaces(self) -> SpaceGraph:
        return find_spaces(self.model, self.example)

    @cached_property
    def blocks(self) -> list[Block]:
        return find_blocks(self.model, self.example)

    @cached_property
    def stage_families(self) -> list[str]:
        """Per canonical stage, `token` when its blocks attend or mix tokens (attention, mlp, bridge), else
        `conv`: which kind of projector a distillation method should put behind it."""
        return ["token" if {b.kind for b in inside} & {"attention", "mlp", "bridge"} else "conv"
                for inside in self._stage_blocks]

    @cached_property
    def stage_entries(self) -> list[str]:
        """Per canonical stage, the first block inside it: its input is the stage's embedding (the tokens or
        map after the stage's patch embedding / downsampling), which TransKD aligns. A stage without blocks
        (MobileViT's final conv) is its own entry."""
        known = dict(self.model.named_modules())
        out = []
        for s, inside in zip(self.stages, self._stage_blocks):
            entry = next((b.name for b in inside if b.name != s.module), s.module)
            if entry not in known:
                raise CompressError(f"{type(self.model).__name__}: no block found for stage `{s.module}`",
                                    expected=f"a module `{s.module}` or a block at 1/{s.reduction} resolution",
                                    found=f"blocks at {sorted({b.out_shape for b in self.blocks})}")
            out.append(entry)
        return out

    def _inside(self, stage: Stage) -> list[Block]:
        """The blocks that are the stage module or lie inside it (ViT's stage `blocks.3` is one block)."""
        return [b for b in self.blocks if b.name == stage.module or b.name.startswith(stage.module + ".")]

    @cached_property
    def _stage_blocks(self) -> list[list[Block]]:
        """Per canonical stage, its blocks: those inside its module. Where feature_info names a module the model
        does not have (HRNet's `stage1` of its features-only wrapper, MViTv2's `block.0` for `stages.0`), they
        are found by resolution: the blocks at the stage's grid after the previous stage's first one, up to the
        next stage's first."""
        known = dict(self.model.named_modules())
        found = [self._inside(s) if s.module in known else None for s in self.stages]
        start = 0
        for i, s in enumerate(self.stages):
            if found[i] is None:
                found[i] = [b for b in self.blocks[start:] if self._at_grid(b, s.reduction)]
            start = found[i][0].index + 1 if found[i] else start
        for i, s in enumerate(self.stages):
            if s.module not in known:
                end = next((f[0].index for f in found[i + 1:] if f), len(self.blocks))
                found[i] = [b for b in found[i] if b.index < end]
        return found

    def _at_grid(self, block: Block, reduction: int) -> bool:
        """Whether `block`'s output holds the grid of a stage at `reduction` (a map, NCHW or NHWC, or a token
        sequence with at most its prefix tokens more)."""
        side = {max(math.floor(self.input_size / reduction), 1), math.ceil(self.input_size / reduction)}
        shape = block.out_shape
        if len(shape) == 3:
            return any(shape[a] in side and shape[a + 1] in side for a in (0, 1))
        prefix = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        return len(shape) == 2 and any(shape[0] - p == h * h for h in side for p in {0, prefix})

    def gaps(self) -> dict:
        """What the alignment layer could not understand in this model, for a user to see before running a
        pipeline: ops without a spaces rule (their axes are pinned), spaces dropped because permuting them
        changed the model's outputs (a rule wrong for this model), parameter tensors with no free axis
        (fusion and width pruning leave them as they are), canonical stages in which no block was found
        (depth pruning and Q-HyViT's bridges see nothing there).

        Example:
            >>> align(create_model("vit"), 32).gaps()["stages_without_blocks"]
            []
        """
        from .axes import leaves

        state = dict(self.model.named_parameters())
        pinned = [(n, state[n].numel()) for n, atoms in self.spaces.tensor_axes.items()
                  if n in state and state[n].numel() > 1 and not any(leaves(a) for a in atoms)]
        total = sum(t.numel() for t in state.values()) or 1
        return {"unknown_ops": self.spaces.unknown_ops, "rejected_spaces": self.spaces.rejected,
                "pinned_tensors": [n for n, _ in sorted(pinned, key=lambda p: -p[1])],
                "pinned_share": round(sum(k for _, k in pinned) / total, 4),
                "stages_without_blocks": [s.module for s, inside in zip(self.stages, self._stage_blocks) if not inside
                                          and not any(s.module.startswith(b.name + ".") for b in self.blocks)],
                "coverage": round(self.spaces.coverage(self.model.state_dict()), 4)}

    @cached_property
    def tokens(self) -> TokenLayout:
        """The patch grid, prefix tokens and readable attention modules (a one-line error for a model without)."""
        return token_layout(self.model)

    def features(self, x: torch.Tensor, stages: list[Stage] | None = None) -> list[torch.Tensor]:
        """NCHW outputs of `stages` (default: the canonical stages)."""
        return stage_features(self.model, x, stages or self.stages)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW output of the patch embedding / stem."""
        return embedding_features(self.model, x)

    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Post-softmax attention maps (B, heads, N, N) of every attention module that exposes them."""
        with attention_maps(self.model) as maps:
            self.model(x)
        return dict(maps)


def align(model: nn.Module, input_size: int = 32, in_chans: int = 3) -> Alignment:
    return Alignment(model, input_size, in_chans)
