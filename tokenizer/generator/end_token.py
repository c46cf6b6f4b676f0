"""Variable-length records for the GPT: where the end-of-image token goes in training and what it ignores.

A record is ids [B, T] padded past its length L (1 <= L; lengths [B]). With the end token the model learns

    position:  0        1      ...   L-1        L      L+1 ...  T-1
    input:     [class]  id_0   ...   id_{L-2}   id_{L-1} END ... END
    target:    id_0     id_1   ...   id_{L-1}   END    ignored ...

so it sees exactly what sampling feeds it (sampling.generate writes END into a finished row, and the positions
after it are never looked at). L >= T means the record fills the window: no END target (sampling stops at K).
Everything here is a device op on fixed shapes: no host read, so the training step stays free of syncs.
"""

from __future__ import annotations

import torch

from .loss import IGNORE_INDEX


def end_token_sequences(ids: torch.Tensor, lengths: torch.Tensor, end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, T], targets [B, T]) for ids [B, T] (int64) and lengths [B]: inputs hold END from position L
    on, targets hold id_t before L, END at L and IGNORE_INDEX after L (see the module docstring)."""
    pos = torch.arange(ids.shape[1], device=ids.device)  # [T]
    length = lengths.to(device=ids.device, dtype=torch.long)[:, None]  # [B, 1]
    inputs = ids.masked_fill(pos >= length, end_id)  # [B, T]: padding never reaches the embedding
    targets = inputs.masked_fill(pos > length, IGNORE_INDEX)  # [B, T]: END at L, nothing after
    return inputs, targets


def check_lengths(lengths: torch.Tensor, batch_size: int) -> None:
    """ValueError unless lengths is an integer tensor [B] with every value >= 1 (reads the values: CPU only)."""
    if lengths.shape != (batch_size,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor of shape [{batch_size}], got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")  # fmt: skip
    if lengths.numel() and int(lengths.min()) < 1:
        raise ValueError(f"lengths must be >= 1 (every record has at least one token), got min {int(lengths.min())}")


__all__ = ["end_token_sequences", "check_lengths"]
