"""eval/: metrics on uint8 images, codec baselines at matched bits, the report, 1 vs 2 processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _eval_helpers import OneProcess as _OneProcess
from _eval_helpers import free_port as _free_port
from _weights_probe import have_lpips, needs_inception, needs_lpips

from eval import codecs, metrics
from eval import recon_eval as rec
from eval import recon_report as report
from tokenizer import OneDTokenizer
from tokenizer.inception import fid_from_features

REPO = Path(__file__).resolve().parents[1]


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 200 + torch.linspace(0, 50, size)[None, None, None, :]
    noise = torch.rand(n, 3, size, size, generator=g) * 10
    return (base + noise).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------- metrics
def test_psnr_uint8_and_identical_images_capped():
    x = _images(3)
    assert torch.equal(metrics.psnr(x, x), torch.full((3,), metrics.PSNR_CAP_DB, dtype=torch.float64))
    y = x.clone()
    y[0, 0, 0, 0] ^= 1  # one LSB in one value of the first image
    p = metrics.psnr(y, x)
    expected = 10 * np.log10(255.0**2 / (1 / x[0].numel()))
    assert p[0].item() == pytest.approx(min(expected, metrics.PSNR_CAP_DB))
    z = (x.int() + 4).clamp(max=255).to(torch.uint8)
    mse = (z.double() - x.double()).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(metrics.psnr(z, x), 10 * torch.log10(255.0**2 / mse))
    with pytest.raises(TypeError, match="uint8"):
        metrics.psnr(x.float(), x.float())
    assert torch.allclose(metrics.ssim(x, x), torch.ones(3))


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-0.2, 0.0, 0.4 / 255, 0.6 / 255, 254.5 / 255 - 1e-6, 1.0, 1.3])
    assert metrics.to_uint8(x).tolist() == [0, 0, 0, 1, 254, 255, 255]


@needs_lpips
def test_lpips_reference_equals_lpips():
    a, b = _images(4, seed=1), _images(4, seed=2)
    torch.testing.assert_close(metrics.LPIPSReference(b)(a), metrics.lpips(a, b), rtol=0, atol=0)
    assert torch.all(metrics.lpips(a, a).abs() < 1e-6)


def test_fid_rows_and_sums_agree_with_reference_implementation():
    g = torch.Generator().manual_seed(0)
    for n, d in ((13, 64), (200, 16)):  # fewer samples than dims, and more
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = torch.randn(n + 3, d, generator=g, dtype=torch.float64) * 1.3 + 0.2
        ref = fid_from_features(x, y)
        assert metrics.fid_from_rows(x, y) == pytest.approx(ref, rel=1e-9)
        a, b = metrics.FeatureSet(max_rows=5), metrics.FeatureSet(max_rows=5)
        for chunk in x.split(4):
            a.add(chunk)
        for chunk in y.split(4):
            b.add(chunk)
        assert a.n_folded and a.count == n
        assert a.fid(b) == pytest.approx(ref, rel=1e-7)
    rows = metrics.FeatureSet()
    rows.add(x[5:], torch.arange(5, n))
    rows.add(x[:5], torch.arange(5))  # out of order: sorted by index
    assert torch.equal(rows.features(), x)


# ---------------------------------------------------------------------------------------------- codecs
@pytest.mark.parametrize("name", ["jpeg", "webp"])
def test_codec_bits_are_reported_and_matched(name):
    image = _images(1, size=64, seed=3)[0]
    search = codecs.CodecSearch(image, name)
    lo, hi = search.bits(search.codec.min_quality), search.bits(search.codec.max_quality)
    # unreachable target (header overhead): lowest quality, achieved bits reported honestly (> target)
    out, bits, quality = codecs.compress_to_bits(image, name, target_bits=10)
    assert quality == search.codec.min_quality and bits == lo > 10
    assert out.dtype == torch.uint8 and out.shape == image.shape
    # a reachable target: the closest size among all qualities
    target = (lo + hi) / 2
    _, bits, quality = search.compress(target)
    sizes = [search.bits(q) for q in range(search.codec.min_quality, search.codec.max_quality + 1)]
    assert bits == 8 * len(search.encoded(quality))
    assert abs(bits - target) <= min(abs(s - target) for s in sizes) * 1.5 + 64
    batch = codecs.compress_batch(_images(3, size=64), name, [10.0, target])
    recs, bits_b, q_b = batch[target]
    assert recs.shape == (3, 3, 64, 64) and bits_b.shape == (3,) and torch.all(bits_b % 8 == 0)


# ---------------------------------------------------------------------------------------------- report
def _tiny_tokenizer() -> OneDTokenizer:
    torch.manual_seed(0)
    return OneDTokenizer.from_preset("tiny", enc_depth=1, dec_depth=1, max_tokens=32)


@needs_lpips
def test_reconstructions_are_quantised_before_metrics():
    """A decoder output within half an LSB of the reference must score as a perfect reconstruction."""
    tok = _tiny_tokenizer()
    refs = _images(5, size=64, seed=4)
    tok.decode = lambda ids, **_: ((refs[: len(ids)].double() + 0.45) / 255).float()  # < 0.5 LSB off everywhere
    loader = [(torch.arange(5), refs)]
    rows, grid, per = rec.evaluate(_OneProcess(), tok, loader, 5, [1, 32], [], fid=False)
    for r in rows:
        assert r.psnr == metrics.PSNR_CAP_DB and r.ssim == pytest.approx(1.0) and abs(r.lpips) < 1e-6
    assert torch.equal(grid["tokenizer@32"], refs)


@needs_lpips
def test_report_files_and_columns(tmp_path):
    tok = _tiny_tokenizer()
    refs = _images(6, size=64, seed=5)
    loader = [(torch.arange(0, 4), refs[:4]), (torch.arange(4, 6), refs[4:])]
    ks = [1, 32]
    rows, grid, per = rec.evaluate(_OneProcess(), tok, loader, 6, ks, ["jpeg", "webp"], fid=False)
    meta = {"description": "tiny", "num_images": 6, "source": "test", "num_processes": 1,
            "protocol": rec.PROTOCOL}
    report.write_report(rows, grid, tmp_path, meta, per)
    for name in ("metrics.md", "metrics.json", "metrics_vs_tokens.png", "metrics_vs_bits.png",
                 "reconstructions.png", "reconstructions_jpeg.png", "reconstructions_webp.png",
                 "per_image.npz"):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert set(data["rows"][0]) == {"method", "num_tokens", "target_bits", "bits_per_image", "rfid", "lpips",
                                    "psnr", "ssim", "codebook_usage", "quality", "num_images"}
    assert [(r["method"], r["num_tokens"]) for r in data["rows"]] == [
        (m, k) for m in ("tokenizer", "jpeg", "webp") for k in ks]
    for r in data["rows"]:
        assert r["target_bits"] == pytest.approx(r["num_tokens"] * 10)  # log2(1024) bits per token
        assert r["num_images"] == 6
        if r["method"] == "tokenizer":
            assert r["bits_per_image"] == r["target_bits"] and 0 < r["codebook_usage"] <= 1
        else:  # achieved bits: whole files, way above 10..320 bits at 64 px
            assert r["bits_per_image"] > r["target_bits"] and r["quality"] is not None
    md = (tmp_path / "metrics.md").read_text()
    assert "| k tokens | method | target bits | bits/image | rFID | LPIPS | PSNR (dB) | SSIM |" in md
    assert "N = 6" in md and "uint8" in md
    assert per["metrics"].shape == (6, 6, len(rec.PER_IMAGE_FIELDS))
    assert per["index"].tolist() == list(range(6))


@needs_lpips
@needs_inception
def test_codec_outputs_repeated_below_their_floor_score_as_when_scored_alone():
    """JPEG cannot get down to 10 or 320 bits at 64 px, so it gives the same images at both k; those are scored
    once and reused. Every metric, rFID included, equals the one of an evaluation of that k alone."""
    tok = _tiny_tokenizer()
    refs = _images(4, size=64, seed=6)
    loader = [(torch.arange(4), refs)]
    both, _, _ = rec.evaluate(_OneProcess(), tok, loader, 4, [1, 32], ["jpeg"])
    alone, _, _ = rec.evaluate(_OneProcess(), tok, loader, 4, [32], ["jpeg"])
    jpeg = {r.num_tokens: r for r in both if r.method == "jpeg"}
    reference = next(r for r in alone if r.method == "jpeg")
    for r in jpeg.values():
        for field in ("rfid", "lpips", "psnr", "ssim", "bits_per_image", "quality"):
            assert getattr(r, field) == pytest.approx(getattr(reference, field), rel=1e-9), field
    tokenizer_32 = next(r for r in both if r.method == "tokenizer" and r.num_tokens == 32)
    assert tokenizer_32.rfid == pytest.approx(next(r for r in alone if r.method == "tokenizer").rfid, rel=1e-9)


@needs_lpips
@needs_inception
def test_adaptive_pass_reuses_the_fixed_pass_reference_features(monkeypatch):
    """The fixed-k pass and the adaptive pass read the same images. With a shared FidReference the adaptive pass
    runs Inception over its reconstructions only, not over the references again, and its rFID equals that of a
    pass that computes the reference itself."""
    from eval.adaptive_eval import Target, evaluate_adaptive
    from eval.gather import FidReference

    tok = _tiny_tokenizer()
    loader = [(torch.arange(4), _images(4, size=64, seed=7))]
    seen = []  # images per Inception call, counted around the real function
    real = metrics.inception_features
    monkeypatch.setattr(metrics, "inception_features", lambda x, *a, **k: seen.append(len(x)) or real(x, *a, **k))
    shared = FidReference()
    rec.evaluate(_OneProcess(), tok, loader, 4, [1, 32], [], fid_reference=shared)
    assert not shared.needed and sum(seen) == 4 * 3  # the references, then k = 1 and k = 32
    targets = [Target("psnr", 10.0), Target("psnr", 60.0)]  # met at once; never met (the search gives K)
    seen.clear()
    _, reused = evaluate_adaptive(_OneProcess(), tok, loader, 4, targets, fid_reference=shared)
    assert sum(seen) == 4 * len(targets)
    seen.clear()
    _, own = evaluate_adaptive(_OneProcess(), tok, loader, 4, targets)
    assert sum(seen) == 4 * (len(targets) + 1)
    assert reused.keys() == own.keys() and len(reused) == 2
    for name in own:
        assert math.isfinite(own[name]) and reused[name] == pytest.approx(own[name], rel=1e-9), name
    with pytest.raises(ValueError, match="reference features are of 4 images, this pass has 3"):
        evaluate_adaptive(_OneProcess(), tok, [(torch.arange(3), _images(3, size=64, seed=8))], 3, targets,
                          fid_reference=shared)


def test_reconstruct_pays_no_host_sync_for_input_checks_and_equals_the_checked_path():
    """The evaluation loop's uint8 / 255 images and encode's ids are valid by construction: encode and decode run
    unchecked (no syncing operator in tokenizer/model.py), and give what the checked calls give."""
    from tokenizer.gpu import HostSyncDetector

    tok = _tiny_tokenizer().eval()
    refs = _images(3, size=64, seed=5)
    with HostSyncDetector() as seen:
        ids, recs = rec.reconstruct(tok, refs, [1, 32])
    assert seen.hits and not [h for h in seen.hits if " at model.py:" in h], seen.hits  # the NaN check remains
    checked_ids = tok.encode(refs.float() / 255)
    assert torch.equal(ids, checked_ids)
    for k, r in zip([1, 32], recs):
        assert torch.equal(r, metrics.to_uint8(tok.decode(checked_ids[:, :k]))), k
    with pytest.raises(ValueError, match=r"num_tokens must be within 1..32, got \[1, 33\]"):
        rec.reconstruct(tok, refs, [1, 33])
    with pytest.raises(ValueError, match="refs must be uint8"):
        rec.reconstruct(tok, refs.float() / 255, [1])


def _tf32_switches() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


class _StubInception(torch.nn.Module):
    """Inception's call signature (uint8 [B, 3, H, W] -> (pool features [B, D], ...)), recording the TF32 switches
    it ran under."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(1, 1)
        torch.nn.init.constant_(self.fc.weight, float("nan"))  # as a weight file without fc: no logits
        self.seen = []

    def forward(self, images):
        self.seen.append(_tf32_switches())
        return (images.float().flatten(1)[:, :4],)


