"""Learned discrete 1D image tokenizers of variable length.

    from tokenizer import OneDTokenizer
    tok = OneDTokenizer.from_preset("tiny")
    ids = tok.encode(images, num_tokens=8)   # [B, 8] int64
    images_k = tok.decode(ids)               # [B, 3, H, W] in [0, 1]
    ids, lengths = tok.encode_adaptive(images, min_psnr=24)   # per image, the fewest tokens reaching 24 dB
"""

from .adaptive import AdaptiveTokens
from .config import PRESETS, TokenizerConfig, preset_config
from .model import OneDTokenizer, TokenizerOutput
from .quantizer import Quantizer, QuantizerOutput, QuantizerStats

__all__ = [
    "OneDTokenizer", "AdaptiveTokens", "TokenizerConfig", "TokenizerOutput", "PRESETS", "preset_config",
    "Quantizer", "QuantizerOutput", "QuantizerStats",
]  # fmt: skip
