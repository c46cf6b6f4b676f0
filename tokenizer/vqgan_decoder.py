"""The two-stage pixel head of TiTok and One-D-Piece: soft MaskGIT-VQGAN codes -> a convolutional pixel decoder.

TiTok's first stage trains the ViT decoder to predict, per 16x16 patch, which of the 1024 codes a pretrained
MaskGIT-VQGAN would use there; the second stage fine-tunes that VQGAN's decoder behind it. The released weights
hold both, so `decoder_head="vqgan"` (config.py) puts them behind this project's ViT decoder:

    logits = Linear(2W -> V)(tanh(Linear(W -> 2W)(patch)))       # [B, N, V] per patch
    codes  = softmax(logits) @ codebook                            # [B, N, C] a soft code, not an argmax
    image  = VQGANDecoder(codes as [B, C, g, g])                   # [B, 3, 16g, 16g]

The VQGAN decoder is MaskGIT's (VQGAN without its attention layers): a 3x3 conv in, two residual blocks, then
one level per channel multiplier from the coarsest to the finest, each with `res_blocks` residual blocks and,
between levels, a nearest 2x upsampling and a 3x3 conv; GroupNorm(32, eps 1e-6), SiLU and a 3x3 conv to RGB at the
end. At TiTok's size (128 channels, multipliers 1, 1, 2, 2, 4) it has 30.5 M parameters and costs about 187 GFLOP
per 256 px image, more than the whole ViT decoder of S or B; it runs channels_last (the faster conv layout on GPU
and CPU alike).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv (no bias), twice, plus a residual.

    Where the channels change, MaskGIT's block adds a 1x1 projection of the block's OWN OUTPUT, not of its input
    (x_out = h + shortcut(h)): the input never reaches the output directly. The released weights were trained
    that way, so it is kept."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, h, w]
        h = self.conv1(F.silu(self.norm1(x)))  # [B, C_out, h, w]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.shortcut(h) if self.shortcut is not None else x)


class Level(nn.Module):
    """`res_blocks` residual blocks at one resolution, then (except at the finest level) a nearest 2x upsampling
    and a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, res_blocks: int, upsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * res_blocks
        self.blocks = nn.ModuleList(ResidualBlock(a, b) for a, b in zip(channels, channels[1:]))
        self.upsample = nn.Conv2d(out_channels, out_channels, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2h, 2w]
        return x


class VQGANDecoder(nn.Module):
    """[B, code_dim, g, g] -> [B, 3, g * 2^(L-1), g * 2^(L-1)], L = len(channel_mult) (finest level first)."""

    def __init__(self, code_dim: int, channels: int, channel_mult: list[int], res_blocks: int):
        super().__init__()
        widths = [channels * m for m in channel_mult]  # finest first
        coarsest = widths[-1]
        self.conv_in = nn.Conv2d(code_dim, coarsest, 3, padding=1)
        self.mid = nn.ModuleList(ResidualBlock(coarsest, coarsest) for _ in range(res_blocks))
        # processing order, coarsest first; each level reads the previous level's width
        order = list(range(len(widths)))[::-1]
        inputs = [coarsest] + [widths[i] for i in order[:-1]]
        self.levels = nn.ModuleList(Level(c_in, widths[i], res_blocks, upsample=i != 0)
                                    for c_in, i in zip(inputs, order))
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)
        self.to(memory_format=torch.channels_last)  # the conv weights too; a load copies into this layout

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(codes.contiguous(memory_format=torch.channels_last))  # [B, C_L, g, g]
        for block in self.mid:
            h = block(h)
        for level in self.levels:
            h = level(h)  # [B, C_i, 2h, 2w] up to the finest level
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, H, W]


class SoftCodeHead(nn.Module):
    """Per patch: W -> 2W -> Tanh -> logits over the VQGAN's codes -> softmax-weighted codebook vector."""

    def __init__(self, width: int, codebook_size: int, code_dim: int):
        super().__init__()
        self.hidden = nn.Linear(width, 2 * width)
        self.logits = nn.Linear(2 * width, codebook_size)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim) / codebook_size)  # [V, C]

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches: [B, N, W] -> soft codes [B, N, C]
        probs = self.logits(torch.tanh(self.hidden(patches))).softmax(dim=-1)  # [B, N, V]
        return probs @ self.codebook.to(probs.dtype)


class VQGANPixelHead(nn.Module):
    """The whole two-stage head: decoder patch states [B, N, W] on a g x g grid -> images [B, 3, 16g, 16g]."""

    def __init__(self, width: int, grid: int, codebook_size: int, code_dim: int, channels: int,
                 channel_mult: list[int], res_blocks: int):
        super().__init__()
        self.grid = grid
        self.code_head = SoftCodeHead(width, codebook_size, code_dim)
        self.pixel_decoder = VQGANDecoder(code_dim, channels, channel_mult, res_blocks)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b = patches.shape[0]
        codes = self.code_head(patches)  # [B, N, C], patches row-major over the grid
        codes = codes.transpose(1, 2).reshape(b, -1, self.grid, self.grid)  # [B, C, g, g]
        return self.pixel_decoder(codes)

    @property
    def last_layer(self) -> torch.Tensor:
        """The conv nearest the pixels (the adaptive GAN weight's reference gradient)."""
        return self.pixel_decoder.conv_out.weight
