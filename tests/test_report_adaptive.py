"""The reconstruction report's adaptive section (eval.adaptive_eval), on a small tokenizer whose quality rises with
k by construction (tests/_dct_tokenizer.py: the same function on every machine, unlike a briefly trained one) and
the embedded held-out photographs: it is there, and every number in it is consistent with the per-image lengths
and metrics it was computed from and with the fixed-k curve of the same report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _dct_tokenizer import save_dct_tokenizer
from _eval_helpers import OneProcess, free_port
from _weights_probe import needs_lpips

from eval.adaptive_eval import Target, adaptive_section, make_targets, matched_k
from eval.recon_eval import evaluate
from eval.sources import make_source

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A 32 px, K = 8 tokenizer whose PSNR never falls as k grows, so the default targets pick a spread of
    lengths on any machine."""
    return save_dct_tokenizer(tmp_path_factory.mktemp("adaptive") / "tok")


def _strict_json(path: Path) -> dict:
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@needs_lpips
def test_cli_adaptive_section_is_consistent(tok_dir, tmp_path):
    """`python -m eval.reconstruction` with the default targets: three PSNR targets inside the fixed-k range;
    mean/median tokens, the histogram, the fraction met and the metrics recomputed from per_image.npz; the fixed
    k of equal mean PSNR recomputed from the table's tokenizer rows; an image that chose an evaluated k scores
    what the fixed-k pass scored for it."""
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "eval.reconstruction", "--tokenizer", str(tok_dir), "--no-fid",
                           "--codecs", "--per-image", "--num-workers", "0", "--cpu", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _strict_json(out / "metrics.json")
    section, per = report["adaptive"], np.load(out / "per_image.npz")
    fixed = sorted((r["num_tokens"], r["psnr"]) for r in report["rows"] if r["method"] == "tokenizer")
    assert [k for k, _ in fixed] == [1, 2, 4, 8] and section["default_targets"] and section["k_max"] == 8
    assert len(section["rows"]) == 3 and "adaptive" in report["meta"]["protocol"]
    lengths, metrics = per["adaptive_lengths"], per["adaptive_metrics"]  # [N, 3], [N, 3, (psnr, ssim, lpips)]
    n = report["meta"]["num_images"]
    assert lengths.shape == (n, 3) and metrics.shape == (n, 3, 3)
    assert list(per["adaptive_targets"]) == [f"adaptive_psnr@{r['target']:g}" for r in section["rows"]]
    chosen = set()
    for t, r in enumerate(section["rows"]):
        assert fixed[0][1] < r["target"] < fixed[-1][1]  # spread over what k = 1..K reach
        k, psnr = lengths[:, t], metrics[:, t, 0]
        chosen |= set(k.tolist())
        assert r["num_images"] == n and 1 <= k.min() and k.max() <= 8
        assert r["mean_tokens"] == pytest.approx(k.mean()) and r["median_tokens"] == np.median(k)
        assert r["k_histogram"] == np.bincount(k - 1, minlength=8).tolist() and sum(r["k_histogram"]) == n
        assert r["fraction_met"] == pytest.approx((psnr >= r["target"]).mean())
        assert r["unmet_at_k_max"] == int(((psnr < r["target"]) & (k == 8)).sum())
        assert np.all((psnr >= r["target"]) | (k == 8)), "below K the search only stops where the target is met"
        for j, key in enumerate(("psnr", "ssim", "lpips")):
            assert r[key] == pytest.approx(metrics[:, t, j].mean())
        assert r["rfid"] is None and r["bits_per_image"] == pytest.approx(r["mean_tokens"] * math.log2(15**3))
        # the fixed k of equal mean PSNR, by hand: first evaluated k at or above it, linear in log2 k before it
        i = next((i for i, (_, v) in enumerate(fixed) if v >= r["psnr"]), None)
        if i is None or i == 0:
            assert r["matched_k"] is None and r["savings"] is None and r["match_note"]
        else:
            (k0, v0), (k1, v1) = fixed[i - 1], fixed[i]
            expected = 2 ** (math.log2(k0) + (r["psnr"] - v0) / (v1 - v0) * (math.log2(k1) - math.log2(k0)))
            assert r["matched_k"] == pytest.approx(expected)
            assert r["savings"] == pytest.approx(expected / r["mean_tokens"])
        # the fixed k with as many images meeting the target, by hand from the fixed pass's per-image PSNR
        settings = list(per["settings"])
        met_at = {kk: (per["metrics"][:, settings.index(f"tokenizer@{kk}"), 0] >= r["target"]).mean()
                  for kk, _ in fixed}
        expected_g = next((kk for kk, _ in fixed if met_at[kk] >= r["fraction_met"] - 1e-12), None)
        assert r["guarantee_k"] == expected_g
        if expected_g is not None:
            assert r["guarantee_savings"] == pytest.approx(expected_g / r["mean_tokens"])
        # an image decoded from its own k tokens scores what the fixed-k pass scored for that k
        for b in range(n):
            if f"tokenizer@{k[b]}" in settings:
                fixed_psnr = per["metrics"][b, settings.index(f"tokenizer@{k[b]}"), 0]
                assert psnr[b] == pytest.approx(fixed_psnr, abs=1e-6), (b, k[b])
    assert len(chosen) >= 3, f"the default targets should pick a spread of lengths, got {sorted(chosen)}"
    md = (out / "metrics.md").read_text()
    assert "## Adaptive token counts" in md and "| target | mean tokens | median tokens | met |" in md
    for r in section["rows"]:
        assert f"| {r['label']} | {r['mean_tokens']:.2f} | {r['median_tokens']:g} | {r['fraction_met']:.1%} |" in md
    assert (out / "adaptive_k_hist.png").stat().st_size > 0


