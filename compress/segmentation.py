"""A light segmentation network over any backbone the alignment layer can tap.

The head fuses the canonical stage maps (1x1 projections, upsampled to the finest stage, summed), then a
3x3 conv and a per-pixel classifier, upsampled to the input. It is the standard FPN-lite head; TransKD and
other pipelines only need the taps, which come from the same alignment layer.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .alignment.taps import all_stages, canonical_stages, stage_features
from .checkpoint import Checkpoint, InputSpec, load_weights
from .errors import CompressError
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


def segmenter_from(classifier: Checkpoint, num_classes: int, size: int | None = None,
                   seed: int | None = None) -> Checkpoint:
    """A segmentation checkpoint whose backbone starts from `classifier`'s weights (timm's pretrained
    weights, an MAE encoder, a model trained on labels) and whose head is fresh: how a segmentation network is
    usually started. At another input size a backbone bound to its size (a ViT's position embeddings, a Swin's
    relative-position tables) is resampled by timm's own filter for its family, as timm loads pretrained weights
    at a new size; a convolutional backbone is taken as it is. `seed` seeds the fresh head.

    Example:
        >>> seg = segmenter_from(load("vit-digits.pt"), num_classes=11, size=64)
        >>> seg.task, seg.input.size, seg.arch_args["img_size"]
        ('segmentation', 64, 64)
    """
    name = classifier.source or classifier.arch
    if classifier.task != "classification":
        raise CompressError(f"{name} is a {classifier.task} model", expected="a classifier to take the backbone of")
    if classifier.structure:  # its surgery names the classifier's modules, not the segmentation network's
        raise CompressError(f"{name} is a pruned classifier: its backbone cannot start a segmentation network",
                            expected="an unpruned classifier", found=f"{len(classifier.structure)} structure edits")
    size, trained_at = size or classifier.input.size, classifier.input.size
    args = dict(classifier.arch_args)
    model = create_model(classifier.arch, num_classes=classifier.num_classes, **args)
    # a backbone bound to its input size (a patch embedding with a fixed grid: ViT, Swin, Mixer) is rebuilt at
    # the new size; a convolutional one works at any size as it is
    if size != trained_at and _size_bound(model):
        args["img_size"] = size
        model = create_model(classifier.arch, num_classes=classifier.num_classes, **args)
    state = dict(classifier.state_dict)
    resample = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if size != trained_at and resample is not None:
        state = resample(state, model)
    try:
        load_weights(model, state, classifier.arch)
    except CompressError as e:
        if size == trained_at:
            raise
        raise CompressError(f"cannot resize the weights of {name} from {trained_at} to {size} px", found=str(e),
                            hint=f"start the segmentation network at the classifier's size, {trained_at}") from None
    if not hasattr(model, "reset_classifier"):
        raise CompressError(f"cannot tell the backbone of {name} from its classifier",
                            expected="a timm model (reset_classifier)", found=type(model).__name__)
    model.reset_classifier(0)
    if seed is not None:
        torch.manual_seed(seed)
    seg = SegmentationNet(classifier.arch, num_classes, args, size)
    load_weights(seg.backbone, model.state_dict(), classifier.arch)
    ckpt = Checkpoint(classifier.arch, args, num_classes, "segmentation",
                      InputSpec(size, classifier.input.mean, classifier.input.std), seg.state_dict())
    ckpt.source = classifier.source  # the file the weights came from: a parent in the derived provenance
    return ckpt


def _size_bound(model: nn.Module) -> bool:
    """Whether `model` is built for one input size: it embeds patches on a fixed grid (timm's PatchEmbed with
    an image size: ViT, Swin, Mixer)."""
    from timm.layers import PatchEmbed

    return any(isinstance(m, PatchEmbed) and m.img_size is not None for m in model.modules())
