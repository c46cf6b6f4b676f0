"""ViT decoder: a mask token at every patch position plus the kept latent tokens -> pixels.

The decoder reads any number k <= K of latent tokens. How the missing K-k are represented depends on the
length mechanism the model was trained with (see length.py):
- tail_token_drop / fixed: they are absent. Inference and one-k-per-batch training simply pass k tokens (fewer
  tokens, cheaper decode); per-sample training lengths hide the dropped ones with an attention mask instead.
  Both compute the same function.
- nested_dropout: they are the learned `latent_mask_token`, in training and at inference alike.

Which path runs is decided by the arguments alone, never by the values in a tensor: a data-dependent branch
would make the host wait for the device and break a compiled graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TokenizerConfig
from .length import keep_mask
from .stem import dct_basis
from .vit import Transformer, init_vit_weights
from .vqgan_decoder import VQGANPixelHead


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig, token_dim: int):
        super().__init__()
        self.cfg = cfg
        width, p = cfg.dec_width, cfg.patch_size
        self.token_in = nn.Linear(token_dim, width)
        self.latent_pos = nn.Parameter(torch.zeros(1, cfg.max_tokens, width))
        self.patch_query = nn.Parameter(torch.zeros(1, 1, width))  # one mask token for every patch position
        self.patch_pos = nn.Parameter(torch.zeros(1, cfg.num_patches, width))
        # released-weight switches (config.py): a class token first in the sequence, a LayerNorm before the blocks
        self.class_token = nn.Parameter(torch.zeros(1, 1, width)) if cfg.class_token else None
        self.pre_norm = nn.LayerNorm(width) if cfg.pre_norm else None
        self.latent_mask_token = None
        if cfg.length_mechanism == "nested_dropout":
            self.latent_mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # token_mixing: patch query i also starts from a learned linear spread of the kept latents (config.py)
        self.patch_mixing = None  # [N, K], starts as the transpose of the encoder's DCT pooling (stem.py)
        if cfg.token_mixing:
            self.patch_mixing = nn.Parameter(dct_basis(cfg.grid_size, cfg.max_tokens).T.contiguous())
        self.transformer = Transformer(width, cfg.dec_depth, cfg.dec_heads, cfg.mlp_ratio, cfg.decoder_final_norm)
        channels = cfg.decoder_refine_channels or 3  # per pixel, from the pixel head
        self.vqgan = None  # decoder_head "vqgan": soft VQGAN codes per patch -> conv pixel decoder (vqgan_decoder.py)
        self.to_pixels = None
        if cfg.decoder_head == "vqgan":
            self.vqgan = VQGANPixelHead(width, cfg.grid_size, cfg.vqgan_codebook_size, cfg.vqgan_code_dim,
                                        cfg.vqgan_channels, cfg.vqgan_channel_mult, cfg.vqgan_res_blocks)
        else:
            self.to_pixels = nn.Linear(width, p * p * channels)
        self.conv_out = nn.Conv2d(3, 3, kernel_size=3, padding=1) if cfg.decoder_conv else None  # img + conv(img)
        self.refine = None  # img[:3] + refine(img): a residual conv block across patch borders (config.py)
        if cfg.decoder_refine_channels:
            self.refine = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
                                        nn.Conv2d(channels, 3, 3, padding=1))
        self.to_coarse = nn.Linear(width, 3) if cfg.decoder_coarse_head else None  # one RGB value per patch
        init_vit_weights(self)
        # Residual refinements start as the identity: a small-std conv in series would scale the output down
        # ~10x, and Adam needs hundreds of steps to grow it back (a "mean image" plateau).
        for last in (self.conv_out, self.refine[-1] if self.refine is not None else None, self.to_coarse):
            if last is not None:
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        if not cfg.decoder_conv_residual and self.conv_out is not None:  # conv(img) alone: a ViT-style start
            nn.init.trunc_normal_(self.conv_out.weight, std=0.02)
        for param in (self.latent_pos, self.patch_query, self.patch_pos, self.latent_mask_token, self.class_token):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [B, k, D] quantized vectors (1 <= k <= K); lengths: optional int64 [B], how many of those
        leading tokens each sample keeps (per-sample training lengths). Returns images [B, 3, H, W], nominally
        in the model's pixel range (config.pixel_range; the caller maps it)."""
        cfg = self.cfg
        b, k, _ = tokens.shape
        n, k_max = cfg.num_patches, cfg.max_tokens
        latents = self.token_in(tokens) + self.latent_pos[:, :k]  # [B, k, C]
        attn_mask, tail_keep = None, None
        if self.latent_mask_token is not None:
            # nested dropout: every position past the prefix holds the mask token (+ its position).
            filler = self.latent_mask_token + self.latent_pos  # [1, K, C]
            if k < k_max:
                latents = torch.cat([latents, filler[:, k:].expand(b, -1, -1)], dim=1)  # [B, K, C]
            if lengths is not None:
                keep = keep_mask(lengths, k_max)[:, :, None]  # [B, K, 1]
                latents = torch.where(keep, latents, filler.to(latents.dtype))
        elif lengths is not None:
            # per-sample tail drop: hide the dropped tokens as keys; patch queries never see them.
            tail_keep = keep_mask(lengths, k)  # [B, k]
            keys = torch.cat([torch.ones(b, n, dtype=torch.bool, device=tokens.device), tail_keep], 1)
            if self.class_token is not None:  # the class token, first, is always kept
                keys = torch.cat([keys[:, :1], keys], 1)
            attn_mask = keys[:, None, None, :]  # [B, 1, 1, (1)+N+k]
        queries = (self.patch_query + self.patch_pos).expand(b, -1, -1)  # [B, N, C]
        if self.patch_mixing is not None:
            # the stem reads what attention may read: tail drop zeroes the dropped tokens, nested dropout's
            # dropped slots hold the mask token; a k-prefix at inference uses the first k columns.
            kept = latents if tail_keep is None else latents * tail_keep[:, :, None].to(latents.dtype)
            queries = queries + torch.einsum("nk,bkc->bnc", self.patch_mixing[:, : kept.shape[1]], kept)
        sequence = [queries, latents]
        if self.class_token is not None:  # TiTok: [cls, patch queries, latents]
            sequence.insert(0, self.class_token.expand(b, -1, -1))
        h = torch.cat(sequence, dim=1)  # [B, (1)+N+k', C]
        if self.pre_norm is not None:
            h = self.pre_norm(h)
        h = self.transformer(h, attn_mask)
        first = 1 if self.class_token is not None else 0
        patches = h[:, first : first + n]  # [B, N, C]
        if self.vqgan is not None:
            return self.vqgan(patches)  # [B, 3, H, W]
        img = unpatchify(self.to_pixels(patches), cfg.patch_size, cfg.grid_size)  # [B, 3 or refine C, H, W]
        if self.refine is not None:
            img = img[:, :3] + self.refine(img)
        elif self.conv_out is not None:
            img = img + self.conv_out(img) if cfg.decoder_conv_residual else self.conv_out(img)
        if self.to_coarse is not None:
            coarse = self.to_coarse(patches).transpose(1, 2).reshape(b, 3, cfg.grid_size, cfg.grid_size)
            img = img + F.interpolate(coarse, scale_factor=cfg.patch_size, mode="bicubic", align_corners=False)
        return img

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight of the layer nearest the pixels (the adaptive GAN weight's reference gradient)."""
        if self.vqgan is not None:
            return self.vqgan.last_layer
        if self.refine is not None:
            return self.refine[-1].weight
        return self.conv_out.weight if self.conv_out is not None else self.to_pixels.weight


def unpatchify(pixels: torch.Tensor, p: int, grid: int) -> torch.Tensor:
    """[B, grid*grid, p*p*c] -> [B, c, grid*p, grid*p] (c channels per pixel, channels last within a patch)."""
    b, c = pixels.shape[0], pixels.shape[-1] // (p * p)
    x = pixels.view(b, grid, grid, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, c, gh, p, gw, p]
    return x.reshape(b, c, grid * p, grid * p)
