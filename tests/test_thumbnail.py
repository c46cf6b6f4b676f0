"""eval.codecs thumbnail baseline: the side a budget pays for, exact on what it can represent, bits never over."""

from __future__ import annotations

import math

import pytest
import torch

from eval import codecs


def _smooth(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, size, size]: per-image colour plus a diagonal gradient and a slow wave (low frequencies)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, size)
    ramp = 60 * (t[:, None] + t[None, :]) + 30 * torch.sin(2 * math.pi * t)[None, :]  # [size, size]
    base = torch.rand(n, 3, 1, 1, generator=g) * 100 + 20
    return (base + ramp).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize(("bits", "side"), [
    (0, 0), (20, 0), (23.99, 0), (24, 1), (30, 1), (95.9, 1), (96, 2), (100, 2), (160, 2), (215.9, 2),
    (216, 3), (320, 3), (384, 4),
])  # fmt: skip
def test_side_is_the_largest_that_fits(bits, side):
    assert codecs.thumbnail_side(bits) == side
    assert side * side * 24 <= bits < (side + 1) ** 2 * 24


def test_side_per_token_count_at_ten_bits_per_token():
    """V = 1024: k = 2 (20 bits) has no thumbnail, k = 3 (30) a 1x1, k = 10 (100 >= 96) and k = 16 (160) 2x2."""
    bits_per_token = math.log2(1024)
    assert {k: codecs.thumbnail_side(k * bits_per_token) for k in (1, 2, 3, 10, 16, 32)} == {
        1: 0, 2: 0, 3: 1, 10: 2, 16: 2, 32: 3}
    # a codebook size that is not a power of two: 3 * log2(1000) = 29.9 bits still pays for one pixel
    assert codecs.thumbnail_side(3 * math.log2(1000)) == 1 and codecs.thumbnail_side(2 * math.log2(1000)) == 0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="target_bits"):
            codecs.thumbnail_side(bad)


@pytest.mark.parametrize("side", [1, 2, 3, 7, 64])
def test_constant_image_is_reproduced_exactly(side):
    colours = torch.tensor([[0, 128, 255], [17, 200, 3]], dtype=torch.uint8)  # [2, 3]: extremes included
    images = colours[:, :, None, None].expand(2, 3, 64, 64).contiguous()
    assert torch.equal(codecs.thumbnail(images, side), images)


def test_one_pixel_thumbnail_is_the_mean_colour():
    images = torch.randint(0, 256, (5, 3, 64, 48), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    mean = images.double().mean(dim=(2, 3)).round().to(torch.uint8)  # [5, 3]
    assert torch.equal(codecs.thumbnail_encode(images, 1), mean[:, :, None, None])
    assert torch.equal(codecs.thumbnail(images, 1), mean[:, :, None, None].expand(5, 3, 64, 48))


def test_stored_thumbnail_holds_block_means_when_the_side_divides_the_size():
    images = _smooth(3)
    for side in (2, 4, 8):
        block = 64 // side
        means = images.double().view(3, 3, side, block, side, block).mean(dim=(3, 5))  # [3, 3, s, s]
        stored = codecs.thumbnail_encode(images, side)
        assert stored.dtype == torch.uint8 and stored.shape == (3, 3, side, side)
        assert stored.numel() * 8 == 3 * side * side * 24  # 8 bits per stored value
        assert torch.equal(stored, means.round().to(torch.uint8))


def test_larger_thumbnails_reconstruct_a_smooth_image_better():
    images = _smooth(4, seed=2)
    mse = [(codecs.thumbnail(images, s).double() - images.double()).pow(2).mean().item() for s in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(mse, mse[1:])), mse
    assert mse[-1] < 4  # a 16x16 thumbnail of a low-frequency image: within ~2 levels


def test_batch_and_compress_batch_contract():
    images = _smooth(3, seed=3)
    recon, bits, side = codecs.thumbnail_batch(images, 20.0)  # under 24 bits: nothing to show
    assert recon is None and side == 0 and bits.tolist() == [0, 0, 0]
    out = codecs.compress_batch(images, "thumbnail", [20.0, 30.0, 160.0, 1e9])
    assert out[20.0][0] is None and out[20.0][2].tolist() == [0, 0, 0]
    for target, s in ((30.0, 1), (160.0, 2), (1e9, 64)):  # a budget beyond the image: the image itself
        recon, bits, quality = out[target]
        assert recon.dtype == torch.uint8 and recon.shape == images.shape
        assert quality.tolist() == [s] * 3 and bits.tolist() == [s * s * 24] * 3 and bits.max() <= target
        assert torch.equal(recon, codecs.thumbnail(images, s))
    assert torch.equal(out[1e9][0], images)


def test_bad_inputs_name_the_problem():
    images = _smooth(1)
    with pytest.raises(ValueError, match="uint8"):
        codecs.thumbnail(images.float(), 2)
    with pytest.raises(ValueError, match="side must be within 1..64.*got 0"):
        codecs.thumbnail_encode(images, 0)
    with pytest.raises(ValueError, match="unknown codec 'png'"):
        codecs.compress_batch(images, "png", [100.0])
