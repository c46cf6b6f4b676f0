"""A low-precision copy of the GPT's matmul weights for sampling, made once per call or once per model.

    twin = sampling_weights(model, torch.bfloat16, keep=True)   # GPT: bf16 Linear weights, the rest shared
    logits = twin.transformer(x)                                 # no autocast needed (layers.py casts inputs)

Why: bf16 sampling used to run the fp32 model under autocast. Eager autocast casts each weight once per region
(it caches casts of leaf tensors), but a compiled graph cannot keep that cache: the one-token step cast every
fp32 weight to bf16 on every token, reading 4 and writing 2 bytes per parameter (about 6 GB per token for
GPT-XL) for a step whose useful traffic is 2 bytes per parameter. The twin holds the Linear weights in bf16 once,
so a token reads only those.

What is copied: the weights of every `nn.Linear` (attention, MLP, head: all but ~1% of the FLOPs). Embeddings and
RMSNorm weights are the model's own Parameters (shared, not copied): autocast keeps them fp32 too, so the twin
computes exactly what autocast computed, op for op (bf16 matmuls with fp32 accumulation, fp32 residual and norms),
and draws the same ids. Extra memory: 2 bytes per Linear parameter (1.5 GB for GPT-XL).

Eager sampling gains too where the model is frozen: autocast caches its casts only for tensors that require
grad, so a GPT after `requires_grad_(False)` had every weight cast on every token, eager or compiled.

keep=True (the compiled step) caches the twin per model and dtype: the compiled graph and its CUDA graphs see
the same module and tensor addresses every call. A cached twin is refreshed in place (same addresses) when the
model's Linear weights have changed since (an optimizer step, `load_state_dict`, `.to()`), detected from each
weight's version counter and address, read on the host once per call. keep=False (eager sampling) makes a
twin for the call, freed with it.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {dtype: (stamp, twin)}


def low_precision_linears(model: nn.Module, dtype: torch.dtype) -> bool:
    """True when `model` has fp32 Linear weights that a `dtype` twin would hold in low precision."""
    return dtype in (torch.bfloat16, torch.float16) and any(
        isinstance(m, nn.Linear) and m.weight.dtype == torch.float32 for m in model.modules()
    )


def _stamp(model: nn.Module) -> tuple[tuple, tuple]:
    """What identifies the model's weights now: (address, version, (shape, device)) of each Linear weight (the
    twin holds copies of their values), and the identity of every other parameter (the twin holds those objects)."""
    linear = tuple((m.weight.data_ptr(), m.weight._version, (m.weight.shape, m.weight.device)) for m in model.modules()
                   if isinstance(m, nn.Linear))  # fmt: skip
    shared = tuple(id(p) for m in model.modules() if not isinstance(m, nn.Linear)
                   for p in m.parameters(recurse=False))  # fmt: skip
    return linear, shared


def _build(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of model's modules whose Linear weights are `dtype` copies and whose other parameters (and RoPE
    tables) are the model's own objects: a deepcopy told, through its memo, what to put in place of each. A
    block compiled in place (`module.compile()`, training) runs uncompiled in the twin. (Not a new GPT(cfg) on
    the meta device: its initialisation alone took 50 ms for the tiny preset.)"""
    memo: dict[int, object] = {id(model._rope): model._rope}
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            memo[id(module._compiled_call_impl)] = None
        for param in module.parameters(recurse=False):
            low = isinstance(module, nn.Linear) and param.dtype == torch.float32
            memo[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False) if low else param
    return copy.deepcopy(model, memo).eval()


def _refresh(twin: nn.Module, model: nn.Module) -> None:
    """Copy the model's current Linear weights into the twin's, in place (the twin's addresses stay)."""
    own = dict(model.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(own[name].weight)


def sampling_weights(model: nn.Module, dtype: torch.dtype, keep: bool = False) -> nn.Module:
    """The model itself when it has no fp32 Linear weights or `dtype` is not bf16/fp16, else its twin with
    `dtype` Linear weights (module docstring). keep: cache the twin per model and dtype (the compiled step)."""
    if not low_precision_linears(model, dtype):
        return model
    if not keep:
        return _build(model, dtype)
    kept = _KEPT.setdefault(model, {})
    stamp = _stamp(model)
    if dtype in kept:
        old, twin = kept[dtype]
        if old == stamp:
            return twin
        # same shapes, devices and shared parameters: only the Linear values changed, copy them into place
        if old[1] == stamp[1] and [s[2] for s in old[0]] == [s[2] for s in stamp[0]]:
            _refresh(twin, model)
            kept[dtype] = (stamp, twin)
            return twin
    twin = _build(model, dtype)
    kept[dtype] = (stamp, twin)
    return twin


def release_sampling_weights(model: nn.Module) -> None:
    """Free the model's kept twins (`keep=True`); the next compiled bf16 `generate` makes one anew."""
    _KEPT.pop(model, None)


__all__ = ["low_precision_linears", "sampling_weights", "release_sampling_weights"]
