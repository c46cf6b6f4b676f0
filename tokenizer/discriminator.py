"""PatchGAN discriminator (pix2pix / VQGAN style): images in [-1, 1] -> a grid of real/fake logits.

GroupNorm instead of BatchNorm: batch statistics would differ per rank under DDP and would mix real and fake
batches; GroupNorm has neither problem.

The input goes in channels_last (NHWC), the layout cuDNN's tensor-core convolutions run in; a convolution
given an NHWC input runs in NHWC, and converts its (small: 2.8M parameters at 64 channels) weight for the
call. The parameters keep the default layout: they are checkpointed with their optimizer state, and fused
AdamW pairs a parameter and its state element by element in memory, so a channels_last parameter resumed
with a default-layout state from an older checkpoint would silently take wrong steps.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, channels: int = 64, num_layers: int = 3, max_channels: int = 512):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            out = min(channels * 2**i, max_channels)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last))  # [B, 1, h, w]
