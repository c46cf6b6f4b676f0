"""ViT encoder: image patches plus K learned latent tokens -> K continuous token vectors."""

from __future__ import annotations

import torch
from torch import nn

from .config import TokenizerConfig
from .stem import dct_basis
from .vit import Transformer, init_vit_weights


def causal_latent_mask(num_patches: int, num_latents: int, device: torch.device | str) -> torch.Tensor:
    """Boolean attention mask [N+K, N+K] (True = may attend) for ordered latents (FlexTok).

    Patches attend to patches only; latent i attends to all patches and to latents 0..i. Nothing about latent i
    can then depend on latents after it, so the first k tokens are a summary of the image on their own.
    """
    n, k = num_patches, num_latents
    mask = torch.zeros(n + k, n + k, dtype=torch.bool, device=device)
    mask[:, :n] = True
    mask[n:, n:] = torch.ones(k, k, dtype=torch.bool, device=device).tril()
    return mask


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        width = cfg.enc_width
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, width))
        self.latent_tokens = nn.Parameter(torch.zeros(1, cfg.max_tokens, width))  # position included
        # released-weight switches (config.py): a class token first in the sequence, a LayerNorm before the blocks
        self.class_token = nn.Parameter(torch.zeros(1, 1, width)) if cfg.class_token else None  # position included
        self.pre_norm = nn.LayerNorm(width) if cfg.pre_norm else None
        # token_mixing: latent j also starts from a learned linear pooling of the patch embeddings (config.py)
        self.latent_mixing = None  # [K, N], starts as the K lowest 2D-DCT frequencies of the patch grid (stem.py)
        if cfg.token_mixing:
            self.latent_mixing = nn.Parameter(dct_basis(cfg.grid_size, cfg.max_tokens))
        self.transformer = Transformer(width, cfg.enc_depth, cfg.enc_heads, cfg.mlp_ratio)
        self.to_token = nn.Linear(width, out_dim)
        init_vit_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.latent_tokens, std=0.02)
        if self.class_token is not None:
            nn.init.trunc_normal_(self.class_token, std=0.02)
        # unit-variance quantizer input: FSQ/LFQ levels sit at +-1..+-L/2, and a 0.02-std projection would round
        # every token to the central code at init (no usage, no gradient to the decoder's token input).
        nn.init.normal_(self.to_token.weight, std=width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, H, W] in the model's pixel range (config.pixel_range)
        b = x.shape[0]
        patches = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, C]
        latents = self.latent_tokens.expand(b, -1, -1)  # [B, K, C]
        if self.latent_mixing is not None:
            latents = latents + torch.einsum("kn,bnc->bkc", self.latent_mixing, patches)
        sequence = [patches, latents]
        if self.class_token is not None:  # TiTok: [cls, patches, latents]
            sequence.insert(0, self.class_token.expand(b, -1, -1))
        h = torch.cat(sequence, dim=1)  # [B, (1)+N+K, C]
        if self.pre_norm is not None:
            h = self.pre_norm(h)
        mask = None
        if self.cfg.causal_latents:
            mask = causal_latent_mask(self.cfg.num_patches, self.cfg.max_tokens, x.device)
            if self.class_token is not None:  # the class token attends like a patch and is seen like one
                mask = torch.cat([mask[:1], mask], 0)
                mask = torch.cat([mask[:, :1], mask], 1)
        h = self.transformer(h, mask)
        latents = h[:, h.shape[1] - self.cfg.max_tokens :]  # [B, K, C]
        if self.cfg.legacy_token_layout:
            # the [B, K, C] memory read as [B, C, K] (config.py): token j's inputs are the elements j, j+K, ...
            latents = latents.reshape(b, latents.shape[2], latents.shape[1]).transpose(1, 2)  # [B, K, C]
        return self.to_token(latents)  # [B, K, D]
