"""The few collectives the model and the training stages issue themselves, beside what DDP does: the codebook's
statistics, LeCam's EMAs, the discriminator's gradients, codebook-usage counters.

All are no-ops without a process group or with one process (CPU tests), and none reads a value on the host.
Plain torch.distributed (no Lightning): the quantizer and the losses use it too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def average_gradients(module: torch.nn.Module) -> None:
    """Average `module`'s gradients over all ranks in one flat all-reduce: what DDP does for the modules it wraps,
    for one kept out of it. SUM, then divide: gloo has no AVG."""
    world = world_size()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numels]
    dist.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


@torch.no_grad()
def broadcast_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Make every rank hold rank 0's values (in place)."""
    if world_size() == 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """Sum `tensor` over ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(tensor)


__all__ = ["world_size", "average_gradients", "broadcast_from_rank0", "all_reduce_sum"]
