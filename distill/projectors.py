"""Helper modules trained with the student and stripped from it afterwards: OFA's exit branches (one per
student stage, projecting into logit space) and FitNets' regressors. Built from stage shapes and the
family of the blocks behind each stage, never from architecture names; grids are computed."""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from compress.errors import CompressError


class SepConv(nn.Sequential):
    """OFA's separable conv pair: depthwise 3x3 (stride) + 1x1 + BN + ReLU, twice; `c_in` -> `c_out`."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
            nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated, normalised and projected: (B, C, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int, act: bool):
        super().__init__()
        self.norm = nn.LayerNorm(4 * c_in)
        self.proj = nn.Linear(4 * c_in, c_out)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x):
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            x = nn.functional.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        x = nn.functional.pixel_unshuffle(x, 2)  # (B, 4C, H/2, W/2)
        t = self.act(self.proj(self.norm(x.flatten(2).transpose(1, 2))))
        return t.transpose(1, 2).reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])


class TokenBranch(nn.Module):
    """OFA's branch for token (ViT / MLP / hybrid attention) stages: the patches merge down to the final grid,
    a few transformer blocks run over [prefix tokens, patches], and a linear classifier reads the CLS token
    (the first prefix token) or, for a student without one, the mean of the patches (the reference's
    TokenFnContext / TokenFilter / GAP1d; no norm before the classifier, as there)."""

    def __init__(self, channels: int, side: int, final_side: int, dim: int, blocks: int, num_classes: int,
                 prefix: int = 0):
        super().__init__()
        merges = max(int(math.log2(max(side // max(final_side, 1), 1))), 0)
        layers: list[nn.Module] = []
        c = channels
        for i in range(merges):  # the first merge projects to the student's width; all but the last have GELU
            layers.append(PatchMerging(c, dim, act=i == 0 or i < merges - 1))
            c = dim
        self.merge = nn.Sequential(*layers)
        self.proj = nn.Linear(c, dim) if c != dim else nn.Identity()
        # the prefix tokens skip the merging; where the stage is narrower than the student's width (a hybrid's
        # early stage) they get their own projection (the reference's students all have stage width = width)
        self.prefix = prefix
        self.prefix_proj = nn.Linear(channels, dim) if prefix and channels != dim else nn.Identity()
        heads = next(h for h in (4, 3, 2, 1) if dim % h == 0)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(blocks)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x, prefix=None):
        t = self.proj(self.merge(x).flatten(2).transpose(1, 2))
        if not self.prefix:
            return self.head(self.blocks(t).mean(1))
        if prefix is None:
            raise CompressError("OFA's token branch was built to read the stage's CLS token",
                                expected="the stage's prefix tokens (StageMaps.prefix from the taps)", found="none")
        t = self.blocks(torch.cat([self.prefix_proj(prefix), t], 1))
        return self.head(t[:, 0])


class ConvBranch(nn.Module):
    """OFA's branch for convolutional stages: (remaining stages) stride-2 SepConvs doubling the channels
    (the last to `dim`), or a 1x1 conv for the last stage; global pooling; a linear classifier."""

    def __init__(self, channels: int, remaining: int, dim: int, num_classes: int):
        super().__init__()
        if remaining == 0:
            self.body = nn.Conv2d(channels, dim, 1)
        else:
            widths = [channels * 2 ** (i + 1) for i in range(remaining - 1)] + [dim]
            ins = [channels] + widths[:-1]
            self.body = nn.Sequential(*[SepConv(a, b) for a, b in zip(ins, widths)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x, prefix=None):
        return self.head(self.body(x).mean((2, 3)))


def ofa_branch(shape: tuple[int, int, int], family: str, stage: int, stages: int, final_side: int,
               student_dim: int, teacher_dim: int, num_classes: int, prefix: int = 0) -> nn.Module:
    """The exit branch for stage `stage` (0-based of `stages`) with NCHW output `shape` = (C, H, W); a token
    branch with `prefix` > 0 reads the CLS token, the first of the stage's `prefix` prefix tokens.

    Example:
        >>> ofa_branch((96, 8, 8), "token", 0, 4, 8, 96, 512, 10)(torch.randn(2, 96, 8, 8)).shape
        torch.Size([2, 10])
    """
    c, h, _ = shape
    if family == "conv":
        branch = ConvBranch(c, stages - 1 - stage, max(student_dim, teacher_dim), num_classes)
    else:
        branch = TokenBranch(c, h, final_side, student_dim, max(stages - 1 - stage, 1), num_classes, prefix)
    branch.apply(_init)
    return branch


def regressor(c_in: int, c_out: int) -> nn.Module:
    """FitNets' regressor: 1x1 conv + BN from the student's channels to the teacher's."""
    r = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
    r.apply(_init)
    return r


def _init(m: nn.Module) -> None:  # OFA's: Kaiming for convs, truncated normal for linears
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