@needs_lpips
def test_lpips_targets_and_the_default_skip(tok_dir, tmp_path):
    """An LPIPS target (search and score both LPIPS), through the library; with one evaluated k there is no range
    for default targets: the section says so instead of inventing one."""
    from tokenizer import OneDTokenizer

    tok = OneDTokenizer.from_pretrained(tok_dir)
    loader, total, _ = make_source("photos", tok.image_size, max_images=12, batch_size=8)
    batches = list(loader)
    rows, _, _ = evaluate(OneProcess(), tok, batches, total, [1, 8], [], fid=False)
    lpips_1, lpips_8 = rows[0].lpips, rows[1].lpips
    target = round((lpips_1 + lpips_8) / 2, 3)
    section, per = adaptive_section(OneProcess(), tok, batches, total, rows, [Target("lpips", target)], fid=False)
    (r,) = section["rows"]
    assert r["label"] == f"LPIPS <= {target:g}" and not section["default_targets"]
    lpips = per["adaptive_metrics"][:, 0, 2]
    assert r["fraction_met"] == pytest.approx((lpips <= target).mean()) and r["lpips"] == pytest.approx(lpips.mean())
    assert r["mean_tokens"] == pytest.approx(per["adaptive_lengths"].mean())
    single, _ = evaluate(OneProcess(), tok, batches, total, [8], [], fid=False)[:2]
    skipped, none = adaptive_section(OneProcess(), tok, batches, total, single, None, fid=False)
    assert "at least two k" in skipped["skipped"] and none is None


@needs_lpips
@pytest.mark.slow
def test_adaptive_section_same_on_one_and_two_processes(tok_dir, tmp_path):
    """13 images (odd: a padded gather would count one twice) on 1 and 2 CPU processes: the same lengths, metrics
    and summary (rFID included), whatever the split."""
    args = ["-m", "eval.reconstruction", "--tokenizer", str(tok_dir), "--max-images", "13", "--num-tokens", "1", "8",
            "--codecs", "--adaptive-psnr", "15", "--adaptive-lpips", "0.3", "--per-image", "--num-workers", "0",
            "--batch-size", "4", "--cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    for name, prefix in (("one", [sys.executable]), ("two", launch)):
        proc = subprocess.run([*prefix, *args, "--out", str(tmp_path / name)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (_strict_json(tmp_path / n / "metrics.json")["adaptive"] for n in ("one", "two"))
    assert [r["label"] for r in one["rows"]] == ["LPIPS <= 0.3", "PSNR >= 15 dB"] and not one["default_targets"]
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert a["k_histogram"] == b["k_histogram"] and a["num_images"] == b["num_images"] == 13
        for key in ("mean_tokens", "fraction_met", "psnr", "ssim", "lpips", "rfid"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    p1, p2 = np.load(tmp_path / "one" / "per_image.npz"), np.load(tmp_path / "two" / "per_image.npz")
    assert np.array_equal(p1["adaptive_lengths"], p2["adaptive_lengths"])
    np.testing.assert_allclose(p1["adaptive_metrics"], p2["adaptive_metrics"], rtol=0, atol=1e-4)


def test_matched_k_and_targets():
    curve = [(1, 10.0), (2, 12.0), (4, 14.0), (8, 15.0)]
    assert matched_k(curve, 13.0) == (pytest.approx(2 ** 1.5), None)  # halfway from k=2 to k=4, in log2 k
    assert matched_k(curve, 12.0) == (2.0, None)
    assert matched_k(curve, 9.0)[0] is None and "smallest evaluated k = 1" in matched_k(curve, 9.0)[1]
    assert matched_k(curve, 16.0)[0] is None and "better than every evaluated k" in matched_k(curve, 16.0)[1]
    lpips = [(1, 0.6), (2, 0.5), (4, 0.4)]  # lower is better
    assert matched_k(lpips, 0.45, higher_is_better=False)[0] == pytest.approx(2 ** 1.5)
    # a dip: the first k that reaches it, from the k just before (2, the dip), not from k = 1
    assert matched_k([(1, 12.0), (2, 11.0), (4, 14.0)], 13.0)[0] == pytest.approx(2 ** (1 + 2 / 3))
    targets = make_targets([24.0, 20.0, 24.0], [0.3])
    assert [t.label for t in targets] == ["LPIPS <= 0.3", "PSNR >= 20 dB", "PSNR >= 24 dB"]
    with pytest.raises(ValueError, match=r"min_psnr must be in \(0, 100\] dB, got 0.0"):
        make_targets([0.0], None)
    with pytest.raises(ValueError, match=r"max_lpips must be in \(0, 1\], got 1.5"):
        make_targets(None, [1.5])
