"""Variable-length training: how many leading tokens the decoder sees.

- `tail_token_drop` (One-D-Piece): k drawn from `length_sampling` (One-D-Piece: uniform). By default one k per
  batch: the decoder then simply gets the first k tokens (sliced, no attention mask: fewer tokens, flash
  attention), which is exactly what decoding a k-token prefix does at inference. Option `per_sample_length`: one
  k per sample, and dropped tokens are hidden from the decoder's attention with a boolean mask.
- `nested_dropout` (FlexTok): k per sample (FlexTok: over powers of two); dropped tokens are replaced by one
  learned mask token, so inference pads a k-token prefix with that same mask token.
- `fixed` (TiTok): always K.

`length_sampling` picks k's distribution: `uniform` over 1..K; `pow2`, uniform over 1, 2, 4, ..., K (only those k
are trained); `log_uniform`, every k in 1..K with P(k) = log(1 + 1/k) / log(K + 1), so each doubling of k gets
the same share, as with pow2, yet no k goes untrained. The last two spend most steps on short prefixes: with
cross-length joint training the full K is decoded every step anyway, and the prefix pass gets cheaper.

GPU path: nothing here makes the host wait for the device. The one-k-per-batch draw is a plain Python integer (it
sets a shape), drawn from Python's `random` (seeded by `seed_everything`, like torch), so every DDP rank seeded
alike draws the same k at the same step and no rank waits for a longer decode on another. Per-sample lengths are
drawn on the device directly (a CPU tensor copied to the GPU would block the host until the copy is done), from
torch's generator, which each rank seeds differently when a fit starts (tokenizer/training/seeding.py).
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from .config import TokenizerConfig


class KeepLengths(NamedTuple):
    num_tokens: int  # leading tokens passed to the decoder (k for one-k-per-batch tail drop, else K)
    lengths: torch.Tensor | None  # [B] int64 per-sample keep lengths within those; None: every sample keeps all


def powers_of_two_upto(k_max: int) -> list[int]:
    """[1, 2, 4, ..., k_max]; k_max itself is included even when it is not a power of two."""
    values = [1 << i for i in range(k_max.bit_length()) if (1 << i) <= k_max]
    return values if values[-1] == k_max else values + [k_max]


def draw_keep_lengths(
    cfg: TokenizerConfig, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
) -> KeepLengths:
    """This step's keep lengths under the config's length mechanism. `generator` (optional, on `device`) drives the
    per-sample draws; the one-k-per-batch draw uses Python's `random`."""
    k_max, sampling = cfg.max_tokens, cfg.length_sampling
    if cfg.length_mechanism == "fixed":
        return KeepLengths(k_max, None)
    if cfg.length_mechanism == "tail_token_drop" and not cfg.per_sample_length:
        # a host integer: no tensor, no sync
        if sampling == "pow2":
            return KeepLengths(random.choice(powers_of_two_upto(k_max)), None)
        if sampling == "log_uniform":
            return KeepLengths(min(k_max, int((k_max + 1) ** random.random())), None)
        return KeepLengths(random.randint(1, k_max), None)
    # per sample (nested dropout, per-sample tail drop): on the device
    if sampling == "pow2":
        # choices 1, 2, 4, ..., K: index i < n-1 means 2**i, the last index means K (a power of two or not)
        n = len(powers_of_two_upto(k_max))
        idx = torch.randint(0, n, (batch_size,), generator=generator, device=device)  # [B]
        pow2 = torch.ones_like(idx).bitwise_left_shift(idx)
        return KeepLengths(k_max, torch.where(idx == n - 1, k_max, pow2))
    if sampling == "log_uniform":
        u = torch.rand(batch_size, generator=generator, device=device)  # [B] in [0, 1)
        return KeepLengths(k_max, torch.pow(k_max + 1.0, u).floor().long().clamp(1, k_max))
    return KeepLengths(k_max, torch.randint(1, k_max + 1, (batch_size,), generator=generator, device=device))


def keep_mask(lengths: torch.Tensor, k_max: int) -> torch.Tensor:
    """lengths [B] -> bool [B, K], True for the kept (leading) positions."""
    return torch.arange(k_max, device=lengths.device)[None, :] < lengths[:, None]
