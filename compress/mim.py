"""Masked-image-modelling pretraining (MAE, He et al. 2022) for any ViT-like model the alignment layer can
shorten: the encoder sees a random 25% of the patches (the others are removed from its sequence), a light
decoder fills the full grid with a learned mask token and reconstructs the pixels of the masked patches.

`compress train --objective mim` uses it to make the masked-image-modelling teacher that Hybrid Distill
(`compress distill --method hybrid --mim-teacher`) reads token relations from.

Example:
    >>> mae = MaskedAutoencoder(create_model("vit"))
    >>> loss = mae(images)                     # MSE on the masked patches' normalised pixels
    >>> train(mae, data.train, cfg, loss_fn=lambda net, x, y: net(x))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .alignment.tokens import keep_tokens, token_layout
from .errors import CompressError


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches in row-major order (MAE's layout).

    Example:
        >>> patchify(torch.zeros(2, 3, 32, 32), 4).shape
        torch.Size([2, 64, 48])
    """
    b, c, h, w = x.shape
    t = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return t.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_keep(batch: int, patches: int, keep: int, device=None) -> torch.Tensor:
    """(batch, keep) sorted random patch positions, a different draw per image (MAE's per-sample shuffle)."""
    noise = torch.rand(batch, patches, device=device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


class MaskedAutoencoder(nn.Module):
    """An encoder (the model being pretrained, kept as `encoder`) with MAE's light decoder beside it.

    Defaults follow MAE: mask ratio 0.75, normalised-pixel targets (per patch mean 0, variance 1: their
    best setting for finetuning), loss on masked patches only; the decoder is narrower and shallower than
    the encoder (MAE: 512 wide, 8 deep for a 768-wide, 12-deep ViT-B; here `decoder_dim`, `decoder_depth`).
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.75, decoder_dim: int = 64, decoder_depth: int = 2,
                 decoder_heads: int = 2, norm_pix: bool = True):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.layout = token_layout(encoder, "MIM model")
        if not self.layout.droppable:
            raise CompressError(f"{type(encoder).__name__} cannot drop masked patches from its sequence",
                                expected="a timm ViT-like model with a patch_drop slot")
        if not 0 < mask_ratio < 1:
            raise CompressError("invalid mask ratio", expected="0 < mask_ratio < 1", found=str(mask_ratio))
        patch = encoder.patch_embed.patch_size
        self.patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.encoder = encoder
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix
        width = int(encoder.num_features)
        in_chans = int(encoder.patch_embed.proj.in_channels)
        n = self.layout.prefix + self.layout.patches
        self.embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.pos = nn.Parameter(torch.zeros(1, n, decoder_dim))
        self.blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, self.patch * self.patch * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def kept(self) -> int:
        return max(1, round(self.layout.patches * (1 - self.mask_ratio)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction loss of one batch (a fresh random mask per image)."""
        b, prefix, n = x.shape[0], self.layout.prefix, self.layout.patches
        keep = random_keep(b, n, self.kept(), x.device)
        with keep_tokens(self.encoder, keep):
            tokens = self.encoder.forward_features(x)  # (B, prefix + K, C), after the encoder's final norm
        t = self.embed(tokens)
        full = self.mask_token.expand(b, n, -1).clone()
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]), t[:, prefix:])
        out = self.pred(self.norm(self.blocks(torch.cat([t[:, :prefix], full], 1) + self.pos)))[:, prefix:]
        target = patchify(x, self.patch)
        if self.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        masked = torch.ones(b, n, device=x.device).scatter(1, keep, 0.0)
        per_patch = F.mse_loss(out, target, reduction="none").mean(-1)
        return (per_patch * masked).sum() / masked.sum()


@torch.no_grad()
def reconstruction_loss(mae: MaskedAutoencoder, data, batch_size: int = 128, seed: int = 0) -> float:
    """Mean masked-patch reconstruction loss over a data set, with a fixed mask draw (comparable runs)."""
    from .device import device_of

    device = device_of(mae)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        was, total, count = mae.training, 0.0, 0
        mae.eval()
        for x, _ in torch.utils.data.DataLoader(data, batch_size=batch_size):
            total += float(mae(x.to(device))) * len(x)
            count += len(x)
        mae.train(was)
    finally:
        torch.set_rng_state(state)
    return total / max(count, 1)
