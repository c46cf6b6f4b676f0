"""Autoregressive sampling for `GPT`: KV cache, classifier-free guidance, temperature, top-k, top-p.

    ids = generate(model, class_labels=torch.tensor([207, 360]), num_tokens=64, cfg_scale=2.0,
                   temperature=1.0, top_k=None, top_p=None)          # LongTensor [2, 64]
    images = tokenizer.decode(ids)                                   # any prefix length k <= K decodes

CFG runs the conditional and the null-class batch together (batch 2B) and mixes the logits,
`uncond + scale * (cond - uncond)`; at scale 1 the null-class half is skipped, so the logits are exactly the
conditional ones. `use_kv_cache=False` recomputes the whole prefix at every step (slow; a test reference).

No host sync per token: the sampler is Gumbel-max, argmax(logits / temperature + Gumbel noise), which draws
from softmax(logits / temperature) exactly, with top-k/top-p as -inf masks built from topk/sort/cumsum
(fixed shapes, no `.item()`, no boolean indexing). `torch.multinomial` would wait for the GPU at every token.
Everything that reads values on the host (label checks) happens once, before the loop.
`precision` ("fp32" | "bf16", default bf16 on CUDA, fp32 on CPU) is an autocast region around the model
calls (`tokenizer.precision`); the KV cache is kept in the compute dtype and the sampler works in fp32.
"""

from __future__ import annotations

import torch

from ..precision import autocast, autocast_dtype, resolve_precision
from .gpt import GPT


