"""The one-token decode step of sampling, with classifier-free guidance, eager or compiled.

    scale = torch.full((), 2.0, device=device)                           # CFG scale as a tensor; None: no CFG
    logits = decode_step(model, last_ids, pos, cache, scale, keys)       # [B, V] fp32
    step = compiled_decode_step({"mode": "reduce-overhead"})             # torch.compile'd, cached per options

One compile for a whole sweep. What could differ between calls is kept out of the graph's constants:
- the position is a 1-element int64 tensor and the cache (kv_cache.py) is sized to the model's K once, so
  neither the token index nor k (the number of tokens sampled) is a shape the graph sees;
- the CFG scale is a 0-dim tensor (a Python float would be baked into the graph: one compile per scale);
- the keys read, `keys` = 0..S-1, have a dynamic size S (`key_spans` marks it): a token reads the filled prefix
  of the cache rounded up to `span_window` slots, not all K. The slots after `pos` within it are masked.
  Cost of the rounding: at most window - 1 masked slots per token, read but weighted 0 (zeros or finite values
  of an earlier call: the cache is zero-initialised). Reading all K slots under a mask instead would cost K
  slots per token: at k = 32 of K = 256, 256 slots instead of 17 on average (15x the cache traffic).
What still compiles separately: CFG on or off (B or 2B rows, and the mix), another batch size, another model
(the bf16 copy of sampling_weights.py is one, kept per model); so a gFID sweep over any cfg scales > 1 and any
k compiles once per batch size (twice with the scale 1 row), far below Dynamo's recompile limit (8).

With mode "reduce-overhead" (the CUDA default) inductor captures the step in a CUDA graph, one replay per token
instead of a few hundred kernel launches; a CUDA graph has fixed shapes, so each distinct span is one capture
(K / span_window of them: 8 at K 256). The sampler (Gumbel-max, top-k/p) stays outside: it takes a
torch.Generator, which would break the graph.
"""

from __future__ import annotations

import torch

from ..compiling import key_compile_cache_by_cpu_isa
from .layers import StepPosition

_COMPILED: dict[tuple, object] = {}


def cfg_mix(logits: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """logits [2B, ..., V] as [cond; uncond] -> uncond + scale * (cond - uncond) [B, ..., V]."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def decode_step(
    model,
    last: torch.Tensor,
    pos: torch.Tensor,
    cache,
    cfg_scale: float | torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [B, V] of the next token, given the newest id `last` [B, 1], which sits at sequence position
    pos [1] (int64; id_{t-1} is at position t, after the class token). The cache holds positions < pos.

    cfg_scale: None or 1.0 for no CFG; else the cache holds 2B rows ([cond; uncond]), the same ids go to both
    halves and the logits are mixed (pass a 0-dim tensor to compile once for every scale).
    keys [S] int64: the slots 0..S-1 that attention reads, S >= pos + 1 (None: all K of them)."""
    use_cfg = cfg_scale is not None and not (isinstance(cfg_scale, float) and cfg_scale == 1.0)
    if keys is None:
        keys = torch.arange(cache.max_len, device=pos.device)  # [K]
    x = model.embed(None, torch.cat([last, last]) if use_cfg else last)  # [B', 1, C]
    logits = model.transformer(x, StepPosition(pos, keys), cache)[:, -1]  # [B', V]
    return cfg_mix(logits, cfg_scale) if use_cfg else logits


def default_compile_options(device: torch.device | str) -> dict:
    """CUDA: CUDA graphs ("reduce-overhead"); elsewhere inductor's default mode."""
    return {"mode": "reduce-overhead"} if torch.device(device).type == "cuda" else {}


def uses_cuda_graphs(options: dict) -> bool:
    return options.get("mode") in ("reduce-overhead", "max-autotune")


def span_window(options: dict) -> int:
    """Slots a span grows by. CUDA graphs: 32 (one capture per distinct span, so K / 32 captures; a token reads
    at most 31 masked slots). Otherwise 1: the span is exactly the filled prefix, nothing masked is read."""
    return 32 if uses_cuda_graphs(options) else 1


def key_spans(positions: torch.Tensor, window: int) -> list[torch.Tensor]:
    """keys for each token t = 0..K-1: positions[:S] with S = t + 1 rounded up to `window` (at most K),
    each view marked as a dynamic size for torch.compile. positions = arange(K) [K]. Made once per call."""
    K = len(positions)
    views: dict[int, torch.Tensor] = {}
    spans = []
    for t in range(K):
        S = min(K, -(-(t + 1) // window) * window)
        if S not in views:
            views[S] = positions[:S]
            if S > 1:  # Dynamo specialises sizes 0 and 1; only the first token (prefill, eager) has S = 1
                torch._dynamo.mark_dynamic(views[S], 0)
        spans.append(views[S])
    return spans


def compiled_decode_step(options: dict | None = None):
    """`decode_step` under torch.compile(fullgraph=True, dynamic=False, **options), one compiled function per
    distinct options (torch.compile's own guards recompile it for another model, batch size, CFG on/off or
    dtype; never for another position, k, span or cfg scale)."""
    options = dict(options or {})
    key = tuple(sorted(options.items()))
    if key not in _COMPILED:
        key_compile_cache_by_cpu_isa()  # tokenizer/compiling.py: a CPU kernel cached for another ISA is wrong
        _COMPILED[key] = torch.compile(decode_step, fullgraph=True, dynamic=False, **options)
    return _COMPILED[key]


__all__ = ["cfg_mix", "decode_step", "compiled_decode_step", "default_compile_options", "uses_cuda_graphs",
           "span_window", "key_spans"]  # fmt: skip
