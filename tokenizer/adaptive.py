"""Adaptive token counts: each image gets the shortest prefix that meets a quality target.

A prefix-decodable tokenizer makes this cheap: encode once, then search k per image with batched decodes. The
search is a per-image bisection over [min_tokens, max_tokens], all images of the batch in one decode pass per
step (each decoded from its own prefix), so it takes ceil(log2(max_tokens - min_tokens + 1)) <= log2(K) + 1
passes.

Assumption: quality is monotone in k for each image (more tokens never make it worse). Tail-drop and nested
-dropout tokenizers are trained for that, but a real model can dip at some k. Without monotonicity the result
is still a *local* answer: the chosen k meets the target (unless it is max_tokens) and k - 1 does not (unless k
is min_tokens); a dip below that k is not searched.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .metrics import psnr, to_uint8


class AdaptiveTokens(NamedTuple):
    ids: torch.Tensor  # [B, max_tokens] int64; ids[b, lengths[b]:] are padding (0)
    lengths: torch.Tensor  # [B] int64, min_tokens <= lengths <= max_tokens


def check_targets(min_psnr: float | None, max_lpips: float | None) -> None:
    """Exactly one target, in range: PSNR in dB (> 0), LPIPS a distance in (0, 1]."""
    if (min_psnr is None) == (max_lpips is None):
        raise ValueError("give exactly one quality target: min_psnr (dB) or max_lpips, "
                         f"got min_psnr={min_psnr}, max_lpips={max_lpips}")
    if min_psnr is not None and not 0 < min_psnr <= 100:
        raise ValueError(f"min_psnr must be in (0, 100] dB, got {min_psnr}")
    if max_lpips is not None and not 0 < max_lpips <= 1:
        raise ValueError(f"max_lpips must be in (0, 1], got {max_lpips}")


def encode_adaptive(tokenizer, images: torch.Tensor, min_psnr: float | None = None, max_lpips: float | None = None,
                    min_tokens: int = 1, max_tokens: int | None = None, lpips_model=None) -> AdaptiveTokens:
    """The smallest k in [min_tokens, max_tokens] per image whose reconstruction meets the target (PSNR of the
    uint8 reconstruction >= min_psnr, or LPIPS <= max_lpips), max_tokens where none does. images [B, 3, H, W]
    in [0, 1]. `lpips_model`: an LPIPS module (images in [-1, 1] -> [B]); None loads the pretrained one."""
    check_targets(min_psnr, max_lpips)
    k_max = tokenizer.max_tokens if max_tokens is None else max_tokens
    for name, value in (("min_tokens", min_tokens), ("max_tokens", k_max)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= tokenizer.max_tokens:
            raise ValueError(f"{name} must be an int in 1..{tokenizer.max_tokens}, got {value!r}")
    if min_tokens > k_max:
        raise ValueError(f"min_tokens {min_tokens} > max_tokens {k_max}")
    if max_lpips is not None and lpips_model is None:
        from .perceptual import cached_lpips

        lpips_model = cached_lpips(images.device)

    ids = tokenizer.encode(images, k_max)  # [B, k_max]
    ref = to_uint8(images)
    lo = torch.full((ids.shape[0],), min_tokens, dtype=torch.long, device=ids.device)  # k - 1 fails below lo
    hi = torch.full_like(lo, k_max)  # hi meets the target, or is k_max
    while bool((active := lo < hi).any()):
        rows = active.nonzero().squeeze(1)  # [A]
        mid = (lo[rows] + hi[rows]) // 2  # [A]
        # ids from encode, mid in [min_tokens, k_max]: decode's value checks (2 host syncs) would find nothing
        rec = tokenizer.decode(ids[rows], lengths=mid, check_inputs=False)  # [A, 3, H, W], each from its prefix
        if min_psnr is not None:
            ok = psnr(to_uint8(rec), ref[rows]) >= min_psnr
        else:
            with torch.no_grad():
                ok = lpips_model(to_uint8(rec).float() / 127.5 - 1, ref[rows].float() / 127.5 - 1) <= max_lpips
        ok = ok.to(lo.device)
        hi[rows] = torch.where(ok, mid, hi[rows])
        lo[rows] = torch.where(ok, lo[rows], mid + 1)
    keep = torch.arange(k_max, device=ids.device)[None, :] < lo[:, None]  # [B, k_max]
    return AdaptiveTokens(torch.where(keep, ids, torch.zeros_like(ids)), lo)


__all__ = ["AdaptiveTokens", "encode_adaptive", "check_targets"]
