"""Token structure of transformer models: the patch grid, the prefix tokens, the attention modules whose
maps can be read, and shortening the token sequence (the input of every block) to chosen patches.

Dropping tokens uses the slot timm's ViTs (ViT, DeiT, EVA, BEiT, ...) keep for PatchDropout: `patch_drop`
runs right after the position embedding, so the kept tokens carry their own positions and every block runs
on the shorter sequence (the forward really costs less).

Example:
    >>> layout = token_layout(model)                       # grid (8, 8), 1 prefix token, 4 attention modules
    >>> with keep_tokens(model, torch.tensor([[0, 5, 9]])):   # the CLS token + patches 0, 5, 9
    ...     logits = model(x)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CompressError
from .hooks import hooks


@dataclass(frozen=True)
class TokenLayout:
    """`grid`: patch rows x columns; `prefix`: tokens before the patches (CLS, distillation, registers);
    `attention`: attention modules whose maps `attention_maps` reads, in forward order; `heads` per module;
    `droppable`: whether `keep_tokens` can shorten the sequence."""

    grid: tuple[int, int]
    prefix: int
    attention: list[str]
    heads: list[int]
    droppable: bool

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]


def readable_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the attention modules whose post-softmax map the alignment layer can read: those
    with timm's `fused_attn` switch and an `attn_drop` applied to the softmaxed map."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)]


def token_layout(model: nn.Module, what: str = "model") -> TokenLayout:
    """The token structure of a ViT-like model, or a one-line error saying why it has none.

    Example:
        >>> token_layout(create_model("vit")).grid
        (8, 8)
    """
    name = type(model).__name__
    grid, prefix = _grid_and_prefix(model)
    attn = readable_attention(model)
    if grid is None or not attn:
        raise CompressError(f"the {what} has no readable token attention", found=name,
                            expected="a ViT-like model: a patch embedding with a fixed grid and attention whose maps "
                                     "can be read (timm ViT, DeiT, EVA, BEiT, ...)")
    return TokenLayout(grid, prefix, [n for n, _ in attn], [int(getattr(m, "num_heads", 1)) for _, m in attn],
                       isinstance(getattr(model, "patch_drop", None), nn.Module))


def _grid_and_prefix(model: nn.Module) -> tuple[tuple[int, int] | None, int]:
    """The patch grid (None without one) and the prefix token count, read from the model's attributes."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return (None if grid is None else (int(grid[0]), int(grid[1]))), int(getattr(model, "num_prefix_tokens", 0))


class _Keep(nn.Module):
    """Keeps the prefix tokens and the patches `index` (B, K) of a (B, prefix + N, C) sequence, in order."""

    def __init__(self, index: torch.Tensor, prefix: int):
        super().__init__()
        self.index, self.prefix = index, prefix

    def forward(self, x):
        return _keep_rows(x, self.prefix, self.index.to(x.device))


def _keep_rows(x: torch.Tensor, prefix: int, index: torch.Tensor) -> torch.Tensor:
    """The prefix tokens of a (B, prefix + N, C) sequence, then its patches `index` (B, K), in order."""
    return torch.cat([x[:, :prefix], gather_tokens(x[:, prefix:], index)], dim=1)


@contextlib.contextmanager
def keep_tokens(model: nn.Module, index: torch.Tensor):
    """Inside the context, `model` runs on its prefix tokens plus the patches `index` (B, K; positions in
    the patch grid, row-major) only: the rest are removed from the sequence every block sees.

    Example:
        >>> with keep_tokens(vit, torch.arange(16).expand(8, -1)):   # the first 16 of 64 patches
        ...     vit(x)
    """
    # called on every training step: reads two attributes, not the module tree that token_layout walks
    grid, prefix = _grid_and_prefix(model)
    if grid is None or not isinstance(getattr(model, "patch_drop", None), nn.Module):
        raise CompressError(f"{type(model).__name__} cannot shorten its token sequence",
                            expected="a timm ViT-like model with a patch_drop slot after its position embedding")
    patches = grid[0] * grid[1]
    if index.ndim != 2 or index.numel() and (index.min() < 0 or index.max() >= patches):
        raise CompressError("token indices out of range", expected=f"(batch, K) positions in [0, {patches})",
                            found=f"shape {tuple(index.shape)}")
    original = model.patch_drop
    model.patch_drop = _Keep(index, prefix)
    try:
        yield
    finally:
        model.patch_drop = original


@contextlib.contextmanager
def keep_tokens_from(model: nn.Module, plan: dict[str, torch.Tensor]):
    """Inside the context, each block named in `plan` and every block after it runs on the prefix tokens plus
    the patches `plan[block]` (B, K; positions in the patch grid) only: token pruning inside the model, the
    sequence shortening block by block. Each block's patches must lie among those of the block before it.

    Example:
        >>> plan = {"blocks.2": torch.arange(32).expand(8, -1), "blocks.3": torch.arange(16).expand(8, -1)}
        >>> with keep_tokens_from(vit, plan):        # blocks 0-1 see 64 patches, block 2 32, block 3 16
        ...     vit(x)
    """
    grid, prefix = _grid_and_prefix(model)
    if grid is None:
        raise CompressError(f"{type(model).__name__} has no patch grid to prune tokens from",
                            expected="a timm ViT-like model")
    patches = grid[0] * grid[1]
    state: dict[str, torch.Tensor | None] = {"kept": None}  # the patches the sequence holds now (None: all)

    def start(module, args):
        state["kept"] = None

    def prune(name):
        def fn(module, args):
            x, want = args[0], plan[name].to(args[0].device)
            kept = state["kept"]
            rel = want if kept is None else torch.searchsorted(kept, want)
            if x.shape[1] - prefix != (patches if kept is None else kept.shape[1]) or (
                    kept is not None and not torch.equal(kept.gather(1, rel.clamp_max(kept.shape[1] - 1)), want)):
                raise CompressError(f"token pruning at `{name}`: its patches are not among the sequence's",
                                    expected="each block's kept patches a subset of the block before's",
                                    found=f"{x.shape[1] - prefix} tokens in, {want.shape[1]} asked")
            state["kept"] = want
            return (_keep_rows(x, prefix, rel), *args[1:])
        return fn

    with hooks(model, pre={"": start, **{name: prune(name) for name in plan}}):
        yield


def gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` (B, K) of a (B, N, C) tensor."""
    return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
