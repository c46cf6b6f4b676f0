"""The one-token decode step of sampling, with classifier-free guidance, eager or compiled.

    logits = decode_step(model, last_ids, pos, cache, cfg_scale)      # [B, V] fp32
    step = compiled_decode_step({"mode": "reduce-overhead"})          # torch.compile'd, cached per options

The position is a 1-element int64 tensor on the device and the cache is written with `index_copy_` and read
whole under a mask (kv_cache.py), so every token has the same shapes: the step compiles once (per batch size
and K) instead of once per position, and with mode "reduce-overhead" (the CUDA default) inductor captures it in
a CUDA graph, one replay per token instead of a few hundred kernel launches. The sampler (Gumbel-max, top-k/p)
stays outside: it takes a torch.Generator, which would break the graph.
"""

from __future__ import annotations

import torch

_COMPILED: dict[tuple, object] = {}


def cfg_mix(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """logits [2B, ..., V] as [cond; uncond] -> uncond + scale * (cond - uncond) [B, ..., V]."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def decode_step(model, last: torch.Tensor, pos: torch.Tensor, cache, cfg_scale: float = 1.0) -> torch.Tensor:
    """Logits [B, V] of the next token, given the newest id `last` [B, 1], which sits at sequence position
    pos [1] (int64; id_{t-1} is at position t, after the class token). The cache holds positions < pos. With
    CFG it holds 2B rows ([cond; uncond]) and the same ids go to both halves."""
    use_cfg = cfg_scale != 1.0
    x = model.embed(None, torch.cat([last, last]) if use_cfg else last)  # [B', 1, C]
    logits = model.transformer(x, pos, cache)[:, -1]  # [B', V]
    return cfg_mix(logits, cfg_scale) if use_cfg else logits


def default_compile_options(device: torch.device | str) -> dict:
    """CUDA: CUDA graphs ("reduce-overhead"); elsewhere inductor's default mode."""
    return {"mode": "reduce-overhead"} if torch.device(device).type == "cuda" else {}


def uses_cuda_graphs(options: dict) -> bool:
    return options.get("mode") in ("reduce-overhead", "max-autotune")


def compiled_decode_step(options: dict | None = None):
    """`decode_step` under torch.compile(fullgraph=True, dynamic=False, **options), one compiled function per
    distinct options (torch.compile's own guards recompile it for another model, batch size or K)."""
    options = dict(options or {})
    key = tuple(sorted(options.items()))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(decode_step, fullgraph=True, dynamic=False, **options)
    return _COMPILED[key]


__all__ = ["cfg_mix", "decode_step", "compiled_decode_step", "default_compile_options", "uses_cuda_graphs"]
