"""Adaptive token counts: the batched bisection equals a brute-force scan on real photographs, decode with
per-image lengths equals decoding each prefix alone, and bad targets are refused. The tokenizer is built by hand
so that quality rises with k on every machine (tests/_dct_tokenizer.py), not trained."""

from __future__ import annotations

import pytest
import torch
from _dct_tokenizer import dct_tokenizer, smallest_k_meeting

from data.photos import PhotosDataModule
from tokenizer import OneDTokenizer
from tokenizer.metrics import psnr, to_uint8
from tokenizer.perceptual import LPIPS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    """A 32 px, K = 8 tokenizer whose PSNR never falls as k grows (tests/_dct_tokenizer.py)."""
    return dct_tokenizer()


@pytest.fixture(scope="module")
def photos():
    return PhotosDataModule(image_size=32, val_crops_per_scale=4).val_batch()  # held-out photographs


def quality_curves(tok: OneDTokenizer, images: torch.Tensor, quality) -> torch.Tensor:
    """quality(rec, ref) -> [B] of every prefix k = 1..K, decoded on its own: [B, K]."""
    ids = tok.encode(images)
    return torch.stack([quality(tok.decode(ids[:, :k]), images) for k in range(1, tok.max_tokens + 1)], 1)


def brute_force(ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ok [B, K] (target met at k = 1..K) -> the smallest k that meets it (K if none), and whether `ok` is
    monotone in k (once met, stays met), where bisection and a scan must agree."""
    return smallest_k_meeting(ok), (ok.int().diff(dim=1) >= 0).all(1)


def test_the_hand_built_tokenizer_improves_with_k(tok, photos, tmp_path):
    """What the adaptive tests rely on, checked rather than assumed: on every held-out photograph PSNR never
    falls as k grows (beyond uint8 rounding), it rises on most, and the saved model is the same function."""
    curves = quality_curves(tok, photos, lambda rec, ref: psnr(to_uint8(rec), to_uint8(ref)))  # [B, K]
    assert curves.diff(dim=1).min() > -0.05, curves  # clamping and uint8 rounding only
    assert (curves[:, -1] > curves[:, 0] + 0.5).float().mean() > 0.8, curves
    assert torch.all(curves.mean(0).diff() > 0), curves.mean(0)
    again = OneDTokenizer.from_pretrained(tok.save_pretrained(tmp_path / "dct"))
    assert torch.equal(again.encode(photos), tok.encode(photos))


def test_adaptive_psnr_equals_brute_force_on_real_photographs(tok, photos):
    curves = quality_curves(tok, photos, lambda rec, ref: psnr(to_uint8(rec), to_uint8(ref)))  # [B, K]
    assert (curves[:, -1] > curves[:, 0]).float().mean() > 0.8, "the fixture tokenizer must use its tokens"
    full = tok.encode(photos)
    chosen = set()
    for q in (0.3, 0.5, 0.7):  # targets across the range of qualities, between measured values
        target = float(curves.flatten().quantile(q)) + 1e-3
        ids, lengths = tok.encode_adaptive(photos, min_psnr=target)
        expected, monotone = brute_force(curves >= target)
        assert monotone.float().mean() >= 0.5, "too few monotone curves for the comparison to mean much"
        assert torch.equal(lengths[monotone], expected[monotone]), (q, lengths, expected)
        chosen |= set(lengths.tolist())
        # every image, monotone or not: the chosen k meets the target (or is K) and k - 1 does not
        for b, k in enumerate(lengths.tolist()):
            assert torch.equal(ids[b, :k], full[b, :k]) and not ids[b, k:].any()
            assert k == tok.max_tokens or curves[b, k - 1] >= target
            assert k == 1 or curves[b, k - 2] < target
    assert len(chosen) >= 4, f"the targets should pick a spread of lengths, got {sorted(chosen)}"


def test_adaptive_lpips_target_and_token_bounds(tok, photos):
    torch.manual_seed(0)
    net = LPIPS(random_backbone_for_tests=True)  # the search, not the metric, is under test

    def lpips_of(rec, ref):
        return net(to_uint8(rec).float() / 127.5 - 1, to_uint8(ref).float() / 127.5 - 1)

    with torch.no_grad():
        curves = quality_curves(tok, photos, lpips_of)  # [B, K]
        target = float(curves.flatten().quantile(0.5)) + 1e-4
        _, lengths = tok.encode_adaptive(photos, max_lpips=target, lpips_model=net)
    expected, monotone = brute_force(curves <= target)
    assert monotone.any() and torch.equal(lengths[monotone], expected[monotone])

    _, bounded = tok.encode_adaptive(photos, min_psnr=99.0, min_tokens=2, max_tokens=5)  # unreachable
    assert bounded.tolist() == [5] * len(photos)
    ids, easy = tok.encode_adaptive(photos, min_psnr=1.0, min_tokens=3)  # met by any prefix
    assert easy.tolist() == [3] * len(photos) and ids.shape == (len(photos), tok.max_tokens)


def test_decode_with_lengths_equals_each_prefix_alone(tok, photos):
    ids = tok.encode(photos[:6])
    lengths = torch.tensor([1, 8, 3, 5, 2, 8])
    together = tok.decode(ids, lengths=lengths)
    for b, k in enumerate(lengths.tolist()):
        torch.testing.assert_close(together[b : b + 1], tok.decode(ids[b : b + 1, :k]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one quality target"),
    (dict(min_psnr=30.0, max_lpips=0.1), "exactly one quality target"),
    (dict(min_psnr=-3.0), r"min_psnr must be in \(0, 100\]"),
    (dict(max_lpips=1.5), r"max_lpips must be in \(0, 1\]"),
    (dict(min_psnr=30.0, min_tokens=0), "min_tokens must be an int in 1..8"),
    (dict(min_psnr=30.0, max_tokens=9), "max_tokens must be an int in 1..8"),
    (dict(min_psnr=30.0, min_tokens=5, max_tokens=4), "min_tokens 5 > max_tokens 4"),
])  # fmt: skip
def test_bad_targets_are_refused(tok, photos, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tok.encode_adaptive(photos[:2], **kwargs)


def test_decode_refuses_bad_lengths(tok, photos):
    ids = tok.encode(photos[:2], 4)
    with pytest.raises(ValueError, match=r"lengths must be in 1..4 .* got range \[0, 5\]"):
        tok.decode(ids, lengths=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        tok.decode(ids, lengths=torch.tensor([1.0, 2.0]))
