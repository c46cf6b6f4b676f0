"""LFQ's entropy aux loss, exactly as vector-quantize-pytorch computes it, in bounded memory.

    per_sample, codebook_entropy = lfq_entropy(x, codebook)   # x [N, d], codebook [V, d] -> two scalars

The library holds [tokens, codebook_size] probabilities several times over (forward + backward of 4096 tokens x
2^16 codes: +7 GiB); `lfq_entropy` computes the same two terms in checkpointed token chunks (+0.5 GiB). Eager, each
chunk is ~25 elementwise passes over [chunk, codebook_size] (8 forward, 7 in the checkpoint's replay, 10 backward)
for almost no FLOPs; `compiled=True` (set by the training module's `compile` switch via
`Quantizer.compiled_entropy`, tokenizer/quantizer.py) runs the chunk through torch.compile, which fuses them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from .compiling import key_compile_cache_by_cpu_isa
from .distributed import world_size
from .gpu import tf32_as_now

# LFQ's softmax temperature: the library's forward() default, which this wrapper always used.
LFQ_INV_TEMPERATURE = 100.0
# Tokens per chunk are chosen so that one [chunk, codebook_size] fp32 tensor holds at most this many elements
# (64 MiB); forward + backward keep a handful of those alive at once. Small codebooks get one chunk.
LFQ_ENTROPY_CHUNK_ELEMENTS = 2**24
# The library's entropy clamps probabilities at this value before the log (lookup_free_quantization.log).
_LFQ_LOG_EPS = 1e-5


def _lfq_entropy_chunk(x: torch.Tensor, codebook: torch.Tensor, inv_temperature: float):
    """x [n, d], codebook [V, d] -> (sum over the n tokens of their clamped entropy, sum of their probs [V])."""
    logits = (2.0 * (x @ codebook.t())) * inv_temperature  # [n, V]; the library's -distance * inv_temperature
    prob = logits.softmax(dim=-1)  # [n, V]
    entropy = (-prob * prob.clamp(min=_LFQ_LOG_EPS).log()).sum()
    return entropy, prob.sum(dim=0)


@functools.cache
def _compiled_lfq_entropy_chunk():
    """_lfq_entropy_chunk under torch.compile, built on first use (importing the quantizer stays cheap).
    fullgraph: the chunk is pure tensor math, so a graph break would be a bug, not a fallback to accept.
    dynamic=None with the token dimension marked dynamic by the caller (maybe_mark_dynamic): one graph serves
    every chunk length, so the short last chunk of any batch size does not recompile, while the codebook
    dimensions (fixed for a model) stay static and get kernels specialised to them. Inductor's defaults are kept
    (no fast-math; the CPU build passes -fno-unsafe-math-optimizations -ffp-contract=off): results equal eager
    up to float32 rounding (summation order, softmax's division), see tests/test_quantizer.py."""
    key_compile_cache_by_cpu_isa()  # tokenizer/compiling.py: a CPU kernel cached for another ISA is wrong
    return torch.compile(_lfq_entropy_chunk, fullgraph=True, dynamic=None)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiably: every rank's loss depends on every rank's input, so the gradient of a
    rank's input is the sum of all ranks' output gradients. (The library's LFQ meant to do this with
    torch.distributed.nn.all_reduce but drops its result, which is a new tensor: its batch entropy is that of the
    local mean divided by the world size.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def _replay_as_forward():
    """torch.utils.checkpoint context_fn: nothing around the forward, its TF32 switches around the replay."""
    return contextlib.nullcontext(), tf32_as_now()


def lfq_entropy(x: torch.Tensor, codebook: torch.Tensor, inv_temperature: float = LFQ_INV_TEMPERATURE,
                chunk_tokens: int | None = None, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """LFQ's two entropy terms, exactly as the library computes them, in chunks of tokens.

    x: [N, d] the quantizer input; codebook: [V, d] the +-1 codes. With p_t = softmax(2 * inv_temperature *
    codebook @ x_t) over the V codes and H(p) = -sum p * log(max(p, 1e-5)) (the library's clamped entropy):
        per_sample = mean_t H(p_t)                 (low: confident bits)
        codebook   = H(mean_t p_t)                 (high: all codes used; mean over ranks under torch.distributed)
    Memory is bounded by chunk_tokens x V (default: LFQ_ENTROPY_CHUNK_ELEMENTS elements) in the forward and the
    backward: each chunk is checkpointed, so its [chunk, V] probabilities are recomputed during backward rather
    than kept for all N tokens at once. `compiled`: each chunk (forward, replay and backward) runs torch.compile'd
    (_compiled_lfq_entropy_chunk): the same loss, fused into a few passes over [chunk, V] instead of ~25.

    Why not factorise the per-sample term over bits (p_t is a product of per-bit Bernoullis, so its Shannon
    entropy is a sum of d binary entropies): the library clamps p at 1e-5 inside the log, which does not
    factorise, and the batch term needs the [chunk, V] probabilities anyway, so the exact clamped per-sample term
    costs one more elementwise pass over a chunk that is already in memory."""
    num_tokens, num_codes = x.shape[0], codebook.shape[0]
    if num_tokens == 0:
        raise ValueError(f"lfq_entropy needs at least one token, got x of shape {tuple(x.shape)}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    chunk = chunk_tokens or max(1, LFQ_ENTROPY_CHUNK_ELEMENTS // num_codes)
    recompute = x.requires_grad and torch.is_grad_enabled() and num_tokens > chunk
    chunk_fn = _compiled_lfq_entropy_chunk() if compiled else _lfq_entropy_chunk
    entropy_sum, prob_sum = x.new_zeros(()), x.new_zeros(num_codes)  # scalar, [V]
    for start in range(0, num_tokens, chunk):
        part = x[start : start + chunk]  # [n, d]
        if compiled:  # n varies with the batch size (last chunk): one dynamic graph, not one per n
            torch._dynamo.maybe_mark_dynamic(part, 0)
        if recompute:
            # the replay in backward runs under the TF32 switches of this forward (the quantizer's ieee_fp32 has
            # ended by then): the same numbers, and no recompile of the compiled chunk for another global state
            h, p = checkpoint(chunk_fn, part, codebook, inv_temperature, use_reentrant=False,
                              preserve_rng_state=False, context_fn=_replay_as_forward)  # fmt: skip
        else:  # one chunk: keeping its activations is within the budget, recomputing would only cost time
            h, p = chunk_fn(part, codebook, inv_temperature)
        entropy_sum, prob_sum = entropy_sum + h, prob_sum + p
    per_sample = entropy_sum / num_tokens
    avg_prob = prob_sum / num_tokens  # [V]
    if world_size() > 1:  # the batch distribution is the mean over all ranks' tokens (see _AllReduceSum)
        avg_prob = _AllReduceSum.apply(avg_prob) / world_size()
    codebook_entropy = (-avg_prob * avg_prob.clamp(min=_LFQ_LOG_EPS).log()).sum()
    return per_sample, codebook_entropy


__all__ = ["lfq_entropy", "LFQ_INV_TEMPERATURE", "LFQ_ENTROPY_CHUNK_ELEMENTS"]
