"""Variable-length training: how many leading tokens the decoder sees.

Every mechanism keeps tensor shapes static (the decoder always gets K latent slots) and expresses "keep the first
k tokens" as a boolean mask, so training never recompiles or reallocates for a new k.

- `tail_token_drop` (One-D-Piece): k ~ Uniform{1..K}, one k per batch (or per sample); dropped tokens are hidden
  from the decoder's attention, which is exactly what decoding a k-token prefix does at inference.
- `nested_dropout` (FlexTok): k per sample, uniform over 1..K or over powers of two; dropped tokens are replaced
  by one learned mask token, so inference pads a k-token prefix with that same mask token.
- `fixed` (TiTok): always K.
"""

from __future__ import annotations

import torch

from .config import TokenizerConfig


def powers_of_two_upto(k_max: int) -> list[int]:
    """[1, 2, 4, ..., k_max]; k_max itself is included even when it is not a power of two."""
    values = [1 << i for i in range(k_max.bit_length()) if (1 << i) <= k_max]
    return values if values[-1] == k_max else values + [k_max]


def sample_keep_lengths(
    cfg: TokenizerConfig, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Number of leading tokens each sample keeps this step. int64 [B] in 1..K."""
    k_max = cfg.num_latent_tokens
    full = torch.full((batch_size,), k_max, dtype=torch.long, device=device)
    if cfg.length_mechanism == "fixed":
        return full
    if cfg.length_mechanism == "tail_token_drop":
        n = batch_size if cfg.per_sample_length else 1
        k = torch.randint(1, k_max + 1, (n,), generator=generator, device="cpu").to(device)
        return k.expand(batch_size).clone()
    # nested_dropout: always one k per sample
    if cfg.length_sampling == "pow2":
        choices = torch.tensor(powers_of_two_upto(k_max), dtype=torch.long)
        idx = torch.randint(0, len(choices), (batch_size,), generator=generator, device="cpu")
        return choices[idx].to(device)
    return torch.randint(1, k_max + 1, (batch_size,), generator=generator, device="cpu").to(device)


def keep_mask(lengths: torch.Tensor, k_max: int) -> torch.Tensor:
    """lengths [B] -> bool [B, K], True for the kept (leading) positions."""
    return torch.arange(k_max, device=lengths.device)[None, :] < lengths[:, None]
