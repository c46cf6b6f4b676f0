"""Autoregressive generator over 1D tokenizer ids (LlamaGen-style GPT, class-conditional, CFG sampling).

    from tokenizer.generator import GPT, generate
    model = GPT.from_preset("tiny", vocab_size=tok.codebook_size, max_tokens=tok.max_tokens, num_classes=1000)
    ids = generate(model, torch.tensor([1, 2]), num_tokens=32, cfg_scale=2.0)   # [2, 32]
    images = tok.decode(ids)
    # a GPT trained with end_token=True on variable-length records stops by itself:
    ids, lengths = generate(model, torch.tensor([1, 2]), cfg_scale=2.0)   # [2, K] padded, [2]
    images = tok.decode(ids, lengths=lengths)

Files: gpt.py (the model), layers.py (its blocks), loss.py (chunked cross-entropy), kv_cache.py and
decode_step.py (static cache, compiled one-token step), sampling.py (`generate`), end_token.py (training
targets of variable-length records). Plain PyTorch; the Lightning
module is `tokenizer.generator.lightning.GeneratorModule` (not imported here). docs/generator.md: the whole path.
"""

from .decode_step import cfg_mix, compiled_decode_step, decode_step
from .gpt import GPT, PRESETS, GPTConfig, GPTOutput, preset_config
from .kv_cache import KVCache
from .loss import linear_cross_entropy
from .sampling import (
    Sampled,
    generate,
    next_token_logits,
    sample_from_logits,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "GPT",
    "GPTConfig",
    "GPTOutput",
    "PRESETS",
    "preset_config",
    "KVCache",
    "generate",
    "Sampled",
    "next_token_logits",
    "sample_from_logits",
    "top_k_filter",
    "top_p_filter",
    "cfg_mix",
    "decode_step",
    "compiled_decode_step",
    "linear_cross_entropy",
]
