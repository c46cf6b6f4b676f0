"""The quantizer wrapper: sync-free code histogram and dead-code re-seeding, identical codebooks across DDP ranks,
LFQ's entropy loss in bounded memory, and a dispatch-level check that a training forward makes no host sync."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from vector_quantize_pytorch import VectorQuantize

import tokenizer.lfq_entropy as lfq_entropy_module
from tokenizer.config import TokenizerConfig
from tokenizer.gpu import HostSyncDetector
from tokenizer.lfq_entropy import lfq_entropy
from tokenizer.quantizer import Quantizer, code_histogram, reseed_dead_codes_

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten


def vq(**overrides) -> Quantizer:
    return Quantizer.from_config(TokenizerConfig(**{"quantizer": "vq", "codebook_size": 64, "token_dim": 8,
                                                    **overrides})).train()  # fmt: skip


def codebook_state(q: Quantizer) -> dict[str, torch.Tensor]:
    cb = q.vq_codebook
    return {name: getattr(cb, name).clone() for name in ("embed", "embed_avg", "cluster_size")}


def rows_in(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """[M, D], [N, D] -> [M] bool: row m is bit-identical to some row of pool."""
    return (rows[:, None, :] == pool[None, :, :]).all(dim=-1).any(dim=-1)


# ---- host-sync detector (tokenizer/gpu.py) -------------------------------------------------------------------
@pytest.fixture
def host_syncs():
    return HostSyncDetector


def test_sync_detector_sees_the_syncs_it_looks_for(host_syncs):
    # otherwise "no hits" below could pass vacuously
    x = torch.arange(6.0)
    with host_syncs() as detector:
        x.sum().item()
        torch.bincount(x.long())
        x[x > 2]
        x[x > 4] = 0.0
        torch.tensor([1.0, 2.0])
        x.nonzero()
    names = " ".join(detector.hits)
    for op in ("_local_scalar_dense", "bincount", "index.Tensor", "index_put", "lift_fresh", "nonzero"):
        assert op in names, f"{op} not detected in {detector.hits}"


@pytest.mark.parametrize("kind", ["vq", "lfq", "fsq"])
def test_training_step_makes_no_host_sync(kind, host_syncs, monkeypatch):
    torch.manual_seed(0)
    overrides = {"vq": dict(codebook_size=64, token_dim=8, vq_dead_code_threshold=2.0),
                 "lfq": dict(codebook_size=256), "fsq": dict(fsq_levels=[5, 4, 3])}[kind]  # fmt: skip
    q = Quantizer.from_config(TokenizerConfig(quantizer=kind, **overrides)).train()
    # lfq: several entropy chunks, so the checkpointed path (and its recompute in backward) is the one checked
    monkeypatch.setattr(lfq_entropy_module, "LFQ_ENTROPY_CHUNK_ELEMENTS", 16 * q.codebook_size)
    z = torch.randn(4, 16, q.dim, requires_grad=True)
    q(z)  # first call outside the detector: anything one-off is allowed there
    with host_syncs() as detector:
        for _ in range(2):
            out = q(z)
            (out.quantized.square().sum() + out.aux_loss + out.stats.perplexity).backward()
    assert detector.hits == []
    if kind == "vq":  # the re-seeding ran (cluster sizes start at 1 < 2: every code starts dead)
        assert (q.vq_codebook.cluster_size == 2.0).any()


# ---- code histogram ---------------------------------------------------------------------------------------------
def test_code_histogram_equals_bincount():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (7, 33))  # codes 50..63 never occur, and some of 0..49 by chance
    counts = code_histogram(ids, 64)
    assert counts.dtype == torch.float32 and counts.shape == (64,)
    assert torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=64).float())
    assert (counts[50:] == 0).all() and counts.sum() == ids.numel()
    assert torch.equal(code_histogram(ids[:0], 64), torch.zeros(64))  # an empty batch counts nothing


# ---- VQ ------------------------------------------------------------------------------------------------------
def test_vq_matches_the_library_when_reseeding_is_off():
    """Our hooks (no init_embed_ check, scatter one-hot) must not change what the library computes."""
    torch.manual_seed(0)
    ours = vq(vq_dead_code_threshold=0.0)
    theirs = VectorQuantize(dim=8, codebook_size=64, use_cosine_sim=True, decay=0.99, commitment_weight=0.25,
                            threshold_ema_dead_code=0, sync_codebook=False).train()
    theirs.load_state_dict(ours.impl.state_dict())
    for step in range(3):
        z = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(step))
        za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        out = ours(za)
        quantized, ids, loss = theirs(zb)
        assert torch.equal(out.quantized, quantized) and torch.equal(out.ids, ids) and torch.equal(out.aux_loss, loss)
        (out.quantized.sum() + out.aux_loss).backward()
        (quantized.sum() + loss).backward()
        assert torch.equal(za.grad, zb.grad)
    mine, reference = ours.impl.state_dict(), theirs.state_dict()  # the whole state, through the public API
    assert mine.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(mine[name], value), name


def _codebook_with_dead_codes(dead: torch.Tensor) -> torch.nn.Module:
    """The Codebook of a 64 x 8 VQ whose codes in `dead` [64] bool have cluster size 0.5, the rest 10."""
    codebook = vq().vq_codebook
    codebook.cluster_size[0] = torch.where(dead, 0.5, 10.0)
    codebook.embed_avg[0] = codebook.embed[0] * codebook.cluster_size[0, :, None]
    return codebook


def test_reseed_replaces_dead_codes_with_distinct_batch_vectors():
    torch.manual_seed(0)
    dead = torch.rand(64) < 0.4  # ~25 dead codes
    codebook = _codebook_with_dead_codes(dead)
    before = {name: getattr(codebook, name)[0].clone() for name in ("embed", "embed_avg", "cluster_size")}
    samples = F.normalize(torch.randn(4, 16, 8), dim=-1)  # [B, K, D], 64 vectors >= 25 dead codes
    taken = reseed_dead_codes_(codebook, samples, threshold=2.0, sync=False)
    embed, embed_avg, cluster_size = codebook.embed[0], codebook.embed_avg[0], codebook.cluster_size[0]

    assert torch.equal(taken, dead)  # every dead code, and only those
    assert rows_in(embed[dead], samples.reshape(-1, 8)).all()  # each one is a batch vector...
    assert torch.unique(embed[dead], dim=0).shape[0] == dead.sum()  # ...a different one per code
    # the library's replace(): cluster size reset to the threshold, embed_avg = vector * that size
    assert (cluster_size[dead] == 2.0).all() and torch.equal(embed_avg[dead], embed[dead] * 2.0)
    for name, value in (("embed", embed), ("embed_avg", embed_avg), ("cluster_size", cluster_size)):
        assert torch.equal(value[~dead], before[name][~dead]), f"live codes' {name} changed"


def test_reseed_defers_dead_codes_beyond_the_batch_size():
    """More dead codes than vectors: a random subset as large as the batch is re-seeded (no vector used twice);
    the rest keep their state and wait for a later step, as in the library."""
    torch.manual_seed(0)
    dead = torch.arange(64) < 48
    codebook = _codebook_with_dead_codes(dead)
    before = codebook.embed[0].clone()
    samples = F.normalize(torch.randn(20, 8), dim=-1)
    taken = reseed_dead_codes_(codebook, samples, threshold=2.0, sync=False)
    embed = codebook.embed[0]
    assert taken.sum() == 20 and not (taken & ~dead).any()
    assert rows_in(embed[taken], samples).all() and torch.unique(embed[taken], dim=0).shape[0] == 20
    assert torch.equal(embed[~taken], before[~taken])
    assert (codebook.cluster_size[0][dead & ~taken] == 0.5).all()  # still dead: next step's turn


def test_training_forward_reseeds_after_the_ema_update():
    """End to end: after the library's EMA update, codes under the threshold become normalised batch inputs;
    every other code ends exactly as without re-seeding."""
    torch.manual_seed(0)
    q = vq(vq_dead_code_threshold=2.0)
    q.vq_codebook.cluster_size.fill_(100.0)
    q.vq_codebook.cluster_size[0, :10] = 0.0  # after this step's EMA: at most 0.01 * 48 tokens, dead
    twin = copy.deepcopy(q)
    twin.dead_code_threshold = 0.0  # the same quantizer with re-seeding off
    z = torch.randn(3, 16, 8)
    q(z), twin(z)
    ours, reference = codebook_state(q), codebook_state(twin)
    dead = reference["cluster_size"][0] < 2.0
    assert dead[:10].all() and not dead[10:].any()
    assert rows_in(ours["embed"][0, dead], F.normalize(z, dim=-1, eps=1e-6).reshape(-1, 8)).all()
    for name in ours:
        assert torch.equal(ours[name][:, ~dead], reference[name][:, ~dead]), name


def test_eval_forward_does_not_reseed():
    q = vq(vq_dead_code_threshold=2.0).eval()
    before = codebook_state(q)
    q(torch.randn(2, 16, 8))
    for name, value in codebook_state(q).items():
        assert torch.equal(value, before[name]), name


def test_reseeding_leaves_fewer_dead_codes_on_clustered_data():
    """48 tight clusters on the sphere, 64 codes: with re-seeding the codebook follows the data and covers more
    clusters; without, codes that start far from every cluster never win a vector."""
    gen = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(48, 8, generator=gen), dim=-1)

    def batch(n: int) -> torch.Tensor:  # [n // 16, 16, 8]
        pick = torch.randint(0, 48, (n,), generator=gen)
        return (centers[pick] + 0.05 * torch.randn(n, 8, generator=gen)).reshape(-1, 16, 8)

    used, error = {}, {}
    for threshold in (0.0, 1.0):
        torch.manual_seed(1)  # the same initial codebook for both runs
        q = vq(vq_dead_code_threshold=threshold)
        for _ in range(100):
            q(batch(256))
        q.eval()
        held_out = batch(4096)
        out = q(held_out)
        used[threshold] = out.ids.unique().numel()
        error[threshold] = (1 - F.cosine_similarity(out.quantized, held_out, dim=-1)).mean().item()
    assert used[1.0] > used[0.0] + 5, used
    assert error[1.0] < error[0.0], error


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        for sync in (True, False):
            torch.manual_seed(0)  # identical initial codebooks, as DDP's initial broadcast would make them
            q = vq(vq_dead_code_threshold=2.0, vq_sync_codebook=sync)
            torch.manual_seed(1000 + rank)  # ranks draw different random numbers, as in a real run
            gen = torch.Generator().manual_seed(rank)
            inputs, after_first = [], None
            for _ in range(6):
                # different data per rank: clusters around -1 on rank 0 and +1 on rank 1
                z = torch.randn(4, 8, 8, generator=gen) + (1.0 if rank else -1.0) * torch.linspace(1, 2, 8)
                q(z)
                inputs.append(F.normalize(z, dim=-1, eps=1e-6).reshape(-1, 8))
                after_first = after_first if after_first is not None else q.vq_codebook.embed[0].clone()
            result[sync] = {"final": codebook_state(q), "after_first": after_first, "inputs": inputs}
        # LFQ's batch entropy is over all ranks' tokens (the library meant to, but dropped the all_reduce result)
        lfq = Quantizer.from_config(TokenizerConfig(quantizer="lfq", codebook_size=2**8)).train()
        x = (0.02 * torch.randn(64, 8, generator=gen) + 0.01 * (1.0 if rank else -1.0)).requires_grad_()
        per_sample, codebook_entropy = lfq_entropy(x, lfq.impl.codebook, chunk_tokens=24)
        (per_sample - codebook_entropy).backward()
        result["lfq"] = {"x": x.detach(), "entropies": (per_sample.detach(), codebook_entropy.detach()),
                         "grad": x.grad}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_ranks_with_different_data_end_with_identical_codebooks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    synced0, synced1 = r0[True], r1[True]
    for name in synced0["final"]:
        assert torch.equal(synced0["final"][name], synced1["final"][name]), f"{name} differs between ranks"
    # every code was dead at the first step (cluster sizes start at 1 < 2) and both ranks' vectors seeded codes
    first = synced0["after_first"]
    from_rank0, from_rank1 = rows_in(first, synced0["inputs"][0]), rows_in(first, synced1["inputs"][0])
    assert (from_rank0 | from_rank1).all() and from_rank0.any() and from_rank1.any()
    # without sync the same run drifts apart: the check above is not vacuous
    assert not torch.equal(r0[False]["final"]["embed"], r1[False]["final"]["embed"])

    # LFQ: the batch entropy (and its gradient) is that of both ranks' tokens together, the per-sample term local.
    # Single process over the 128 tokens: its loss is (ps0 + ps1) / 2 - H, the mean of the two ranks' losses,
    # so its gradient is half of each rank's own (which DDP's gradient averaging then halves likewise).
    lfq0, lfq1 = r0["lfq"], r1["lfq"]
    both = torch.cat([lfq0["x"], lfq1["x"]]).requires_grad_()
    codes = Quantizer.from_config(TokenizerConfig(quantizer="lfq", codebook_size=2**8)).impl.codebook
    per_sample, codebook_entropy = lfq_entropy(both, codes)
    (per_sample - codebook_entropy).backward()
    for rank_result in (lfq0, lfq1):
        torch.testing.assert_close(rank_result["entropies"][1], codebook_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((lfq0["entropies"][0] + lfq1["entropies"][0]) / 2, per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([lfq0["grad"], lfq1["grad"]]) / 2, both.grad, rtol=1e-4,
                               atol=1e-5 * both.grad.abs().max().item())  # fmt: skip


# ---- LFQ -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codebook_size", [2**8, 2**10])
@pytest.mark.parametrize("scale", [0.002, 0.01, 0.05, 1.0])
def test_lfq_loss_and_gradient_equal_the_library(codebook_size, scale, monkeypatch):
    """The chunked entropy (here 37-token chunks over 192 tokens, the last one short) against the library's LFQ
    forward that holds all [tokens, codebook_size] probabilities at once."""
    monkeypatch.setattr(lfq_entropy_module, "LFQ_ENTROPY_CHUNK_ELEMENTS", 37 * codebook_size)
    torch.manual_seed(0)
    q = Quantizer.from_config(TokenizerConfig(quantizer="lfq", codebook_size=codebook_size)).train()
    z = torch.randn(2, 96, q.dim) * scale
    weight = torch.randn(2, 96, q.dim)  # a downstream loss on the quantized output, to check its gradient too
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()

    out = q(za)
    quantized, ids, loss = q.impl(zb)
    assert torch.equal(out.quantized, quantized) and torch.equal(out.ids, ids.long())
    torch.testing.assert_close(out.aux_loss, loss, rtol=1e-5, atol=1e-6)
    (out.aux_loss + (out.quantized * weight).sum()).backward()
    (loss + (quantized * weight).sum()).backward()
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-4, atol=1e-6 * zb.grad.abs().max().item())

    # and the two entropy terms on their own (the ones mixed into the loss above), at several chunk sizes
    flat = z.reshape(-1, q.dim)
    _, breakdown = q.impl(z, return_loss_breakdown=True)
    for chunk in (1, 64, None):
        per_sample, codebook_entropy = lfq_entropy(flat, q.impl.codebook, chunk_tokens=chunk)
        torch.testing.assert_close(per_sample, breakdown.per_sample_entropy, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(codebook_entropy, breakdown.batch_entropy, rtol=1e-5, atol=1e-6)


def test_lfq_eval_forward_equals_the_library():
    torch.manual_seed(0)
    q = Quantizer.from_config(TokenizerConfig(quantizer="lfq", codebook_size=2**10)).eval()
    z = torch.randn(3, 8, q.dim)
    out = q(z)
    quantized, ids, loss = q.impl(z)
    assert torch.equal(out.quantized, quantized) and torch.equal(out.ids, ids.long())
    assert out.aux_loss == 0 and loss == 0
    assert torch.equal(q.codes_from_ids(out.ids), out.quantized)


def test_lfq_entropy_rejects_bad_input():
    codebook = torch.ones(4, 2)
    with pytest.raises(ValueError, match="at least one token"):
        lfq_entropy(torch.zeros(0, 2), codebook)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1, got 0"):
        lfq_entropy(torch.zeros(3, 2), codebook, chunk_tokens=0)



def _entropy_loss_and_grad(z: torch.Tensor, codebook: torch.Tensor, chunk: int | None, compiled: bool):
    """LFQ's entropy objective (per-sample minus codebook entropy) and its gradient w.r.t. the input."""
    x = z.clone().requires_grad_()
    per_sample, codebook_entropy = lfq_entropy(x, codebook, chunk_tokens=chunk, compiled=compiled)
    loss = per_sample - codebook_entropy
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.slow  # two inductor compilations (one per dtype), 20-50 s each on a shared 2-core CPU
@pytest.mark.parametrize("scale", [0.02, 1.0])
def test_lfq_entropy_compiled_equals_eager(scale):
    """compiled=True is the same loss: 96 tokens in 37-token checkpointed chunks (forward, replay and backward
    compiled; the short last chunk shares the graph) and in one unchunked chunk. In float64, where rounding is
    far below the tolerance, the two agree to 1e-6 in loss and gradient (measured: 1e-15 and 5e-14). In float32
    the loss agrees to 1e-6 (relative) and the gradient is as accurate as eager's, not equal to it: the softmax
    at inverse temperature 200 amplifies float32 rounding (summation order, softmax's division) to ~6e-5 of the
    largest gradient at unit-scale inputs in eager itself, and the compiled error measured 0.4-2.4x eager's."""
    torch._dynamo.reset()
    codes = Quantizer.from_config(TokenizerConfig(quantizer="lfq", codebook_size=2**8)).impl.codebook  # [V, d]
    for seed, chunk in ((0, 37), (1, None)):
        torch.manual_seed(seed)
        z = torch.randn(96, codes.shape[1], dtype=torch.float64) * scale
        reference = _entropy_loss_and_grad(z, codes.double(), chunk, compiled=False)
        loss, grad = _entropy_loss_and_grad(z, codes.double(), chunk, compiled=True)
        assert (loss - reference[0]).abs() <= 1e-6 and (grad - reference[1]).abs().max() <= 1e-6

        eager32 = _entropy_loss_and_grad(z.float(), codes.float(), chunk, compiled=False)
        loss32, grad32 = _entropy_loss_and_grad(z.float(), codes.float(), chunk, compiled=True)
        torch.testing.assert_close(loss32, eager32[0], rtol=1e-6, atol=1e-6)
        eager_error = (eager32[1].double() - reference[1]).abs().max()
        compiled_error = (grad32.double() - reference[1]).abs().max()
        assert compiled_error <= 4 * eager_error, (compiled_error, eager_error)


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)])  # ~20 s compile
def test_compile_switch_routes_lfq_entropy_through_one_compiled_graph(compile_, monkeypatch):
    """TokenizerModule(compile=True) compiles LFQ's entropy chunks, once for all batch sizes (their chunk
    lengths differ); compile=False leaves them eager (nothing compiled)."""
    monkeypatch.setattr(lfq_entropy_module, "LFQ_ENTROPY_CHUNK_ELEMENTS", 16 * 2**8)  # 16-token chunks
    # TF32 on, as train.py's enable_fast_math leaves it: the quantizer's forward turns it off (ieee_fp32), and the
    # checkpoint's replay in backward must run as that forward did, not recompile for the process's switches
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        _check_one_compiled_entropy_graph(compile_)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _check_one_compiled_entropy_graph(compile_: bool) -> None:
    from torch._dynamo.utils import counters

    from tokenizer.training import TokenizerModule

    torch._dynamo.reset()
    counters.clear()
    module = TokenizerModule(preset="tiny", overrides={"quantizer": "lfq", "codebook_size": 2**8},
                             compile=compile_)  # fmt: skip
    module.configure_model()  # what Lightning calls before fitting
    q = module.tokenizer.quantizer.train()
    for batch, tokens in ((2, 24), (3, 10), (4, 16)):  # chunks of 16; 16 + 14; 16 x 4
        z = torch.randn(batch, tokens, q.dim, requires_grad=True)
        q(z).aux_loss.backward()
        assert z.grad.abs().sum() > 0
    assert counters["stats"]["unique_graphs"] == (1 if compile_ else 0), dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])

# The paper's lfq-B-128 codebook (2^16) and 4096 tokens, forward + backward, in a fresh process (peak RSS).
_MEMORY_PROBE = textwrap.dedent("""
    import resource, torch
    from tokenizer.config import TokenizerConfig
    from tokenizer.quantizer import Quantizer
    torch.manual_seed(0)
    q = Quantizer.from_config(TokenizerConfig(quantizer="lfq", codebook_size=2**16)).train()
    z = (torch.randn(32, 128, 16) * 0.02).requires_grad_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q(z).aux_loss.backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)  # MiB (ru_maxrss is in KiB)
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's convention")
def test_lfq_entropy_memory_at_the_paper_codebook_size():
    """One [4096, 65536] fp32 tensor is 1 GiB and the library keeps several (7 GiB peak measured); the chunked
    loss must stay under one of them."""
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=True)  # fmt: skip
    peak_mib = float(done.stdout.strip().splitlines()[-1])
    assert peak_mib < 1024, f"forward + backward grew the process by {peak_mib:.0f} MiB"
