"""Per-rank random streams for the training step, with the one draw that must be shared kept shared.

`seed_everything` gives every rank the same seed, so under DDP every rank drew the same dropout masks, class-dropout
draws and nested-dropout lengths at the same batch position: N ranks trained N batches with one set of random
choices. What must stay identical across ranks is the one-k-per-batch draw of tail token drop (a Python integer
from `random`, tokenizer/length.py): it sets the decoder's sequence length, and a rank with a longer decode would
make the others wait at the gradient all-reduce.

So when a fit starts, every rank but 0 reseeds torch's generators (the CPU one and every CUDA device's: the draws
of the step) with a seed made from the run's seed and its global rank, and leaves Python's `random` alone. Rank 0
keeps its stream, so a single-process run draws exactly what it drew before. Model initialisation happens earlier
and stays identical (DDP broadcasts rank 0's weights anyway). A DataLoader iterator made after this (its workers'
base seed) differs per rank too; Lightning's worker_init_fn mixes in the rank as well. A resumed fit reseeds the
same way, from the same seed: it is as deterministic as the first start.
"""

from __future__ import annotations

import os

import numpy as np
import torch


def rank_seed(base: int, rank: int) -> int:
    """A 64-bit seed for `rank` from the run's seed `base` (numpy's SeedSequence: streams of nearby seeds and ranks
    are unrelated)."""
    return int(np.random.SeedSequence([base % 2**64, rank]).generate_state(1, np.uint64)[0])


def seed_device_per_rank(rank: int) -> int | None:
    """Reseed torch's generators (CPU and all CUDA devices) for global rank `rank` > 0; rank 0 keeps its stream.
    The run's seed is the one `seed_everything` set (PL_GLOBAL_SEED), or else torch's initial seed, which is the
    same on every rank unless something seeded them differently. Returns the seed set, or None on rank 0."""
    if rank == 0:
        return None
    base = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
    seed = rank_seed(base, rank)
    torch.manual_seed(seed)  # host-side state only (CUDA generators keep a seed and an offset): no device work
    return seed


__all__ = ["rank_seed", "seed_device_per_rank"]
