"""TransKD (Liu et al., arXiv 2202.13393): feature and patch-embedding distillation for segmentation
between hierarchical backbones.

- CSF (cross selective fusion): ReviewKD's attention-based fusion run from the deepest stage to the
  shallowest, with selective-kernel attention between the stage's map and the fused map from below;
  each stage's output is projected to the teacher's width and compared with HCL.
- HCL (hierarchical context loss): MSE at full resolution plus pooled 4x4, 2x2, 1x1 MSEs weighted 1/2,
  1/4, 1/8 (only pools smaller than the map's height, as the reference decides), normalised by the weight sum.
- PEA (patch embedding alignment): a linear map of the student's stage embeddings (the tokens entering
  each stage's blocks) to the teacher's width, MSE, per-stage weights (0.1, 0.1, 0.5, 1.0).
- GL-Mixer (variant `gl`): on the last embedding, global attention and a local gated conv mixed by two
  learnable scalars (initialised to 0.5 each; the reference leaves them uninitialised).
- EA (variant `ea`): four extra overlapping patch embeddings (7x7 stride 4 on the image, 3x3 stride 2 on
  the student's stages 1-3; conv + a LayerNorm over each token's channels) emit teacher-width embeddings,
  mixed with PEA by learnable weights 0.1 ... 0.8.
The student is compared at the teacher's grids (bilinear), so input sizes may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EMBED_WEIGHTS = (0.1, 0.1, 0.5, 1.0)


class SelectiveFusion(nn.Module):
    """One CSF step: x = BN(1x1(f_s)); with the fused map y from the stage below, softmax attention over
    the two (selective kernel on GAP(x + y)); out = BN(3x3(u)) at the teacher's width."""

    def __init__(self, c_in: int, mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.fuse = fuse
        if fuse:
            self.squeeze = nn.Sequential(nn.Conv2d(mid, mid // 2, 1, bias=False), nn.BatchNorm2d(mid // 2),
                                         nn.ReLU(inplace=True))
            self.select = nn.Conv2d(mid // 2, 2 * mid, 1)
        self.out = nn.Sequential(nn.Conv2d(mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, f, below=None):
        x = self.reduce(f)
        if self.fuse and below is not None:
            y = F.interpolate(below, size=x.shape[-2:], mode="nearest")
            z = self.squeeze((x + y).mean((2, 3), keepdim=True))
            a = self.select(z).view(x.shape[0], 2, x.shape[1], 1, 1).softmax(1)
            x = a[:, 0] * x + a[:, 1] * y
        return self.out(x), x


def hcl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """ReviewKD's hierarchical context loss between two maps of one shape.

    Example:
        >>> hcl_loss(torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)).item()
        1.0
    """
    loss, total, weight = F.mse_loss(student, teacher), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= student.shape[-2]:  # the map's height decides, as in the reference (a 4x8 map: 2x2 and 1x1)
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        total += weight
    return loss / total


class OverlapEmbed(nn.Module):
    """The embedding assistant's patch embedding: a strided conv, then a LayerNorm over each token's channels
    (SegFormer's OverlapPatchEmbed); NCHW in and out."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(c_out)
        nn.init.normal_(self.proj.weight, 0, (2.0 / (kernel * kernel * c_out)) ** 0.5)  # the reference's fan-out
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GLMixer(nn.Module):
    """Global attention and a local gated 1-D conv over tokens, mixed by two learnable scalars."""

    def __init__(self, dim: int):
        super().__init__()
        heads = next(h for h in (8, 4, 2, 1) if dim % h == 0)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.value = nn.Conv1d(dim, dim, 3, padding=1)
        self.gate = nn.Conv1d(dim, dim, 3, padding=1)
        self.w_attn = nn.Parameter(torch.tensor(0.5))
        self.w_local = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):  # (B, C, H, W) -> same
        t = x.flatten(2).transpose(1, 2)
        glob = self.attn(t, t, t, need_weights=False)[0].transpose(1, 2)
        c = x.flatten(2)
        local = self.value(c) * torch.sigmoid(self.gate(c))
        return (self.w_attn * glob + self.w_local * local).view_as(x)


class TransKDHelpers(nn.Module):
    """Everything TransKD trains beside the student, built from the stage and embedding shapes (C, H, W)."""

    def __init__(self, s_stages, t_stages, s_embeds, t_embeds, variant: str = "base", mid: int = 64):
        super().__init__()
        n = len(s_stages)
        self.csf = nn.ModuleList(SelectiveFusion(s[0], mid, t[0], fuse=i < n - 1)
                                 for i, (s, t) in enumerate(zip(s_stages, t_stages)))
        self.pea = nn.ModuleList(nn.Conv2d(s[0], t[0], 1) for s, t in zip(s_embeds, t_embeds))
        self.mixer = GLMixer(s_embeds[-1][0]) if variant == "gl" else None
        self.ea = None
        if variant == "ea":  # new patch embeddings: the image, then the student's stages 1..n-1
            ins = [3] + [s[0] for s in s_stages[:-1]]
            self.ea = nn.ModuleList(OverlapEmbed(c, t[0], k, s) for c, t, k, s
                                    in zip(ins, t_embeds, [7] + [3] * (n - 1), [4] + [2] * (n - 1)))
            self.ea_weights = nn.Parameter(torch.arange(1, 2 * n + 1, dtype=torch.float32) / 10)

    def loss(self, s_feats, t_feats, s_embeds, t_embeds, x) -> torch.Tensor:
        n = len(s_feats)
        below, feature = None, 0.0
        for i in reversed(range(n)):  # deepest first: each stage fuses the one below it
            out, below = self.csf[i](s_feats[i], below)
            feature = feature + hcl_loss(_at(out, t_feats[i]), t_feats[i].float())
        embed = 0.0
        for i in range(n):
            e = s_embeds[i]
            if self.mixer is not None and i == n - 1:
                e = self.mixer(e)
            e = _at(self.pea[i](e), t_embeds[i])
            if self.ea is not None:
                src = x if i == 0 else s_feats[i - 1]
                e = self.ea_weights[i] * e + self.ea_weights[i + n] * _at(self.ea[i](src), t_embeds[i])
            w = EMBED_WEIGHTS[max(0, i + len(EMBED_WEIGHTS) - n)]  # the deepest stage gets the last weight
            embed = embed + w * F.mse_loss(e, t_embeds[i].float())
        return feature + embed


def _at(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` at `ref`'s grid."""
    return t if t.shape[-2:] == ref.shape[-2:] else F.interpolate(t, size=ref.shape[-2:], mode="bilinear",
                                                                   align_corners=False)
