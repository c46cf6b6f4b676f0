"""The deterministic weights behind tests/data/released/: a tensor for every reference key, redone from a manifest.

The golden numbers in tests/data/released/<family>/golden.npz were made by the reference TiTok / One-D-Piece code
(scripts/make_released_golden.py) loaded with `reference_state_dict(manifest)`. CI has no reference code and no
released weights; it redoes the same state dict from manifest.json alone, converts it and compares outputs.

The rule, per key (`tensor_for`): numpy.random.RandomState(zlib.crc32(key)) draws N(0, 1) of the key's shape in
float64, which is scaled (and offset) by what the key names, then cast to float32. The scales are chosen so the
reference forward is informative rather than degenerate (numbers from the reference code, in the README there):
  - linear / conv weights: gain / sqrt(fan_in), so activations stay O(1) through 8 residual blocks;
  - attention in_proj_weight: gain ATTENTION_GAIN, so q.k logits have std ~ATTENTION_GAIN**2 and the softmax is
    peaked (not uniform, where a wrong q/k split or head layout would go unnoticed);
  - LayerNorm / GroupNorm weight 1 + 0.1 N, bias 0.1 N; other biases 0.02 N;
  - class / positional / latent / mask embeddings 0.5 N; codebooks N(0, 1);
  - the legacy head's 1024 proxy-code logits (decoder.ffn.2.weight) gain LOGIT_GAIN: softmax neither uniform nor
    one-hot, so the soft mixing of pixel_quantize codes is exercised;
  - the encoder's conv_out (z) gain Z_GAIN: for the raw (not l2) VQ, |z| must exceed the codes' norm spread, else
    argmin |z - e|^2 picks the shortest code for every token; l2 families normalise z, so it changes little there.
Integer buffers are zeros and bool buffers True (the reference models have none at the time of writing).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import torch

ATTENTION_GAIN = 2.0  # q, k, v rows of nn.MultiheadAttention.in_proj_weight
LOGIT_GAIN = 5.0  # decoder.ffn.2.weight: the 1024 proxy-code logits of the legacy (two-stage) head
Z_GAIN = 3.0  # encoder.conv_out.weight: the pre-quantization z, longer than the N(0, 1) codes (see below)
EMBEDDING_SCALE = 0.5

# Parameters that are tables of vectors rather than maps (scaled as embeddings, not by fan-in).
_EMBEDDING = re.compile(r"(^|\.)(class_embedding|positional_embedding|latent_token_positional_embedding|mask_token)$")
_CODEBOOK = re.compile(r"(^|\.)(quantize|pixel_quantize)\.embedding\.weight$")
# Normalisation modules of TiTok (ln_pre, ln_post, ln_1, ln_2) and of MaskGIT-VQGAN (norm1, norm2, norm_out).
_NORM = re.compile(r"(^|\.)(ln_\w+|norm\w*)\.(weight|bias)$")

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _scale_and_offset(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    if key == "latent_tokens" or key.endswith(".latent_tokens") or _EMBEDDING.search(key):
        return EMBEDDING_SCALE, 0.0
    if _CODEBOOK.search(key):
        return 1.0, 0.0
    if _NORM.search(key):
        return 0.1, (1.0 if key.endswith(".weight") else 0.0)
    if key.endswith("bias"):  # Linear / conv / in_proj biases
        return 0.02, 0.0
    if len(shape) >= 2:  # Linear [out, in] or conv [out, in, kh, kw] weight
        fan_in = math.prod(shape[1:])
        gain = 1.0
        if key.endswith("in_proj_weight"):
            gain = ATTENTION_GAIN
        elif key == "decoder.ffn.2.weight":
            gain = LOGIT_GAIN
        elif key == "encoder.conv_out.weight":
            gain = Z_GAIN
        return gain / math.sqrt(fan_in), 0.0
    raise ValueError(
        f"tests/_golden_weights.py has no rule for key {key!r} of shape {list(shape)}; "
        "add one beside the others before regenerating tests/data/released"
    )


def tensor_for(key: str, shape, dtype: str = "float32") -> torch.Tensor:
    """The golden tensor of one reference key: same key, shape and dtype give the same values on every machine."""
    shape = tuple(int(s) for s in shape)
    if dtype == "bool":
        return torch.ones(shape, dtype=torch.bool)
    if dtype.startswith(("int", "uint")):
        return torch.zeros(shape, dtype=getattr(torch, dtype))
    if dtype not in _DTYPES:
        raise ValueError(f"tests/_golden_weights.py: key {key!r} has dtype {dtype!r}; expected one of {list(_DTYPES)}")
    scale, offset = _scale_and_offset(key, shape)
    draw = np.random.RandomState(zlib.crc32(key.encode())).standard_normal(shape)  # float64, platform-independent
    return torch.from_numpy((draw * scale + offset).astype(np.float32)).to(_DTYPES[dtype])


def reference_state_dict(manifest: dict) -> dict[str, torch.Tensor]:
    """{reference key: tensor} for a manifest {key: {"shape": [...], "dtype": "float32"}} (see tensor_for)."""
    return {key: tensor_for(key, entry["shape"], entry.get("dtype", "float32")) for key, entry in manifest.items()}


def load_manifest(path) -> dict:
    """A manifest.json of tests/data/released: {reference key: {"shape": [...], "dtype": ...}}, in key order."""
    with open(Path(path)) as f:
        return json.load(f)
