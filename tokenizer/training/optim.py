"""Optimizer parameter groups, AdamW (fused on GPU), gradient clipping and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

# Learned embeddings that act like positions/queries: regularising them toward zero only hurts (TiTok, ViT).
NO_DECAY_NAMES = ("pos_embed", "latent_tokens", "latent_pos", "patch_query", "patch_pos", "latent_mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on matrices (linear / conv kernels), none on norms, biases, embeddings
    and latent / mask tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim < 2 or leaf in NO_DECAY_NAMES or "embedding" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_adamw(groups: list[dict], lr: float, betas: tuple[float, float], fused: bool | None = None
               ) -> torch.optim.AdamW:
    """AdamW. `fused=None` fuses it (one kernel for the whole update, no per-parameter launches) when every
    parameter is on CUDA; `fused=True` forces it, which torch also supports on CPU: that is how the tests run
    the exact optimizer of a GPU run."""
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=bool(fused))


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of `params` so that their global L2 norm is at most `max_norm`; returns the norm
    before clipping (a device tensor: reading it would sync the host, so only the logging steps do).

    Why not Lightning's `clip_gradients`: it refuses fused optimizers under mixed precision, because with fp16 they
    unscale internally. bf16 has no loss scale (TokenizerModule refuses fp16, whose scaled gradients this would
    clip wrongly)."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad or max_norm <= 0:
        return torch.zeros(())
    # foreach: a few kernels for all tensors; no error_if_nonfinite, which would read the norm on the host
    return torch.nn.utils.clip_grad_norm_(with_grad, max_norm, foreach=True)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the base lr over `warmup_steps`, then cosine decay to `min_lr_ratio * lr`
    at `total_steps` (held there afterwards). Steps are optimizer steps."""
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(warmup_steps + 1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