class LayerKVCache:
    """Preallocated keys/values of one attention layer: [B, H, K, D] each, filled left to right."""

    def __init__(self, batch_size: int, heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch_size, heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v [B, H, T, D] at positions start_pos.. -> all keys/values so far [B, H, start_pos+T, D]
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One `LayerKVCache` per transformer block; the buffers never change shape (static memory)."""

    def __init__(self, model: GPT, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        cfg = model.cfg
        p = next(model.parameters())
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        self.max_len = cfg.block_size if max_len is None else max_len
        self.layers = [
            LayerKVCache(batch_size, cfg.heads, self.max_len, cfg.head_dim, device, dtype)
            for _ in range(cfg.depth)
        ]


# ---- logit processing --------------------------------------------------------------------------------------
def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits per row (and every logit tied with the k-th); the rest become -inf.

    k None or <= 0 or >= V: no filtering. logits [..., V].
    """
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to >= p.

    The most likely token is always kept; tokens tied with the least likely kept token are kept too (so the
    result never depends on how sort orders ties). p None or >= 1: no filtering; p <= 0: the top token(s).
    """
    if p is None or p >= 1.0:
        return logits
    sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)  # [..., V]
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better-ranked tokens
    keep_sorted = mass_before < p  # [..., V]; a prefix of the sorted order
    # at least the top token; a clamp, not `keep_sorted[..., 0] = True` (a tensor made from Python data)
    num_keep = keep_sorted.sum(dim=-1, keepdim=True).clamp_(min=1)  # [..., 1]
    threshold = sorted_logits.gather(-1, num_keep - 1)  # the least likely kept logit, [..., 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> ids [B] (int64). temperature 0 or greedy=True: argmax (first index on ties).

    Otherwise a draw from softmax(filtered logits / temperature) by the Gumbel-max trick (see
    `gumbel_noise`): no host sync, so a GPU keeps running ahead of the Python loop. A token masked by
    top-k/top-p has logit -inf and noise < +inf, so it is never drawn (at least one token is always kept).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # fp32: bf16 logits would coarsen the distribution
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)  # [B, V], filtered entries -inf
    return (logits + gumbel_noise(logits, generator)).argmax(dim=-1)


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)), u ~ U(0, 1), shaped like `like` (fp32) on its device.

    argmax_i(l_i + g_i) with i.i.d. Gumbel g_i is distributed as softmax(l). u is clamped into the open
    interval so the noise is always finite: +inf noise on a -inf (filtered) logit would be NaN, which argmax
    would pick. The clamp truncates the Gumbel tail at about 16.6 (probability ~6e-8 per draw, far below
    what any test or sample set can see).
    """
    u = torch.rand(like.shape, device=like.device, dtype=torch.float32, generator=generator)  # [0, 1)
    f32 = torch.finfo(torch.float32)
    u = u.clamp_(min=f32.tiny, max=1.0 - f32.eps / 2)  # (0, 1): -log(u) is finite and > 0
    return -torch.log(-torch.log(u))


def cfg_mix(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """logits [2B, ..., V] as [cond; uncond] -> uncond + scale * (cond - uncond) [B, ..., V]."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


# ---- generation -------------------------------------------------------------------------------------------
@torch.no_grad()
def next_token_logits(
    model: GPT, labels: torch.Tensor, ids: torch.Tensor, cfg_scale: float = 1.0, cache: KVCache | None = None
) -> torch.Tensor:
    """Logits [B, V] for the token after ids [B, t] (t >= 0) given class labels [B] (null class allowed).

    With CFG (scale != 1) the model runs on [labels; null] (2B rows) and the cache must hold 2B rows.
    With a cache, only the newest position is computed (the cache must hold positions 0..t-1); then the labels
    are not read at all.
    """
    B, t = ids.shape
    use_cfg = cfg_scale != 1.0
    if cache is not None and t > 0:
        last = ids[:, -1:]  # [B, 1]
        x = model.embed(None, torch.cat([last, last]) if use_cfg else last)  # id_{t-1} at position t
        logits = model.transformer(x, t, cache)[:, -1]  # [B', V]
    else:
        if use_cfg:
            labels = torch.cat([labels, torch.full_like(labels, model.cfg.null_class)])  # [2B]
            ids = torch.cat([ids, ids])  # [2B, t]
        if cache is None:
            logits = model.transformer(model.embed(labels, ids))[:, -1]  # full prefix -> [B', V]
        else:
            logits = model.transformer(model.embed(labels, None), 0, cache)[:, -1]  # class token at position 0
    return cfg_mix(logits, cfg_scale) if use_cfg else logits


@torch.no_grad()
def generate(
    model: GPT,
    class_labels: torch.Tensor | None,
    num_tokens: int | None = None,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_kv_cache: bool = True,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
) -> torch.Tensor:
    """Sample ids [B, k] (int64), k = num_tokens (default: block_size K).

    class_labels [B] int64, or None for unconditional sampling (null class; then `batch_size` gives B and
    cfg_scale is ignored). Labels may live on the CPU: they are range-checked there, then moved to the model's
    device. precision: "fp32" | "bf16" autocast around the model calls (None: bf16 on CUDA, fp32 on CPU).
    The model is switched to eval mode for the call and restored afterwards.
    """
    cfg = model.cfg
    k = cfg.block_size if num_tokens is None else int(num_tokens)
    if not 1 <= k <= cfg.block_size:
        raise ValueError(f"num_tokens must be in 1..{cfg.block_size}, got {k}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    param = next(model.parameters())
    device = param.device
    precision = resolve_precision(precision, device)
    if class_labels is None or cfg.is_unconditional:
        B = batch_size if class_labels is None else len(class_labels)
        if B is None:
            raise ValueError("unconditional sampling needs batch_size (or class_labels to take B from)")
        labels = torch.full((B,), cfg.null_class, dtype=torch.long, device=device)
        cfg_scale = 1.0  # guidance between two identical null-class batches is a no-op
    else:
        labels = model.condition_labels(class_labels, len(class_labels), device, drop=False)  # validates
        B = len(labels)
    rows = 2 * B if cfg_scale != 1.0 else B
    # the cache holds what attention computes in: autocast turns fp32 projections into bf16 (half the memory);
    # autocast leaves other parameter dtypes (an fp64 test model, bf16 weights) as they are
    amp_dtype = autocast_dtype(precision)
    cache_dtype = amp_dtype if amp_dtype is not None and param.dtype == torch.float32 else param.dtype
    was_training = model.training
    model.eval()
    try:
        with autocast(precision, device):
            cache = KVCache(model, rows, max_len=k, dtype=cache_dtype) if use_kv_cache else None
            ids = torch.empty(B, k, dtype=torch.long, device=device)  # [B, k], filled left to right
            # the loop only launches device work: no .item(), no tensors from Python data, no data-dependent
            # shapes (tests/test_sampling.py counts such ops and checks the count does not grow with k)
            for t in range(k):
                logits = next_token_logits(model, labels, ids[:, :t], cfg_scale, cache)  # [B, V] fp32
                ids[:, t] = sample_from_logits(logits, temperature, top_k, top_p, greedy, generator)  # [B]
    finally:
        model.train(was_training)
    return ids
