"""A tokenizer built by hand whose quality rises with k by construction: the tests' stand-in for a trained one.

Tests of adaptive token counts need a model whose reconstructions improve with k on real photographs, so that
quality targets pick a spread of lengths. A briefly trained model has that property only as far as training
happened to reach it, and floating-point results differ between machines (AVX2 against AVX-512 kernels, thread
counts), so a 150-step model passed on one machine and failed on another. This one is exact arithmetic up to
float rounding, the same function on every machine.

It is a real `OneDTokenizer` (save_pretrained, from_pretrained, every CLI), with weights set so that:

- encoder: patch p's embedding holds the patch's mean colour m_p ([-1, 1] space) in channels 2-4 and -m_p in
  channels 5-7; the token-mixing stem pools them with its DCT basis (stem.py: the K lowest frequencies of the
  patch grid), so latent j holds c_j = sum_p A[j, p] m_p, the j-th DCT coefficient of the patch-mean image.
  The blocks are identity (their residual branches are zero). The final LayerNorm would divide by the
  latent's spread; a constant carrier (+M, -M in channels 0 and 1, M >> |c|) keeps its mean at 0 and its scale
  almost constant, and the token head undoes that scale.
- FSQ with odd levels (0 is a level) quantizes each colour's coefficient: d = s * round(tanh(z) * L') / L'.
- decoder: the token head maps d back, the token-mixing stem spreads the kept coefficients over the patch grid
  with the DCT basis (stem.py), the blocks are identity and the pixel head paints each patch in that colour.

Why quality cannot fall as k grows: the decoded image is the patch-mean image's inverse DCT from the first k
quantized coefficients, so its error to the photograph is (photograph - patch means) + (patch means - inverse
DCT), two orthogonal parts, and the second is a sum over coefficients of (c_j - d_j) for kept ones and c_j for
the rest. Token j changes that term from c_j^2 to (c_j - d_j)^2, and d_j has c_j's sign with |d_j| <= 2 |c_j|
(rounding to a level never more than doubles a value above half a step, and tanh and the 0.99 below only
shrink it), so each token lowers the error or leaves it. Clamping to [0, 1] and uint8 rounding can move PSNR
by a few hundredths of a dB either way; nothing else can.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tokenizer import OneDTokenizer

# 32 px, 8 px patches (a 4 x 4 grid, 16 frequencies), K = 8 tokens of three 15-level FSQ channels (3375 codes).
CONFIG = dict(image_size=32, patch_size=8, max_tokens=8, enc_width=32, enc_depth=1, enc_heads=2, dec_width=32,
              dec_depth=1, dec_heads=2, quantizer="fsq", fsq_levels=[15, 15, 15])  # fmt: skip
CARRIER = 1000.0  # M: >> any coefficient (|c_j| <= 4 for a 4 x 4 grid of means in [-1, 1])
SCALE = 2.0  # s: a coefficient c enters FSQ as about c / s, inside tanh's near-linear range
SHRINK = 0.99  # keeps |d| < 2|c| strict despite FSQ's (1 + 1e-3) level stretch (module docstring)
# Detail coefficients are small (a low-contrast crop's are far below the mean colour's): pooled AC_GAIN times
# larger and spread back AC_GAIN times smaller, they get finer quantization steps than the mean colour.
AC_GAIN = 2.0


@torch.no_grad()
def dct_tokenizer() -> OneDTokenizer:
    """The hand-built tokenizer of the module docstring, in eval mode."""
    tok = OneDTokenizer.from_preset("tiny", **CONFIG)
    enc, dec, p, width = tok.encoder, tok.decoder, tok.config.patch_size, tok.config.enc_width
    for param in tok.parameters():
        param.zero_()
    for block in (*enc.transformer.blocks, *dec.transformer.blocks):  # zero residual branches: identity blocks
        for layer in (block.norm1, block.norm2):
            layer.weight.fill_(1.0)
    enc.transformer.norm.weight.fill_(1.0)
    for ch in range(3):
        enc.patch_embed.weight[2 + ch, ch] = 1.0 / p**2  # the patch's mean colour ...
        enc.patch_embed.weight[5 + ch, ch] = -1.0 / p**2  # ... and its negative: a zero-mean latent
    enc.latent_tokens[0, :, 0], enc.latent_tokens[0, :, 1] = CARRIER, -CARRIER
    gain = torch.full((tok.max_tokens, 1), AC_GAIN)
    gain[0] = 1.0
    enc.latent_mixing.copy_(_dct(tok) * gain)
    carrier_scale = CARRIER * math.sqrt(2.0 / width)  # the final LayerNorm's divisor when every c_j is 0
    for ch in range(3):
        enc.to_token.weight[ch, 2 + ch] = SHRINK * carrier_scale / SCALE
        dec.token_in.weight[2 + ch, ch] = SCALE
    dec.patch_mixing.copy_((_dct(tok) / gain).T)
    pixel = torch.arange(p * p)
    for ch in range(3):  # unpatchify's layout: channels last within a patch
        dec.to_pixels.weight[pixel * 3 + ch, 2 + ch] = 1.0
    return tok.eval()


def save_dct_tokenizer(directory: str | Path) -> str:
    return str(dct_tokenizer().save_pretrained(directory))


def _dct(tok: OneDTokenizer) -> torch.Tensor:
    from tokenizer.stem import dct_basis

    return dct_basis(tok.config.grid_size, tok.max_tokens)  # [K, N]


def smallest_k_meeting(ok: torch.Tensor) -> torch.Tensor:
    """ok [B, K] (the target met at k = 1..K) -> [B] int64: the smallest k that meets it, K where none does (what
    a scan of every k, the brute force the adaptive search must agree with, chooses)."""
    k_max = ok.shape[1]
    return torch.where(ok.any(1), ok.float().argmax(1) + 1, torch.full((ok.shape[0],), float(k_max))).long()


def separating_target(curves: torch.Tensor, decimals: int = 2, margin: float = 0.005) -> float:
    """A PSNR target for a test: curves [B, K] (per image, quality at k = 1..K) -> the target, rounded to
    `decimals`, that gives the most distinct brute-force lengths (smallest k meeting it, K if none) among those at
    least `margin` dB from every measured value, so that float differences between machines (~1e-6 dB) cannot
    move any image across it."""
    values = curves.flatten().double().sort().values
    best, best_spread = None, 0
    for lo, hi in zip(values[:-1].tolist(), values[1:].tolist()):
        target = round((lo + hi) / 2, decimals)
        if (values - target).abs().min() < margin:
            continue
        spread = len(set(smallest_k_meeting(curves >= target).tolist()))
        if spread > best_spread:
            best, best_spread = target, spread
    if best is None:
        raise ValueError("no target is clear of every measured value by the margin")
    return best
