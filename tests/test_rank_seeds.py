"""Random draws under DDP (tokenizer/training/seeding.py): every rank draws its own dropout masks, nested-dropout
lengths and class-dropout draws, while tail drop's one k per batch stays the same on every rank."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _eval_helpers import torchrun_two_ranks

from tokenizer.training.seeding import rank_seed, seed_device_per_rank

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo over the 'lo' interface (Linux)")
def test_ranks_draw_their_own_dropout_and_share_the_tail_drop_k(tmp_path):
    proc = torchrun_two_ranks("_rank_draws", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    k0, k1 = r0["tail_token_drop"], r1["tail_token_drop"]  # [steps, B], one k per row
    assert k0.shape == (3, 4) and torch.equal(k0, k1), "tail drop's k is the same on every rank at every step"
    assert len(set(k0[:, 0].tolist())) > 1, f"k must vary over the steps for this to mean anything: {k0}"
    n0, n1 = r0["nested_dropout"], r1["nested_dropout"]
    assert n0.shape == (3, 4) and not torch.equal(n0, n1), f"per-sample lengths must differ per rank: {n0} {n1}"
    d0, d1 = r0["dropout"], r1["dropout"]
    assert d0.shape == d1.shape and d0.any() and not torch.equal(d0, d1), "dropout masks must differ per rank"


def test_rank_zero_keeps_its_stream_and_other_ranks_get_their_own(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    torch.manual_seed(7)
    assert seed_device_per_rank(0) is None
    after_rank0 = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(4), after_rank0), "rank 0 (and a single process) draws what it drew before"
    draws = {}
    for rank in (1, 2):
        torch.manual_seed(7)
        assert seed_device_per_rank(rank) == rank_seed(7, rank)
        draws[rank] = torch.rand(4)
    assert not torch.equal(draws[1], draws[2]) and not torch.equal(draws[1], after_rank0)
    assert rank_seed(7, 1) == rank_seed(7, 1) != rank_seed(8, 1)  # a function of the run's seed and the rank
