"""Static KV cache of the GPT: preallocated keys/values per layer, [B, H, K + 1, D] each, that never change shape.

Two ways in: `update(start_pos, k, v)` (a Python int position; returns the keys/values written so far, a prefix
that grows by one per token: prefill and the eager decode loop) and `write(pos, k, v, span)` (a 1-element int64
tensor position; returns the first `span` slots, span >= pos + 1: the compiled decode step, whose span is a
dynamic size, so it compiles once for every span and k and reads only the filled prefix, rounded up to a window).

Why K + 1 slots: the step reads `narrow(2, 0, span)` with span <= K. Were the buffer exactly K slots, the view at
span = K would be the whole (contiguous) buffer and every other span a strided view; Dynamo guards on that
difference and would compile a second graph for the last window. One spare slot, never read, keeps every view
strided alike (cost: 1/K more memory).

`reusable_cache` keeps one cache per model, batch rows and dtype for the compiled step, sized to the model's K
once: CUDA graphs replay on fixed addresses, and a new cache per `generate` call (or per k) would mean new
addresses (a re-capture) or new shapes (a recompile) every batch.
"""

from __future__ import annotations

import weakref

import torch


class LayerKVCache:
    """Preallocated keys/values of one attention layer: [B, H, K + 1, D] each, filled left to right."""

    def __init__(self, batch_size: int, heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch_size, heads, max_len + 1, head_dim)  # + 1: the spare slot (module docstring)
        # zeros, not empty: a masked stale slot still enters softmax(.) @ V as 0 * value, and 0 * NaN is NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v [B, H, T, D] at positions start_pos.. -> all keys/values so far [B, H, start_pos+T, D]
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def write(
        self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: int | torch.SymInt
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v [B, H, 1, D] at position pos [1] (int64, on the device) -> the first span slots [B, H, span, D]
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        # narrow, not [:, :, :span]: a slice would guard on span < K + 1 and specialise span at the end
        return self.k.narrow(2, 0, span), self.v.narrow(2, 0, span)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v


class KVCache:
    """One `LayerKVCache` per transformer block; the buffers never change shape (static memory)."""

    def __init__(self, model, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        cfg = model.cfg
        p = next(model.parameters())
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        self.max_len = cfg.max_tokens if max_len is None else max_len
        self.key = (batch_size, self.max_len, torch.device(device), dtype)
        self.layers = [
            LayerKVCache(batch_size, cfg.heads, self.max_len, cfg.head_dim, device, dtype) for _ in range(cfg.depth)
        ]


_REUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(rows, device, dtype): KVCache}


def reusable_cache(model, batch_size: int, dtype, mark_static: bool = False) -> KVCache:
    """The model's cache for (batch_size rows, dtype), sized to its K (`cfg.max_tokens`) and allocated on first
    use; later calls with the same rows and dtype, whatever their k, get the same buffers. Each (rows, dtype)
    keeps its own cache while the model lives (a gFID sweep meets at most four: B or 2B rows with or without
    CFG, and the same for a smaller last batch). Stale values from an earlier call are harmless: slot t is
    written before any query reads it, and the slots after it that a step reads are masked. mark_static: tell
    torch.compile the buffers have fixed addresses (what CUDA graphs need to replay a step that writes into
    them)."""
    device = next(model.parameters()).device
    caches = _REUSED.setdefault(model, {})
    key = (batch_size, device, dtype)
    if key not in caches:
        cache = KVCache(model, batch_size, dtype=dtype)
        if mark_static:
            for layer in cache.layers:
                for t in layer.tensors():
                    torch._dynamo.mark_static_address(t)
        caches[key] = cache
    return caches[key]


def release_caches(model) -> None:
    """Free the model's reusable caches (`reusable_cache`); the next compiled `generate` allocates anew."""
    _REUSED.pop(model, None)


__all__ = ["LayerKVCache", "KVCache", "reusable_cache", "release_caches"]
