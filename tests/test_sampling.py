"""The sync-free sampler: its draws follow the exact filtered softmax, and the token loop never syncs the host.

Distribution: 200k vectorised draws from fixed logits against a float64 reference written here from the
definitions (temperature, top-k, nucleus), with a chi-square bound, and no draw ever of a filtered token.
Sync detection: a TorchDispatchMode records the aten ops that wait for the device on CUDA (.item()/bool()
-> _local_scalar_dense, nonzero, multinomial, masked_select, boolean-mask indexing) or build a tensor from
Python data (lift_fresh); a `generate` call of 12 tokens must record exactly what a call of 4 records, so
nothing of the kind happens inside the per-token loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from tokenizer.generator import GPT, generate, next_token_logits, sample_from_logits
from tokenizer.generator.sampling import KVCache, gumbel_noise
from tokenizer.gpu import HostSyncDetector
from tokenizer.precision import autocast, resolve_precision

N_DRAWS = 200_000


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- reference distribution --------------------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


def reference_probs(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None):
    """float64 softmax(logits / T) restricted to the top-k, then to the nucleus: the smallest set of most
    likely tokens whose probability reaches top_p (the top token always). logits [V] without ties."""
    z = logits.astype(np.float64) / temperature
    if top_k is not None:
        kth = np.sort(z)[::-1][top_k - 1]
        z = np.where(z >= kth, z, -np.inf)
    if top_p is not None:
        p = _softmax(z)
        order = np.argsort(-p, kind="stable")
        mass_before = np.cumsum(p[order]) - p[order]
        keep_sorted = mass_before < top_p
        keep_sorted[0] = True
        keep = np.zeros(len(z), dtype=bool)
        keep[order[keep_sorted]] = True
        z = np.where(keep, z, -np.inf)
    return _softmax(z)


def nucleus_margin(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float) -> float:
    """Distance of top_p from the nearest cumulative mass: fp32 rounding cannot move the cut when large."""
    p = reference_probs(logits, temperature, top_k, None)
    cum = np.cumsum(np.sort(p)[::-1])
    return float(np.abs(cum - top_p).min())


# two rows with different shapes of distribution, no ties; one token already -inf (a banned code)
LOGITS = torch.cat([torch.randn(2, 23, generator=torch.Generator().manual_seed(3)) * 1.5,
                    torch.full((2, 1), float("-inf"))], dim=1)  # [2, 24]  # fmt: skip

CASES = {
    "temperature": dict(temperature=0.7, top_k=None, top_p=None),
    "top_k": dict(temperature=1.0, top_k=5, top_p=None),
    "top_p": dict(temperature=1.3, top_k=None, top_p=0.8),
    "top_k_top_p": dict(temperature=0.9, top_k=8, top_p=0.7),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_matches_exact_filtered_softmax(case):
    kw = CASES[case]
    g = torch.Generator().manual_seed(0)
    logits = LOGITS.repeat(N_DRAWS, 1)  # [2N, V]: rows alternate between the two distributions
    ids = sample_from_logits(logits, generator=g, **kw).view(N_DRAWS, 2)  # [N, 2]
    assert ids.dtype == torch.int64
    for row in range(2):
        ref = reference_probs(LOGITS[row].numpy(), **kw)
        if kw["top_p"] is not None:
            assert nucleus_margin(LOGITS[row].numpy(), **kw) > 1e-3  # the fixture keeps away from fp32 ties
        counts = np.bincount(ids[:, row].numpy(), minlength=LOGITS.shape[1])
        assert counts[ref == 0].sum() == 0, f"{case}: drew a filtered-out token"
        kept = ref > 0
        expected = N_DRAWS * ref[kept]
        stat = float(((counts[kept] - expected) ** 2 / expected).sum())
        df = int(kept.sum()) - 1
        assert stat < chi2.ppf(1 - 1e-3, df), (case, row, stat, df)
        # power: the same counts reject, at a far stricter level, a distribution 10% hotter
        other = reference_probs(LOGITS[row].numpy(), kw["temperature"] * 1.1, kw["top_k"], kw["top_p"])
        kept_o = other > 0
        if (counts[~kept_o] == 0).all():
            e_o = N_DRAWS * other[kept_o]
            assert float(((counts[kept_o] - e_o) ** 2 / e_o).sum()) > chi2.ppf(1 - 1e-6, int(kept_o.sum()) - 1)
        if case == "top_k":
            assert kept.sum() == 5
        if case in ("top_p", "top_k_top_p"):
            assert 1 < kept.sum() < (8 if case == "top_k_top_p" else 23)  # the nucleus really cuts


def test_sampler_edge_cases():
    logits = torch.tensor([[0.0, 3.0, -1.0, float("-inf")]]).repeat(5000, 1)
    g = torch.Generator().manual_seed(1)
    assert (sample_from_logits(logits, top_k=1, generator=g) == 1).all()
    assert (sample_from_logits(logits, top_p=0.0, generator=g) == 1).all()  # p <= 0: the top token
    assert (sample_from_logits(logits, temperature=1e-4, generator=g) == 1).all()  # cold ~ greedy
    assert (sample_from_logits(logits, generator=g) != 3).all()  # -inf logit never drawn
    noise = gumbel_noise(torch.empty(1000, 4096), torch.Generator().manual_seed(2))
    assert noise.isfinite().all() and noise.dtype == torch.float32
    assert abs(noise.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni: the Gumbel mean
    a = sample_from_logits(logits[:4], generator=torch.Generator().manual_seed(7))
    b = sample_from_logits(logits[:4], generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)  # seeded


# ---- no host sync in the token loop ------------------------------------------------------------------------
def _small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT.from_preset("tiny", vocab_size=64, max_tokens=16, num_classes=4, dim=32, depth=2, heads=2)


def _record(fn) -> Counter:
    with HostSyncDetector() as rec:
        fn()
    return rec.found


def test_sync_detector_sees_what_the_old_sampler_did():
    """The detector works: the multinomial sampler and a per-token .item() are counted once per token."""
    probs = torch.softmax(torch.randn(3, 10), -1)

    def old_loop(k):
        for _ in range(k):
            torch.multinomial(probs, 1)
            torch.tensor([1, 2])
            probs[probs > 0.1]
            probs.max().item()

    four, twelve = _record(lambda: old_loop(4)), _record(lambda: old_loop(12))
    assert twelve != four
    assert twelve["aten.multinomial.default"] == 12 and twelve["aten.lift_fresh.default"] == 12
    assert twelve["aten._local_scalar_dense.default"] == 12
    assert twelve["aten.index.Tensor (boolean mask)"] == 12


@pytest.mark.parametrize(
    "kw",
    [
        dict(greedy=True),
        dict(temperature=1.0),
        dict(temperature=0.8, top_k=10, top_p=0.9, cfg_scale=2.0),
        dict(temperature=1.0, top_p=0.5, use_kv_cache=False),
        dict(temperature=1.0, top_k=5, cfg_scale=1.5, precision="bf16"),
    ],
    ids=["greedy", "plain", "topk_topp_cfg", "no_cache", "bf16"],
)
def test_token_loop_does_not_sync(kw):
    m = _small_gpt()
    labels = torch.tensor([0, 3, 1])

    def run(k):
        return lambda: generate(m, labels, k, generator=torch.Generator().manual_seed(0), **kw)

    four, twelve = _record(run(4)), _record(run(12))
    assert twelve == four, f"per-token sync-like ops: k=4 {dict(four)} vs k=12 {dict(twelve)}"
    # what is left is set-up (the CPU range check of the labels), and none of it a multinomial/mask/upload
    assert sum(twelve.values()) <= 4, dict(twelve)
    assert set(twelve) <= {"aten._local_scalar_dense.default"}, dict(twelve)


# ---- bf16 autocast -----------------------------------------------------------------------------------------
def test_bf16_sampling_logits_close_to_fp32_and_cache_in_bf16():
    m = _small_gpt().eval()
    labels = torch.tensor([2, 0])
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    ref = m(ids, labels).logits  # [2, 16, V] fp32
    cache = KVCache(m, 2, dtype=torch.bfloat16)
    with autocast("bf16", "cpu"):
        for t in range(16):
            got = next_token_logits(m, labels, ids[:, :t], cache=cache)  # [2, V]
            assert got.dtype == torch.float32
            # bf16 keeps ~3 significant digits: logits (std ~0.16 at init) agree to a few 1e-3
            torch.testing.assert_close(got, ref[:, t], atol=2e-2, rtol=0)
    assert cache.layers[0].k.dtype == torch.bfloat16
    out = generate(m, labels, 16, cfg_scale=2.0, top_k=8, precision="bf16")
    assert out.shape == (2, 16) and out.dtype == torch.int64 and 0 <= out.min() and out.max() < 64


def _autocast_reference(m: GPT, labels: torch.Tensor, k: int, cfg_scale: float, seed: int, **kw) -> torch.Tensor:
    """What bf16 `generate` did before the bf16 copy: the fp32 model under bf16 autocast, token by token."""
    rows = 2 * len(labels) if cfg_scale != 1.0 else len(labels)
    cache, g = KVCache(m, rows, max_len=k, dtype=torch.bfloat16), torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(labels), k, dtype=torch.long)
    with autocast("bf16", "cpu"):
        for t in range(k):
            logits = next_token_logits(m, labels, ids[:, :t], cfg_scale, cache)  # [B, V]
            ids[:, t] = sample_from_logits(logits, generator=g, **kw)
    return ids


@pytest.mark.parametrize("compile_step", [False, True], ids=["eager", "compiled"])
def test_bf16_copy_samples_the_ids_of_autocast(compile_step):
    """bf16 sampling through the bf16 copy of the Linear weights computes what autocast computed, op for op
    (tokenizer/generator/sampling_weights.py), so a seeded call draws the same ids."""
    m = _small_gpt().eval()
    labels = torch.tensor([2, 0, 1])
    opts = dict(compile_step=True, compile_options={"backend": "aot_eager"}) if compile_step else {}
    for cfg_scale, kw in ((1.0, dict(temperature=1.0)), (2.0, dict(temperature=0.9, top_k=8, top_p=0.9))):
        ref = _autocast_reference(m, labels, 16, cfg_scale, seed=3, **kw)
        got = generate(m, labels, 16, cfg_scale=cfg_scale, precision="bf16", generator=torch.Generator().manual_seed(3),
                       **kw, **opts)  # fmt: skip
        assert torch.equal(got, ref), (cfg_scale, kw)


def test_bf16_copy_sampling_matches_the_exact_softmax():
    """The distribution test above, through `generate` with the bf16 copy: 2 x 100k first tokens against the
    float64 softmax of the autocast logits (filtered by top-k), chi-square at the same level."""
    m = _small_gpt().eval()
    n, kw = 100_000, dict(temperature=0.8, top_k=12)
    with autocast("bf16", "cpu"):
        ref_logits = next_token_logits(m, torch.tensor([2, 0]), torch.zeros(2, 0, dtype=torch.long), 2.0)  # [2, V]
    labels = torch.tensor([2, 0]).repeat(n)  # [2n]
    ids = generate(m, labels, 1, cfg_scale=2.0, precision="bf16", generator=torch.Generator().manual_seed(0), **kw)
    for row in range(2):
        ref = reference_probs(ref_logits[row].double().numpy(), **kw, top_p=None)
        counts = np.bincount(ids[row::2, 0].numpy(), minlength=ref.size)
        kept = ref > 0
        assert counts[~kept].sum() == 0 and kept.sum() == 12
        expected = n * ref[kept]
        stat = float(((counts[kept] - expected) ** 2 / expected).sum())
        assert stat < chi2.ppf(1 - 1e-3, int(kept.sum()) - 1), (row, stat)


def test_precision_names():
    assert resolve_precision(None, "cpu") == "fp32" and resolve_precision(None, "cuda:0") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="'float8'"):
        resolve_precision("float8", "cpu")
    with pytest.raises(ValueError, match="'half'"):
        generate(_small_gpt(), torch.tensor([0]), 2, precision="half")
    with autocast("bf16", "cpu"), autocast("fp32", "cpu"):  # fp32 switches an outer autocast off
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32


# ---- benchmark ---------------------------------------------------------------------------------------------
def test_bench_sampling_ends_with_json():
    """scripts/bench_sampling.py at tiny settings in a subprocess: the last line is one JSON object."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "scripts/bench_sampling.py", "--vocab-size", "64", "--max-tokens", "8",
                           "--num-classes", "4", "--batch-sizes", "2", "--num-tokens", "4", "8", "--repeats", "1",
                           "--cfg-scale", "2.0", "--top-k", "8", "--dtype", "bfloat16", "--threads", "1"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bench"] == "sampling" and out["precision"] == "bf16" and out["cfg_scale"] == 2.0
    assert out["device"] == "cpu" and out["peak_mem_gb"] is None and out["sync_check"] is None
    assert out["compiles"] == 0 and out["graph_breaks"] == 0  # eager: Dynamo compiled nothing
    assert [(r["batch"], r["k"], r["kv_cache"]) for r in out["rows"]] == [
        (2, 4, True),
        (2, 4, False),
        (2, 8, True),
        (2, 8, False),
    ]
    for r in out["rows"]:
        assert r["tokens_per_s"] == pytest.approx(r["images_per_s"] * r["k"]) and r["tokens_per_s"] > 0
