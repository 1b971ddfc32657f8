"""CPU-sized aliases of the families we cover: each trains on the digits in minutes on 2 cores.

Every alias is an ordinary registered builder, so `--arch-args` overrides any of its defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import register_arch

if TYPE_CHECKING:
    from torch import nn


def _timm_model(name: str, num_classes: int, defaults: dict, overrides: dict) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, **{**defaults, **overrides})


def _alias(alias: str, timm_name: str, input_size: int = 32, **defaults):
    def build(num_classes: int = 10, **kwargs) -> nn.Module:
        return _timm_model(timm_name, num_classes, defaults, kwargs)

    build.__doc__ = f"`{alias}`: timm `{timm_name}` with {defaults or 'its own defaults'}."
    build.timm_name = timm_name
    register_arch(alias, img_size=defaults.get("img_size", input_size))(build)


_VIT = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)
_alias("vit", "vit_tiny_patch16_224", **_VIT)
_alias("deit", "deit_tiny_patch16_224", **_VIT)
_alias("swin", "swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4, embed_dim=48,
       depths=(2, 2, 2), num_heads=(3, 6, 12))
_alias("resnet", "resnet18")
_alias("convnext", "convnext_atto", depths=(1, 1, 3, 1), dims=(32, 64, 128, 256))
_alias("mobilevit", "mobilevit_xxs")
_alias("mobilevitv2", "mobilevitv2_050")
_alias("efficientformerv2", "efficientformerv2_s0", img_size=32, depths=(1, 1, 2, 2), embed_dims=(24, 48, 96, 176))


@register_arch("mixer", img_size=32)
def mixer(num_classes: int = 10, img_size: int = 32, patch_size: int = 4, embed_dim: int = 128, num_blocks: int = 4,
          **kwargs) -> nn.Module:
    """`mixer`: timm MLP-Mixer, patch 4 at 32 px, width 128, 4 blocks."""
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=num_classes, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                    num_blocks=num_blocks, **kwargs)


@register_arch("resmlp", img_size=32)
def resmlp(num_classes: int = 10, img_size: int = 32, patch_size: int = 4, embed_dim: int = 96, num_blocks: int = 4,
           **kwargs) -> nn.Module:
    """`resmlp`: timm ResMLP (MlpMixer with ResBlock and Affine norms), patch 4 at 32 px, width 96."""
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    kwargs = {"mlp_ratio": 4, "block_layer": ResBlock, "norm_layer": Affine, **kwargs}
    return MlpMixer(num_classes=num_classes, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                    num_blocks=num_blocks, **kwargs)


@register_arch("pvt", img_size=32)
def pvt(num_classes: int = 10, img_size: int = 32, depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 160),
        num_heads=(1, 2, 4, 5), **kwargs) -> nn.Module:
    """`pvt`: timm PVT-v2, the design of SegFormer's MiT encoder (overlapping patch embeddings, attention on
    spatially reduced keys, a depthwise conv in each MLP), b0's first widths at fewer blocks (1.4 M
    parameters). It runs at any input size: `img_size` only records the one it is trained at."""
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    return PyramidVisionTransformerV2(num_classes=num_classes, depths=depths, embed_dims=embed_dims,
                                      num_heads=num_heads, **kwargs)


@register_arch("efficientformer", img_size=64)
def efficientformer(num_classes: int = 10, img_size: int = 64, depths=(1, 1, 2, 2), embed_dims=(24, 48, 96, 176),
                    num_vit: int = 1, **kwargs) -> nn.Module:
    """`efficientformer`: timm EfficientFormer (L-family) at 64 px with its attention-bias grid resized.

    timm fixes the attention-bias grid at 7x7 (224 px input); at `img_size` the last stage has
    (img_size/32)^2 tokens, so each Attention is rebuilt with that resolution (same layers otherwise).
    """
    from timm.models.efficientformer import Attention, EfficientFormer

    model = EfficientFormer(depths=depths, embed_dims=embed_dims, num_vit=num_vit, num_classes=num_classes, **kwargs)
    resolution = max(int(img_size) // 32, 1)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Attention):
                setattr(parent, child_name, Attention(child.qkv.in_features, key_dim=child.key_dim,
                                                      num_heads=child.num_heads, attn_ratio=child.attn_ratio,
                                                      resolution=resolution))
    return model
