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

from functools import cached_property

import torch
from torch import nn

from ..device import device_of
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
from .tokens import TokenLayout, gather_tokens, keep_tokens, token_layout

__all__ = ["Alignment", "align", "Block", "Space", "SpaceGraph", "Member", "Stage", "attention_maps",
           "logits_and_features", "TokenLayout", "token_layout", "keep_tokens", "gather_tokens"]


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
        return ["token" if {b.kind for b in self._blocks_in(s)} & {"attention", "mlp", "bridge"} else "conv"
                for s in self.stages]

    @cached_property
    def stage_entries(self) -> list[str]:
        """Per canonical stage, the first block inside it: its input is the stage's embedding (the tokens or
        map after the stage's patch embedding / downsampling), which TransKD aligns. A stage without blocks
        (MobileViT's final conv) is its own entry."""
        return [next((b.name for b in self._blocks_in(s) if b.name != s.module), s.module) for s in self.stages]

    def _blocks_in(self, stage: Stage) -> list[Block]:
        """The blocks that are the stage module or lie inside it (ViT's stage `blocks.3` is one block)."""
        return [b for b in self.blocks if b.name == stage.module or b.name.startswith(stage.module + ".")]

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
                "stages_without_blocks": [s.module for s in self.stages if not self._blocks_in(s)
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