def test_metrics_and_inception_features_run_in_ieee_fp32(monkeypatch):
    """The numbers reported as fp32 (PSNR/SSIM/LPIPS, the Inception features of rFID and gFID) are computed with
    TF32 off, whatever the process set (train.py's enable_fast_math turns it on), and the switches come back."""
    from eval.gfid import inception_extractor
    from tokenizer.perceptual import LPIPS

    refs = _images(2, size=32, seed=6)
    lpips_ref = metrics.LPIPSReference(refs, model=LPIPS(random_backbone_for_tests=True))
    seen = []
    lpips_ref.model.net.net.slice1.register_forward_hook(lambda *_: seen.append(_tf32_switches()))
    inception = _StubInception()
    monkeypatch.setattr("tokenizer.inception.load_fid_inception", lambda device: inception)
    before = _tf32_switches()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        rec.image_metrics(refs.flip(-1), refs, lpips_ref)
        rec.add_features(metrics.FeatureSet(16), refs, torch.arange(2), inception)
        inception_extractor("cpu")(refs)
        after = _tf32_switches()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert seen and set(seen) == {(False, False)}, seen
    assert len(inception.seen) == 2 and set(inception.seen) == {(False, False)}, inception.seen
    assert after == (True, True)


def test_position_usage_counts_distinct_codes_per_position():
    ids = torch.tensor([[5, 0, 1], [5, 1, 1], [5, 2, 3], [5, 3, 3]])  # [N=4, K=3], V=8
    usage = rec.position_usage(ids, 8)
    assert usage["values"] == [1 / 8, 4 / 8, 2 / 8]  # one code, four codes, two codes
    assert usage["mean"] == pytest.approx(7 / 24) and (usage["min"], usage["max"]) == (1 / 8, 4 / 8)
    assert usage["bound"] == 4 / 8 and usage["num_images"] == 4 and usage["codebook_size"] == 8
    line = report.usage_line(usage)
    assert "min 0.1250 (position 1)" in line and "max 0.5000 (position 2)" in line and "N/V) = 0.5000" in line
    assert rec.position_usage(ids % 2, 2)["bound"] == 1.0  # more images than codes: the ceiling is the codebook
    with pytest.raises(ValueError, match=r"\[N, K\].*\(4,\)"):
        rec.position_usage(ids[:, 0], 8)
    with pytest.raises(ValueError, match=r"within 0\.\.3, got 0\.\.5"):
        rec.position_usage(ids, 4)


