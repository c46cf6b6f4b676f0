"""Autoregressive sampling for `GPT`: KV cache, classifier-free guidance, temperature, top-k, top-p.

    ids = generate(model, class_labels=torch.tensor([207, 360]), num_tokens=64, cfg_scale=2.0,
                   temperature=1.0, top_k=None, top_p=None)          # LongTensor [2, 64]
    images = tokenizer.decode(ids)                                   # any prefix length k <= K decodes

CFG runs the conditional and the null-class batch together (batch 2B) and mixes the logits,
`uncond + scale * (cond - uncond)`; at scale 1 the null-class half is skipped, so the logits are exactly the
conditional ones. `use_kv_cache=False` recomputes the whole prefix at every step (slow; a test reference).
"""

from __future__ import annotations

import torch

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
    keep_sorted[..., 0] = True
    num_keep = keep_sorted.sum(dim=-1, keepdim=True)  # [..., 1]
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
    """logits [B, V] -> ids [B] (int64). temperature 0 or greedy=True: argmax (first index on ties)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    probs = logits.softmax(dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    With a cache, only the newest position is computed (the cache must hold positions 0..t-1).
    """
    B, t = ids.shape
    use_cfg = cfg_scale != 1.0
    if use_cfg:
        labels = torch.cat([labels, torch.full_like(labels, model.cfg.null_class)])  # [2B]
        ids = torch.cat([ids, ids])  # [2B, t]
    if cache is None:
        logits = model.transformer(model.embed(labels, ids))[:, -1]  # full prefix -> [B', V]
    elif t == 0:
        logits = model.transformer(model.embed(labels, None), 0, cache)[:, -1]  # class token at position 0
    else:
        logits = model.transformer(model.embed(None, ids[:, -1:]), t, cache)[:, -1]  # id_{t-1} at position t
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
) -> torch.Tensor:
    """Sample ids [B, k] (int64), k = num_tokens (default: block_size K).

    class_labels [B] int64, or None for unconditional sampling (null class; then `batch_size` gives B and
    cfg_scale is ignored). The model is switched to eval mode for the call and restored afterwards.
    """
    cfg = model.cfg
    k = cfg.block_size if num_tokens is None else int(num_tokens)
    if not 1 <= k <= cfg.block_size:
        raise ValueError(f"num_tokens must be in 1..{cfg.block_size}, got {k}")
    device = next(model.parameters()).device
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
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model, rows, max_len=k) if use_kv_cache else None
        ids = torch.empty(B, k, dtype=torch.long, device=device)  # [B, k], filled left to right
        for t in range(k):
            logits = next_token_logits(model, labels, ids[:, :t], cfg_scale, cache)  # [B, V]
            ids[:, t] = sample_from_logits(logits, temperature, top_k, top_p, greedy, generator)  # [B]
    finally:
        model.train(was_training)
    return ids
