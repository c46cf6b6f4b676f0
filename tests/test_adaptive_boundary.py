"""Adaptive targets at exact equality (issue 22): a reconstruction whose quality *equals* the target meets it
(PSNR >= t, LPIPS <= t), in the search (tokenizer/adaptive.py) and in the report's summary
(eval/adaptive_eval.py). Every other adaptive test keeps its targets between measured values, where `>` and `>=`
agree; here the target is set to a value the code itself computes, so the comparison is decided by equality."""

from __future__ import annotations

import pytest
import torch
from _small_training import SMALL

from data.photos import PhotosDataModule
from eval.adaptive_eval import ADAPTIVE_FIELDS, Target, guarantee_k, matched_k, summarize
from eval.recon_eval import PER_IMAGE_FIELDS, Row
from tokenizer import OneDTokenizer
from tokenizer.metrics import psnr, to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(one_thread) -> OneDTokenizer:
    """The tests' small tokenizer, random (the boundary does not need a good one): K = 8."""
    torch.manual_seed(0)
    return OneDTokenizer.from_preset("tiny", **SMALL).eval()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return PhotosDataModule(image_size=32, val_crops_per_scale=1).val_batch(max_images=2)  # [2, 3, 32, 32]


def l1_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A perceptual distance stand-in for the LPIPS search ([-1, 1] images -> [B] in [0, 1]): the comparison under
    test does not depend on which distance it compares, and this one needs no weight files."""
    return (x - y).abs().flatten(1).mean(1) / 2


def prefix_quality(tok: OneDTokenizer, image: torch.Tensor, k: int, metric: str) -> float:
    """The quality encode_adaptive measures for `image` [1, 3, S, S] decoded from its first k of k + 1 tokens,
    computed the way it computes it (same ids, same decode call, same metric and dtype), as a Python float."""
    ids = tok.encode(image, k + 1)
    rec = to_uint8(tok.decode(ids, lengths=torch.tensor([k])))
    ref = to_uint8(image)
    if metric == "psnr":
        return float(psnr(rec, ref)[0])  # float64: exact as a Python float
    return float(l1_distance(rec.float() / 127.5 - 1, ref.float() / 127.5 - 1)[0])  # float32: exact as well


@pytest.mark.parametrize("metric", ["psnr", "lpips"])
def test_search_picks_the_k_whose_quality_equals_the_target(tok, photos, metric):
    """Searching k in {k, k + 1} with the target set to exactly the quality at k: k meets it, so k is chosen
    (with `>` / `<` the search would move on to k + 1). One image per call, so every decode is the same
    computation as in prefix_quality and the quality is bit-for-bit the one compared."""
    for b in range(len(photos)):
        image = photos[b : b + 1]
        for k in range(1, tok.max_tokens):
            target = prefix_quality(tok, image, k, metric)
            kwargs = {"min_psnr": target} if metric == "psnr" else {"max_lpips": target, "lpips_model": l1_distance}
            _, lengths = tok.encode_adaptive(image, min_tokens=k, max_tokens=k + 1, **kwargs)
            assert lengths.tolist() == [k], (f"image {b}: {metric} at k = {k} equals the target {target!r} exactly, "
                                             f"so k = {k} meets it; the search chose {lengths.tolist()}")  # fmt: skip


def test_target_met_at_equality():
    values = torch.tensor([19.5, 20.0, 20.5], dtype=torch.float64)
    assert Target("psnr", 20.0).met(values).tolist() == [False, True, True]
    assert Target("lpips", 20.0).met(values).tolist() == [True, True, False]


def _row(k: int, psnr_db: float, lpips: float) -> Row:
    return Row(method="tokenizer", num_tokens=k, target_bits=6.0 * k, bits_per_image=6.0 * k, rfid=None,
               lpips=lpips, psnr=psnr_db, ssim=0.5, codebook_usage=None, quality=None, num_images=4)  # fmt: skip


def test_summary_counts_images_exactly_at_the_target_as_met():
    """Four images, K = 8, a PSNR and an LPIPS target: image 0 (k = 2) and image 1 (k = K) score exactly the
    target, image 2 misses it at k = K, image 3 beats it. Met: 3 of 4; unmet at K: only image 2."""
    targets = [Target("psnr", 20.0), Target("lpips", 0.25)]
    lengths = torch.tensor([[2, 3], [8, 8], [8, 8], [4, 1]])
    metrics = torch.zeros(4, 2, len(ADAPTIVE_FIELDS), dtype=torch.float64)
    metrics[:, 0, ADAPTIVE_FIELDS.index("psnr")] = torch.tensor([20.0, 20.0, 19.5, 25.0])
    metrics[:, 1, ADAPTIVE_FIELDS.index("lpips")] = torch.tensor([0.25, 0.25, 0.3, 0.1])
    per_image = {"lengths": lengths.numpy(), "metrics": metrics.numpy()}
    rows = [_row(k, p, lp) for k, p, lp in ((1, 15.0, 0.5), (2, 18.0, 0.4), (4, 21.0, 0.3), (8, 24.0, 0.2))]
    summary = summarize(per_image, {}, targets, rows, k_max=8, codebook_size=64)
    for r in summary:
        assert (r["fraction_met"], r["unmet_at_k_max"]) == (0.75, 1), (r["label"], r)


def test_matched_k_at_an_evaluated_point_is_that_k():
    """A mean quality equal to an evaluated k's is matched to that k, the last one included (which a strict
    comparison skips past: "better than every evaluated k")."""
    psnr_curve = [(1, 15.0), (2, 18.0), (4, 21.0), (8, 24.0)]
    lpips_curve = [(1, 0.5), (2, 0.4), (4, 0.3), (8, 0.2)]
    for (k, psnr_db), (_, lpips) in zip(psnr_curve, lpips_curve, strict=True):
        assert matched_k(psnr_curve, psnr_db) == (float(k), None)
        assert matched_k(lpips_curve, lpips, higher_is_better=False) == (float(k), None)


def test_guarantee_k_counts_images_exactly_at_the_target():
    """The fixed k at which 3 of 4 images meet PSNR >= 20 when two of them score exactly 20 dB there: k = 4."""
    names = ["tokenizer@2", "tokenizer@4", "tokenizer@8"]
    metrics = torch.zeros(4, 3, len(PER_IMAGE_FIELDS), dtype=torch.float64)  # the fixed-k pass's [N, settings, F]
    psnr_db = [[20.0, 20.0, 30.0], [19.0, 20.0, 30.0], [19.0, 20.5, 30.0], [19.0, 19.0, 30.0]]  # image x (k = 2, 4, 8)
    metrics[:, :, PER_IMAGE_FIELDS.index("psnr")] = torch.tensor(psnr_db)
    fixed = {"settings": names, "fields": list(PER_IMAGE_FIELDS), "metrics": metrics.numpy()}
    assert guarantee_k(fixed, Target("psnr", 20.0), 0.75) == 4
    assert guarantee_k(fixed, Target("psnr", 20.0), 0.25) == 2
