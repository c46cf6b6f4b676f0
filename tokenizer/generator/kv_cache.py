"""Static KV cache of the GPT: preallocated keys/values per layer, [B, H, K, D] each, that never change shape.

Two ways in: `update(start_pos, k, v)` (a Python int position; returns the keys/values written so far, a prefix
that grows by one per token: prefill and the eager decode loop) and `write(pos, k, v)` (a 1-element int64
tensor position; returns the whole buffer, positions after `pos` masked by the caller: the static decode step,
whose shapes never change, so it compiles once and can be captured in a CUDA graph).

`reusable_cache` keeps one cache per model for the compiled step: CUDA graphs replay on fixed addresses, and a
new cache per `generate` call would mean new addresses (a re-capture) every batch.
"""

from __future__ import annotations

import weakref

import torch


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

    def write(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v [B, H, 1, D] at position pos [1] (int64, on the device) -> the whole buffers [B, H, K, D]
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v

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
            LayerKVCache(batch_size, cfg.heads, self.max_len, cfg.head_dim, device, dtype)
            for _ in range(cfg.depth)
        ]


_REUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its one reusable KVCache


def reusable_cache(model, batch_size: int, max_len: int, dtype, mark_static: bool = False) -> KVCache:
    """The model's reusable cache for (batch_size, max_len, dtype), allocated on first use and replaced (the old
    one freed) when another shape is asked for. Stale values from an earlier call are harmless: slot t is
    written before any query reads it. mark_static: tell torch.compile the buffers have fixed addresses (what
    CUDA graphs need to replay a step that writes into them)."""
    device = next(model.parameters()).device
    cache = _REUSED.get(model)
    if cache is None or cache.key != (batch_size, max_len, device, dtype):
        _REUSED.pop(model, None)  # free the old buffers before allocating the new ones
        cache = KVCache(model, batch_size, max_len=max_len, dtype=dtype)
        if mark_static:
            for layer in cache.layers:
                for t in layer.tensors():
                    torch._dynamo.mark_static_address(t)
        _REUSED[model] = cache
    return cache


__all__ = ["LayerKVCache", "KVCache", "reusable_cache"]