@needs_lpips
def test_report_thumbnail_rows_and_position_usage(tmp_path):
    """V = 1024 (10 bits per token): no thumbnail at k = 2, 1x1 at k = 3, 2x2 at k = 10 and 16; the empty row
    is null / "—" everywhere; the per-position usage in the JSON is recomputed from the saved ids."""
    from tokenizer.quantizer import position_histogram, usage_per_position

    tok = _tiny_tokenizer()
    refs = _images(6, size=64, seed=6)
    loader = [(torch.arange(0, 4), refs[:4]), (torch.arange(4, 6), refs[4:])]
    ks = [2, 3, 10, 16]
    rows, grid, per = rec.evaluate(_OneProcess(), tok, loader, 6, ks, ["thumbnail"], fid=False)
    usage = rec.position_usage(per["ids"], tok.codebook_size)
    meta = {"description": "tiny", "num_images": 6, "source": "test", "num_processes": 1,
            "protocol": rec.PROTOCOL}
    report.write_report(rows, grid, tmp_path, meta, per, usage)
    for name in ("usage_per_position.png", "reconstructions_thumbnail.png", "metrics_vs_tokens.png",
                 "metrics_vs_bits.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "thumbnail@2" not in grid and grid["thumbnail@3"].shape == (6, 3, 64, 64)

    data = json.loads((tmp_path / "metrics.json").read_text())
    thumb = {r["num_tokens"]: r for r in data["rows"] if r["method"] == "thumbnail"}
    assert sorted(thumb) == ks
    for key in ("bits_per_image", "psnr", "ssim", "lpips", "quality"):
        assert thumb[2][key] is None, key  # no thumbnail fits 20 bits: no number at all (strict JSON: null)
    assert [(thumb[k]["quality"], thumb[k]["bits_per_image"]) for k in (3, 10, 16)] == [(1, 24), (2, 96), (2, 96)]
    mean_colour = refs.double().mean(dim=(2, 3)).round().to(torch.uint8)[:, :, None, None].expand_as(refs)
    assert thumb[3]["psnr"] == pytest.approx(metrics.psnr(mean_colour, refs).mean().item())  # 1x1 = mean colour
    assert thumb[10]["psnr"] > thumb[3]["psnr"] and thumb[3]["codebook_usage"] is None

    saved = np.load(tmp_path / "per_image.npz")
    expected = usage_per_position(position_histogram(torch.from_numpy(saved["ids"]), 1024))  # [32]
    got = data["usage_per_position"]
    assert got["values"] == pytest.approx(expected.tolist()) and len(got["values"]) == 32
    assert got["mean"] == pytest.approx(expected.mean().item()) and got["bound"] == 6 / 1024
    assert 0 < got["min"] <= got["max"] <= got["bound"]  # 6 images show at most 6 of the 1024 codes

    md = (tmp_path / "metrics.md").read_text()
    assert "| 2 | thumbnail | 20 | — | — | — | — | — | — | — |" in md
    assert "| 3 | thumbnail | 30 | 24 | — |" in md and "| 10 | thumbnail | 100 | 96 | — |" in md
    assert "not even a 1x1 thumbnail (24 bits) fits the budget at k = 2 (20 bits)" in md
    assert f"mean {got['mean']:.4f}" in md and "Codebook usage per position (all K = 32 tokens, N = 6" in md
    assert "**thumbnail**" in md and "**usage_per_position**" in md and "min(1, N/V)" in md


@needs_lpips
@needs_inception
@pytest.mark.slow
def test_cli_default_codecs_include_thumbnail_and_report_position_usage(tmp_path):
    """The command line end to end (default codecs, rFID on): a thumbnail row without output gets a null rFID
    instead of an FID over zero images, and metrics.json carries the per-position usage of the saved ids."""
    from tokenizer.quantizer import position_histogram, usage_per_position

    tok_dir = _tiny_tokenizer().save_pretrained(tmp_path / "tok")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "eval.reconstruction", "--tokenizer", str(tok_dir),
                           "--max-images", "4", "--num-tokens", "2", "3", "--per-image", "--num-workers", "0",
                           "--cpu", "--out", str(tmp_path / "r")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "r"
    data = json.loads((out / "metrics.json").read_text())
    assert data["meta"]["codecs"] == ["jpeg", "webp", "thumbnail"]
    thumb = {r["num_tokens"]: r for r in data["rows"] if r["method"] == "thumbnail"}
    assert thumb[2]["rfid"] is None and math.isfinite(thumb[3]["rfid"]) and thumb[3]["quality"] == 1
    ids = torch.from_numpy(np.load(out / "per_image.npz")["ids"])  # [4, 32]
    assert data["usage_per_position"]["values"] == pytest.approx(
        usage_per_position(position_histogram(ids, 1024)).tolist())
    for name in ("usage_per_position.png", "reconstructions_thumbnail.png", "reconstructions_jpeg.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| 2 | thumbnail | 20 | — |" in (out / "metrics.md").read_text()


# ---------------------------------------------------------------------------------------------- precision
@pytest.fixture(scope="module")
def trained_tok():
    from _tokenizer_helpers import briefly_trained_tokenizer

    return briefly_trained_tokenizer()


@needs_lpips
@pytest.mark.cpu_bf16_attention
def test_bf16_reconstruction_metrics_close_to_fp32(trained_tok):
    """--precision bf16 (autocast around encoder/decoder) vs fp32 on 12 held-out photo crops: the metrics
    barely move (some ids differ: bf16 encoder outputs near a tie pick the other code), and the decoder alone
    loses almost nothing."""
    from eval.sources import make_source
    from tokenizer.precision import autocast

    loader, total, _ = make_source("photos", trained_tok.image_size, max_images=12, batch_size=12)
    batches = list(loader)
    rows = {p: rec.evaluate(_OneProcess(), trained_tok, batches, total, [4, 32], [], fid=False, precision=p)[0]
            for p in ("fp32", "bf16")}  # fmt: skip
    for a, b in zip(rows["fp32"], rows["bf16"], strict=True):
        assert a.num_tokens == b.num_tokens and a.num_images == b.num_images == 12
        assert abs(a.psnr - b.psnr) < 0.5, (a.num_tokens, a.psnr, b.psnr)  # observed: < 0.05 dB
        assert abs(a.ssim - b.ssim) < 0.02 and abs(a.lpips - b.lpips) < 0.02, (a, b)
    # the same ids decoded in fp32 and in bf16: the images agree to within an LSB or two
    refs = torch.cat([x for _, x in batches])
    ids, (fp32_rec,) = rec.reconstruct(trained_tok, refs, [32], "fp32")
    with autocast("bf16", "cpu"):
        bf16_rec = metrics.to_uint8(trained_tok.decode(ids).float())
    assert metrics.psnr(bf16_rec, fp32_rec).min() > 40
    assert fp32_rec.float().std(dim=(1, 2, 3)).mean() > 10  # image-dependent output, so the bound means something


# ---------------------------------------------------------------------------------------------- 1 vs 2 procs
@needs_lpips
@needs_inception
@pytest.mark.slow
def test_one_and_two_processes_give_the_same_metrics(tmp_path):
    """13 images (odd: padding would duplicate one on 2 ranks): same N, per-image metrics, rFID, usage."""
    tok_dir = _tiny_tokenizer().save_pretrained(tmp_path / "tok")
    args = ["-m", "eval.reconstruction", "--tokenizer", str(tok_dir), "--max-images", "13",
            "--num-tokens", "32", "--codecs", "webp", "--per-image", "--num-workers", "0",
            "--batch-size", "4", "--cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # accelerate 1.x: `--multi_gpu` is what starts N local processes (torchrun); with --cpu they use gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    two = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    r1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    r2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert r1["meta"]["num_processes"] == 1 and r2["meta"]["num_processes"] == 2
    assert r1["meta"]["num_images"] == r2["meta"]["num_images"] == 13
    for a, b in zip(r1["rows"], r2["rows"], strict=True):
        assert (a["method"], a["num_tokens"], a["num_images"]) == (b["method"], b["num_tokens"], 13)
        for key in ("rfid", "lpips", "psnr", "ssim", "bits_per_image", "codebook_usage", "quality"):
            if a[key] is None:
                assert b[key] is None
            else:
                assert abs(a[key] - b[key]) <= 1e-4, (a["method"], a["num_tokens"], key, a[key], b[key])
    p1, p2 = np.load(tmp_path / "one" / "per_image.npz"), np.load(tmp_path / "two" / "per_image.npz")
    assert p1["index"].tolist() == p2["index"].tolist() == list(range(13))
    assert np.array_equal(p1["ids"], p2["ids"])
    np.testing.assert_allclose(p1["metrics"], p2["metrics"], rtol=0, atol=1e-4)
    assert (tmp_path / "two" / "reconstructions.png").is_file()


# ---------------------------------------------------------------------------------------------- sources
def _collect(loader):
    idx, imgs = [], []
    for i, x in loader:
        idx += i.tolist()
        imgs += list(x)
    order = np.argsort(idx)
    return [idx[j] for j in order], [imgs[j] for j in order]


def test_folder_and_webdataset_sources_split_by_index(tmp_path):
    from _data_helpers import make_awkward_tree

    from data.convert_shards import main as convert
    from eval.sources import make_source

    make_awkward_tree(str(tmp_path / "tree"))
    convert(["--src", str(tmp_path / "tree"), "--out", str(tmp_path / "shards"), "--split", "val",
             "--shard-size", "3", "--no-shuffle", "--quiet"])
    loader, total, _ = make_source("folder", 32, root=str(tmp_path / "tree"), batch_size=4)
    idx, imgs = _collect(loader)
    assert total == 10 and len(idx) == 9  # the truncated JPEG is skipped, the others are evaluated once
    assert all(x.dtype == torch.uint8 and x.shape == (3, 32, 32) for x in imgs)
    parts = [_collect(make_source("folder", 32, root=str(tmp_path / "tree"), rank=r, world_size=2,
                                  batch_size=2)[0]) for r in (0, 1)]
    assert sorted(parts[0][0] + parts[1][0]) == idx and not set(parts[0][0]) & set(parts[1][0])
    assert all(i % 2 == r for r in (0, 1) for i in parts[r][0])
    shards = json.loads((tmp_path / "shards" / "val-meta.json").read_text())["pattern"]
    w_idx, w_imgs = [], []
    for r in (0, 1):
        i, x = _collect(make_source("webdataset", 32, shards=shards, rank=r, world_size=2, batch_size=2)[0])
        w_idx += i
        w_imgs += x
    assert sorted(w_idx) == list(range(9))  # the converter dropped the corrupt file
    assert sorted(x.sum().item() for x in w_imgs) == sorted(x.sum().item() for x in imgs)
    loader, total, _ = make_source("photos", 64, max_images=5)
    idx, imgs = _collect(loader)
    assert total == 5 and idx == list(range(5)) and imgs[0].dtype == torch.uint8


# ---------------------------------------------------------------------------------------------- benchmark
@pytest.mark.cpu_bf16_attention
def test_bench_eval_runs_on_cpu_and_ends_with_json():
    """scripts/bench_eval.py at tiny settings in a subprocess: the last line is the JSON the GPU check parses."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "scripts/bench_eval.py", "--preset", "tiny", "--batch-size", "2",
                           "--num-tokens", "4", "16", "--repeats", "1", "--no-fid", "--precision", "bf16",
                           "--threads", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bench"] == "eval" and out["device"] == "cpu" and out["precision"] == "bf16"
    assert out["lpips_backbone"] == ("real" if have_lpips() else "random")
    assert out["fid"] is None and out["fid_backbone"] is None and out["peak_mem_gb"] is None
    assert [r["k"] for r in out["rows"]] == [4, 16]
    rates = [out["encode"]["images_per_s"], out["metrics"]["psnr_ssim_lpips_images_per_s"],
             out["eval_step"]["images_per_s"], *(r["encode_decode_images_per_s"] for r in out["rows"])]
    assert all(isinstance(x, float) and x > 0 for x in rates), out
