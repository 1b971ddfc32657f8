"""A light segmentation network over any backbone the alignment layer can tap.

The head fuses the canonical stage maps (1x1 projections, upsampled to the finest stage, summed), then a
3x3 conv and a per-pixel classifier, upsampled to the input. It is the standard FPN-lite head; TransKD and
other pipelines only need the taps, which come from the same alignment layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .alignment.taps import all_stages, canonical_stages, stage_features
from .registry import create_model


class SegmentationNet(nn.Module):
    """Backbone `arch` + FPN-lite head predicting `num_classes` (background included) per pixel.

    Example:
        >>> net = SegmentationNet("resnet", num_classes=11, img_size=64)
        >>> net(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 11, 64, 64])
    """

    def __init__(self, arch: str, num_classes: int, arch_args: dict | None = None, img_size: int = 64,
                 head_dim: int = 64):
        super().__init__()
        self.backbone = create_model(arch, num_classes=0, **(arch_args or {}))
        self.stages = canonical_stages(self.backbone)
        self.lateral = nn.ModuleList(nn.Conv2d(s.channels, head_dim, 1) for s in self.stages)
        self.fuse = nn.Sequential(nn.Conv2d(head_dim, head_dim, 3, padding=1, bias=False), nn.BatchNorm2d(head_dim),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(head_dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_intermediates(x, [])[0])

    def forward_intermediates(self, x: torch.Tensor, indices: list[int], intermediates_only: bool = False):
        """timm's protocol, indexed by the backbone's feature_info: (what the head reads: the canonical stage
        maps and the input size; the NCHW maps of the stages at `indices`) from one backbone pass.
        Distillation taps a backbone whose feature_info names modules it does not have (HRNet's `stage1`,
        MViTv2's `block.0`) through it.

        Example:
            >>> final, [s1] = net.forward_intermediates(x, [net.stages[0].index])
        """
        have = {s.index for s in self.stages}  # the head's own stages; others looked up only when asked for
        extra = [s for s in all_stages(self.backbone) if s.index in indices and s.index not in have] \
            if set(indices) - have else []
        stages = sorted(self.stages + extra, key=lambda s: s.index)
        maps = dict(zip((s.index for s in stages), stage_features(self.backbone, x, stages)))
        taken = [maps[i] for i in indices]
        return taken if intermediates_only else (([maps[s.index] for s in self.stages], x.shape[-2:]), taken)

    def forward_head(self, final: tuple[list[torch.Tensor], torch.Size]) -> torch.Tensor:
        feats, x_size = final
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        y = sum(F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
                for lat, f in zip(self.lateral, feats))
        y = self.classifier(self.fuse(y))
        return F.interpolate(y, size=x_size, mode="bilinear", align_corners=False)
