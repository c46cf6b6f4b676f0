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
`precision` ("fp32" | "bf16", default bf16 on CUDA, fp32 on CPU) is what the model computes in
(`tokenizer.precision`): bf16 sampling of fp32 weights runs a bf16 copy of the Linear weights made once per call
(once per model with `compile_step`; sampling_weights.py), with autocast's numerics but without casting every
weight on every token inside the compiled step; the KV cache (kv_cache.py) is kept in the compute dtype and the
sampler works in fp32. An end-token model (`GPTConfig.end_token`) stops each sample where it draws END and returns
`Sampled(ids, lengths)` (ids padded with 0 past each length; decode with `tok.decode(ids, lengths=lengths)`);
`stop_at_end=False` forbids END instead and samples exactly k tokens. `compile_step=True` runs every token
after the first through the torch.compile'd decode step (decode_step.py; CUDA graphs on CUDA by default,
`compile_options` overrides torch.compile's arguments): one compile per model, batch size and CFG on/off, for
every k and cfg scale, over one KV cache per model and batch sized to K (kv_cache.py `reusable_cache`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..precision import autocast, autocast_dtype, resolve_precision
from .decode_step import (
    cfg_mix,
    compiled_decode_step,
    default_compile_options,
    key_spans,
    span_window,
    uses_cuda_graphs,
)
from .gpt import GPT
from .kv_cache import KVCache, LayerKVCache, reusable_cache
from .sampling_weights import low_precision_linears, sampling_weights


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


# ---- generation -------------------------------------------------------------------------------------------
class Sampled(NamedTuple):
    """What `generate` returns when samples stop at the end token."""

    ids: torch.Tensor  # [B, k] int64; ids[b, lengths[b]:] are padding (0)
    lengths: torch.Tensor  # [B] int64 in 1..k: tokens before END (k when END was never drawn)


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
    compile_step: bool = False,
    compile_options: dict | None = None,
    stop_at_end: bool | None = None,
    end_check_every: int = 8,
) -> torch.Tensor | Sampled:
    """Sample ids [B, k] (int64), k = num_tokens (default: max_tokens K).

    End token (models with `end_token=True`): `stop_at_end` (None: True for such models) stops each sample
    where it draws END and returns `Sampled(ids [B, k] padded with 0, lengths [B])`; END is never drawn first
    (every image has >= 1 token), a finished row is fed END (what training showed it) and CFG's null-class
    half shares the rows' stopping (it is fed the same ids). The loop ends when every sample has ended or k
    tokens are drawn: whether all ended is read on the host every `end_check_every` tokens, so such a call
    makes about k / end_check_every host syncs (none per token otherwise). stop_at_end=False: END is masked
    out and exactly k tokens are drawn (a plain tensor is returned, as for models without the end token).

    class_labels [B] int64, or None for unconditional sampling (null class; then `batch_size` gives B and
    cfg_scale is ignored). Labels may live on the CPU: they are range-checked there, then moved to the model's
    device. precision: "fp32" | "bf16", what the model computes in (None: bf16 on CUDA, fp32 on CPU); bf16 of
    fp32 weights runs a bf16 copy of the Linear weights (module docstring), the same numbers as autocast.
    compile_step: the compiled one-token step for tokens 1.. (needs the KV cache). It keeps, per model, a KV
    cache per (rows, dtype) sized to K and, for bf16, the bf16 copy (refreshed when the weights change): free
    them with `kv_cache.release_caches(model)` and `sampling_weights.release_sampling_weights(model)`. The
    model is switched to eval mode for the call and restored afterwards.
    """
    cfg = model.cfg
    k = cfg.max_tokens if num_tokens is None else int(num_tokens)
    if not 1 <= k <= cfg.max_tokens:
        raise ValueError(f"num_tokens must be in 1..{cfg.max_tokens}, got {k}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    stop = cfg.end_token if stop_at_end is None else bool(stop_at_end)
    if stop and not cfg.end_token:
        raise ValueError("stop_at_end=True needs a GPT trained with an end token (GPTConfig.end_token)")
    if end_check_every < 1:
        raise ValueError(f"end_check_every must be >= 1, got {end_check_every}")
    if compile_step and not use_kv_cache:
        raise ValueError("compile_step=True needs use_kv_cache=True (the compiled step is the cached decode step)")
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
    use_cfg = cfg_scale != 1.0
    rows = 2 * B if use_cfg else B
    # the cache holds what attention computes in: bf16 under bf16 precision for fp32 weights (half the memory);
    # other parameter dtypes (an fp64 test model, bf16 weights) as they are
    amp_dtype = autocast_dtype(precision)
    cache_dtype = amp_dtype if amp_dtype is not None and param.dtype == torch.float32 else param.dtype
    options = (default_compile_options(device) if compile_options is None else compile_options) if compile_step else {}
    graphs = compile_step and uses_cuda_graphs(options)
    # bf16 of fp32 weights: a bf16 copy of the Linear weights, run with autocast off (sampling_weights.py);
    # otherwise the model under `precision`'s autocast (a no-op cast for weights already in that dtype)
    runner, region = model, precision
    if amp_dtype is not None and low_precision_linears(model, amp_dtype):
        runner, region = sampling_weights(model, amp_dtype, keep=compile_step), "fp32"
    was_training = model.training
    model.eval()
    try:
        with autocast(region, device):
            step, spans = None, None
            positions = torch.arange(cfg.max_tokens, device=device)  # [K]: the step's positions, made once
            if compile_step:
                step = compiled_decode_step(options)
                cache = reusable_cache(runner, rows, cache_dtype, mark_static=graphs)  # sized to K, reused
                spans = key_spans(positions, span_window(options))  # [K] views: the slots token t reads
                # 0-dim: one graph for every scale
                scale = torch.full((), cfg_scale, device=device, dtype=torch.float32) if use_cfg else None
            else:
                cache = KVCache(runner, rows, max_len=k, dtype=cache_dtype) if use_kv_cache else None
            ids = torch.zeros(B, k, dtype=torch.long, device=device)  # [B, k], filled left to right
            lengths = torch.full((B,), k, dtype=torch.long, device=device)  # [B]: k until END is drawn
            ended = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
            last = None  # [B, 1]: the newest id, not a view of `ids` (whose size k the graph would guard on)
            # the loop only launches device work: no .item(), no tensors from Python data, no data-dependent
            # shapes (tests/test_sampling.py counts such ops and checks the count does not grow with k)
            for t in range(k):
                if step is not None and t > 0:
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are consumed
                    logits = step(runner, last, positions[t : t + 1], cache, scale, spans[t])  # [B, V]
                else:
                    logits = next_token_logits(runner, labels, ids[:, :t], cfg_scale, cache)  # [B, V] fp32
                if cfg.end_token and (not stop or t == 0):
                    logits = logits[:, : cfg.vocab_size]  # END not allowed: fixed k, or the first token
                new = sample_from_logits(logits, temperature, top_k, top_p, greedy, generator)  # [B]
                if stop:
                    is_end = new == cfg.end_id  # [B]
                    lengths = torch.where(is_end & ~ended, positions[t], lengths)  # tokens before the first END
                    ended |= is_end
                    new = new.masked_fill(ended, cfg.end_id)  # a finished row is fed END, as in training
                ids[:, t] = new
                last = new[:, None]
                # one host read every end_check_every tokens (see the docstring), none on the last token
                if stop and (t + 1) % end_check_every == 0 and t + 1 < k and bool(ended.all()):
                    break
    finally:
        model.train(was_training)
    if not stop:
        return ids
    return Sampled(ids.masked_fill(positions[:k] >= lengths[:, None], 0), lengths)  # padding: 0, a valid code


__all__ = [
    "KVCache",
    "LayerKVCache",
    "Sampled",
    "cfg_mix",
    "top_k_filter",
    "top_p_filter",
    "sample_from_logits",
    "gumbel_noise",
    "next_token_logits",
    "generate",
]
