"""Adaptive token counts: the batched bisection equals a brute-force scan on real photographs, decode with
per-image lengths equals decoding each prefix alone, and bad targets are refused."""

from __future__ import annotations

import pytest
import torch
from _small_training import SMALL, data, trainer

from data.photos import PhotosDataModule
from tokenizer import OneDTokenizer
from tokenizer.metrics import psnr, to_uint8
from tokenizer.perceptual import LPIPS
from tokenizer.training import TokenizerModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(one_thread):
    """A small tail-drop tokenizer trained briefly on the embedded photographs (quality rises with k)."""
    torch.manual_seed(0)
    module = TokenizerModule(preset="tiny", overrides={**SMALL, "codebook_size": 256, "max_tokens": 8},
                             lr=2e-3, warmup_steps=10)
    trainer(150, "32-true").fit(module, datamodule=data(batch_size=16))
    return module.tokenizer.eval()


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
    k_max = ok.shape[1]
    first = torch.where(ok.any(1), ok.float().argmax(1) + 1, torch.full((ok.shape[0],), float(k_max))).long()
    return first, (ok.int().diff(dim=1) >= 0).all(1)


def test_adaptive_psnr_equals_brute_force_on_real_photographs(trained, photos):
    curves = quality_curves(trained, photos, lambda rec, ref: psnr(to_uint8(rec), to_uint8(ref)))  # [B, K]
    assert (curves[:, -1] > curves[:, 0]).float().mean() > 0.8, "the fixture tokenizer must use its tokens"
    full = trained.encode(photos)
    chosen = set()
    for q in (0.3, 0.5, 0.7):  # targets across the range of qualities, between measured values
        target = float(curves.flatten().quantile(q)) + 1e-3
        ids, lengths = trained.encode_adaptive(photos, min_psnr=target)
        expected, monotone = brute_force(curves >= target)
        assert monotone.float().mean() >= 0.5, "too few monotone curves for the comparison to mean much"
        assert torch.equal(lengths[monotone], expected[monotone]), (q, lengths, expected)
        chosen |= set(lengths.tolist())
        # every image, monotone or not: the chosen k meets the target (or is K) and k - 1 does not
        for b, k in enumerate(lengths.tolist()):
            assert torch.equal(ids[b, :k], full[b, :k]) and not ids[b, k:].any()
            assert k == trained.max_tokens or curves[b, k - 1] >= target
            assert k == 1 or curves[b, k - 2] < target
    assert len(chosen) >= 4, f"the targets should pick a spread of lengths, got {sorted(chosen)}"


def test_adaptive_lpips_target_and_token_bounds(trained, photos):
    torch.manual_seed(0)
    net = LPIPS(random_backbone_for_tests=True)  # the search, not the metric, is under test

    def lpips_of(rec, ref):
        return net(to_uint8(rec).float() / 127.5 - 1, to_uint8(ref).float() / 127.5 - 1)

    with torch.no_grad():
        curves = quality_curves(trained, photos, lpips_of)  # [B, K]
        target = float(curves.flatten().quantile(0.5)) + 1e-4
        _, lengths = trained.encode_adaptive(photos, max_lpips=target, lpips_model=net)
    expected, monotone = brute_force(curves <= target)
    assert monotone.any() and torch.equal(lengths[monotone], expected[monotone])

    _, bounded = trained.encode_adaptive(photos, min_psnr=99.0, min_tokens=2, max_tokens=5)  # unreachable
    assert bounded.tolist() == [5] * len(photos)
    ids, easy = trained.encode_adaptive(photos, min_psnr=1.0, min_tokens=3)  # met by any prefix
    assert easy.tolist() == [3] * len(photos) and ids.shape == (len(photos), trained.max_tokens)


def test_decode_with_lengths_equals_each_prefix_alone(trained, photos):
    ids = trained.encode(photos[:6])
    lengths = torch.tensor([1, 8, 3, 5, 2, 8])
    together = trained.decode(ids, lengths=lengths)
    for b, k in enumerate(lengths.tolist()):
        torch.testing.assert_close(together[b : b + 1], trained.decode(ids[b : b + 1, :k]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one quality target"),
    (dict(min_psnr=30.0, max_lpips=0.1), "exactly one quality target"),
    (dict(min_psnr=-3.0), r"min_psnr must be in \(0, 100\]"),
    (dict(max_lpips=1.5), r"max_lpips must be in \(0, 1\]"),
    (dict(min_psnr=30.0, min_tokens=0), "min_tokens must be an int in 1..8"),
    (dict(min_psnr=30.0, max_tokens=9), "max_tokens must be an int in 1..8"),
    (dict(min_psnr=30.0, min_tokens=5, max_tokens=4), "min_tokens 5 > max_tokens 4"),
])  # fmt: skip
def test_bad_targets_are_refused(trained, photos, kwargs, match):
    with pytest.raises(ValueError, match=match):
        trained.encode_adaptive(photos[:2], **kwargs)


def test_decode_refuses_bad_lengths(trained, photos):
    ids = trained.encode(photos[:2], 4)
    with pytest.raises(ValueError, match=r"lengths must be in 1..4 .* got range \[0, 5\]"):
        trained.decode(ids, lengths=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        trained.decode(ids, lengths=torch.tensor([1.0, 2.0]))
