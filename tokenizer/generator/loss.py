"""Cross-entropy of the output head that never holds the fp32 logits of the whole batch.

    loss = linear_cross_entropy(hidden, head.weight, targets)       # == F.cross_entropy(hidden @ W^T, targets)

Targets equal to `ignore_index` (-100, as F.cross_entropy) take no part: the mean is over the other rows, and
the ignored rows get zero gradient (the generator's end-of-image token ignores the positions after the end).

With the large codebooks of LFQ/FSQ (2^16 or 64,000 codes) the logits of a batch of 32 x 256 tokens are
8192 x 65536 fp32 values, 2 GB, and autograd keeps them (plus the softmax) for the backward. Here the rows are
processed in chunks of at most `max_logits` logit values: each chunk's logits are computed, reduced to its
loss, and, when a gradient is needed, turned into that chunk's gradients right away (softmax - one-hot, then
two matmuls), after which the chunk's logits are freed. The backward only scales the stored gradients by the
incoming scalar. Cost: the same three matmuls as the plain head (forward, grad of input, grad of weight);
memory: one chunk of logits plus the gradients of `hidden` [N, C] and of the weight [V, C] (fp32).

Precision: inside an autocast region the matmuls run in the autocast dtype, exactly as `nn.Linear` would, and
the logits are upcast to fp32 before the log-softmax (what `GPT.transformer`'s `.float()` does); the weight
gradient is accumulated over chunks in fp32.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # F.cross_entropy's default: a target that takes no part in the loss
DEFAULT_MAX_LOGITS = 2**25  # logit values per chunk: 128 MB in fp32 (512 rows at a 65,536-code vocabulary)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype an `nn.Linear` on `t` computes in here: the autocast dtype inside autocast, else t's own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, dtype: torch.dtype, ignore_index: int):
        # hidden [N, C], weight [V, C], targets [N] int64 -> mean cross-entropy over the kept rows (fp32 scalar)
        n_rows = hidden.shape[0]
        keep = targets != ignore_index  # [N]
        # a device tensor, never read on the host (no sync); 0 kept rows gives nan, as F.cross_entropy does
        n_kept = keep.sum()
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(dtype, torch.float32)  # logits, loss and weight gradient: fp32 (fp64 stays)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None  # [N, C]
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None  # [V, C]
        with torch.autocast(hidden.device.type, enabled=False):  # the casts below are explicit
            w = weight.to(dtype)  # [V, C]
            for start in range(0, n_rows, chunk_rows):
                end = min(start + chunk_rows, n_rows)
                h = hidden[start:end].to(dtype)  # [n, C]
                kept = keep[start:end, None]  # [n, 1]
                tgt = targets[start:end, None].masked_fill(~kept, 0)  # [n, 1]; ignored rows gather class 0
                logits = (h @ w.T).to(acc)  # [n, V]: the only logits alive at any time
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [n, 1]
                total += (lse - logits.gather(1, tgt)).masked_fill_(~kept, 0).sum()
                if want_h or want_w:
                    grad = logits.sub_(lse).exp_()  # softmax, in place of the logits [n, V]
                    grad.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=grad.dtype))  # - one-hot
                    grad = grad.mul_(kept).div_(n_kept).to(dtype)  # d(mean loss)/d(logits) [n, V]; 0 if ignored
                    if want_h:
                        grad_h[start:end] = (grad @ w).to(hidden.dtype)  # [n, C]
                    if want_w:
                        grad_w += (grad.T @ h).to(acc)  # [V, C]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n_kept

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    max_logits: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index) computed in row chunks (see
    the module docstring).

    hidden [N, C] (float), weight [V, C], targets [N] integer in [0, V) or `ignore_index`. max_logits: logit
    values per chunk (default `DEFAULT_MAX_LOGITS`); at least one row per chunk.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, C] and weight [V, C] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError("linear_cross_entropy of zero rows (the mean is undefined)")
    max_logits = DEFAULT_MAX_LOGITS if max_logits is None else int(max_logits)
    if max_logits < 1:
        raise ValueError(f"max_logits must be >= 1, got {max_logits}")
    chunk_rows = max(1, max_logits // weight.shape[0])
    dtype = compute_dtype(hidden)
    return LinearCrossEntropy.apply(hidden, weight, targets.long(), chunk_rows, dtype, int(ignore_index))


__all__ = ["linear_cross_entropy", "LinearCrossEntropy", "compute_dtype", "DEFAULT_MAX_LOGITS", "IGNORE_INDEX"]
