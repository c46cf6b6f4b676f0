"""Adversarial loss pieces: hinge losses, LeCam regularisation, VQGAN's adaptive generator weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum, world_size


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above +1 and fake logits below -1."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: raise the discriminator's logits on reconstructions."""
    return -fake_logits.mean()


class LeCamEMA(nn.Module):
    """LeCam regularisation (Tseng et al. 2021): keeps D's logits on real and fake close to the EMA of the other
    side's logits, which stabilises GAN training with limited data. The EMAs are buffers (checkpointed)."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("real_ema", torch.zeros(()))
        self.register_buffer("fake_ema", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        means = torch.stack([real_logits.float().mean(), fake_logits.float().mean()])
        # every rank must hold the same EMA (they are buffers of one model): average over ranks
        all_reduce_sum(means)
        means /= world_size()
        self.real_ema.lerp_(means[0], 1 - self.decay)
        self.fake_ema.lerp_(means[1], 1 - self.decay)

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return (F.relu(real_logits - self.fake_ema).pow(2).mean()
                + F.relu(self.real_ema - fake_logits).pow(2).mean())


def adaptive_gan_weight(rec_grad: torch.Tensor, gan_grad: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN (Esser et al. 2021): the weight that gives the GAN term's gradient at the decoder's last layer the norm
    of the reconstruction (+ perceptual) gradient there. Takes those two gradients (with respect to the last layer's
    weight); returns a detached scalar: a weight, not a loss."""
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
