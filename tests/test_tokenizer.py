"""The tokenizer model and its public API: quantizers, length mechanisms, prefixes, persistence, bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenizer import OneDTokenizer, TokenizerConfig
from tokenizer.config import preset_config
from tokenizer.decoder import unpatchify
from tokenizer.encoder import causal_latent_mask
from tokenizer.gpu import no_host_sync
from tokenizer.length import draw_keep_lengths, keep_mask, powers_of_two_upto
from tokenizer.stem import dct_basis

QUANTIZERS = {
    "vq": dict(quantizer="vq", codebook_size=64, token_dim=8),
    "lfq": dict(quantizer="lfq", codebook_size=64),
    "fsq": dict(quantizer="fsq", fsq_levels=[5, 4, 3]),
}
MECHANISMS = ["tail_token_drop", "nested_dropout", "fixed"]


def small(**overrides) -> OneDTokenizer:
    """A 32 px, 8-token model: big enough to exercise every code path, small enough for CPU tests."""
    base = dict(image_size=32, patch_size=8, max_tokens=8, enc_width=32, enc_depth=1, enc_heads=2,
                dec_width=32, dec_depth=1, dec_heads=2)
    return OneDTokenizer.from_preset("tiny", **{**base, **overrides})


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 3, 32, 32)


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_forward_backward_every_quantizer_and_mechanism(quantizer, mechanism, images):
    torch.manual_seed(0)
    model = small(**QUANTIZERS[quantizer], length_mechanism=mechanism).train()
    out = model(images)
    assert out.recon.shape == images.shape
    assert out.ids.dtype == torch.int64 and out.ids.shape == (3, 8)
    assert out.ids.min() >= 0 and out.ids.max() < model.codebook_size
    assert out.lengths.shape == (3,) and out.lengths.min() >= 1 and out.lengths.max() <= 8
    loss = (out.recon - (images * 2 - 1)).pow(2).mean() + out.aux_loss
    loss.backward()
    for name in ("encoder.patch_embed.weight", "encoder.latent_tokens", "decoder.token_in.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"
    assert 0 < out.stats.usage <= 1 and out.stats.perplexity >= 1


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_prefix_encode_and_decode_at_every_k(quantizer, mechanism, images):
    torch.manual_seed(0)
    model = small(**QUANTIZERS[quantizer], length_mechanism=mechanism, causal_latents=mechanism != "fixed")
    model.eval()
    full = model.encode(images)
    assert full.shape == (3, model.max_tokens) and full.dtype == torch.int64
    for k in range(1, model.max_tokens + 1):
        ids = model.encode(images, num_tokens=k)
        assert torch.equal(ids, full[:, :k])
        recon = model.decode(ids)
        assert recon.shape == images.shape and recon.dtype == torch.float32
        assert recon.min() >= 0 and recon.max() <= 1
        # inference on a k-prefix computes the same function the training path applies at keep length k
        train_path = model(images, lengths=torch.full((3,), k))
        assert torch.allclose(recon, ((train_path.recon + 1) / 2).clamp(0, 1), atol=1e-5)


def test_tail_token_drop_hides_dropped_tokens_from_decoder(images):
    model = small(length_mechanism="tail_token_drop").eval()
    ids = model.encode(images)
    other = ids.clone()
    other[:, 4:] = (ids[:, 4:] + 1) % model.codebook_size  # change only tokens past k=4
    codes = model.quantizer.codes_from_ids
    a = model.decoder(codes(ids), lengths=torch.full((3,), 4))
    b = model.decoder(codes(other), lengths=torch.full((3,), 4))
    assert torch.allclose(a, b, atol=1e-6)


def test_causal_latents_make_early_tokens_independent_of_later_ones(images):
    torch.manual_seed(0)
    model = small(causal_latents=True).eval()
    z = model.encoder(images)
    with torch.no_grad():
        model.encoder.latent_tokens[:, 5:] += 1.0  # perturb latents 5..7
    z2 = model.encoder(images)
    assert torch.allclose(z[:, :5], z2[:, :5], atol=1e-6)
    assert not torch.allclose(z[:, 5:], z2[:, 5:])
    mask = causal_latent_mask(2, 3, "cpu")
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_length_sampling():
    random.seed(0)
    torch.manual_seed(0)
    cfg = TokenizerConfig(max_tokens=16, length_mechanism="tail_token_drop")
    draws = [draw_keep_lengths(cfg, 8, "cpu") for _ in range(400)]
    assert all(d.lengths is None for d in draws), "tail token drop: one k per batch, the decoder gets k tokens"
    ks = torch.tensor([d.num_tokens for d in draws], dtype=torch.float)
    assert ks.min() == 1 and ks.max() == 16 and abs(ks.mean() - 8.5) < 0.6
    cfg.per_sample_length = True
    per_sample = draw_keep_lengths(cfg, 256, "cpu")
    assert per_sample.num_tokens == 16 and len(per_sample.lengths.unique()) > 8
    nested = TokenizerConfig(max_tokens=12, length_mechanism="nested_dropout", length_sampling="pow2")
    values = set(draw_keep_lengths(nested, 2000, "cpu").lengths.tolist())
    assert values == {1, 2, 4, 8, 12} == set(powers_of_two_upto(12))
    uniform = draw_keep_lengths(TokenizerConfig(max_tokens=12, length_mechanism="nested_dropout"), 2000, "cpu")
    assert set(uniform.lengths.tolist()) == set(range(1, 13))
    fixed = TokenizerConfig(max_tokens=12, length_mechanism="fixed")
    assert draw_keep_lengths(fixed, 5, "cpu") == (12, None)
    # pow2 and log_uniform for tail drop too (one k per batch: a host integer; per sample: on the device)
    pow2_batch = TokenizerConfig(max_tokens=12, length_sampling="pow2")
    assert {draw_keep_lengths(pow2_batch, 4, "cpu").num_tokens for _ in range(300)} == {1, 2, 4, 8, 12}
    assert keep_mask(torch.tensor([1, 3]), 4).tolist() == [[True, False, False, False], [True, True, True, False]]


@pytest.mark.parametrize("per_sample", [False, True])
def test_log_uniform_length_sampling_gives_each_doubling_of_k_the_same_share(per_sample):
    """P(k) = log(1 + 1/k) / log(K + 1): every k in 1..K occurs, and each doubling of k ([1, 2), [2, 4), ...)
    gets the same share, so short prefixes are trained as often as long ones."""
    import math

    random.seed(0)
    torch.manual_seed(0)
    k_max, n = 63, 40000
    mechanism = "nested_dropout" if per_sample else "tail_token_drop"
    cfg = TokenizerConfig(max_tokens=k_max, length_mechanism=mechanism, length_sampling="log_uniform")
    if per_sample:
        ks = draw_keep_lengths(cfg, n, "cpu").lengths
    else:
        ks = torch.tensor([draw_keep_lengths(cfg, 8, "cpu").num_tokens for _ in range(n)])
    assert set(ks.tolist()) == set(range(1, k_max + 1))
    for k in (1, 2, 10, 63):
        expected = math.log1p(1 / k) / math.log(k_max + 1)
        assert abs((ks == k).float().mean().item() - expected) < 4 * math.sqrt(expected / n) + 1e-3, f"k={k}"
    shares = [((ks >= 2**i) & (ks < 2 ** (i + 1))).float().mean().item() for i in range(6)]  # 6 doublings
    assert max(shares) - min(shares) < 0.02, shares


def test_presets_and_attributes():
    tiny = OneDTokenizer.from_preset("tiny")
    assert (tiny.max_tokens, tiny.codebook_size, tiny.image_size) == (16, 1024, 64)
    for name, width, depth in (("S", 512, 8), ("B", 768, 12), ("L", 1024, 24)):
        cfg = preset_config(name)
        assert (cfg.enc_width, cfg.enc_depth, cfg.patch_size, cfg.image_size) == (width, depth, 16, 256)
        assert (cfg.codebook_size, cfg.token_dim) == (4096, 12)
    with pytest.raises(ValueError, match="unknown preset"):
        OneDTokenizer.from_preset("huge")
    with pytest.raises(ValueError, match="unknown TokenizerConfig fields"):
        OneDTokenizer.from_preset("tiny", widht=3)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        OneDTokenizer.from_preset("tiny", quantizer="rvq")


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_save_load_round_trip(tmp_path, quantizer, images):
    torch.manual_seed(0)
    model = small(**QUANTIZERS[quantizer], length_mechanism="nested_dropout").train()
    for _ in range(2):  # move the VQ codebook off its init so buffers matter
        model(images)
    model.eval()
    model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = OneDTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == model.config
    ids = model.encode(images)
    assert torch.equal(loaded.encode(images), ids)
    assert torch.equal(loaded.decode(ids[:, :3]), model.decode(ids[:, :3]))


def test_strict_load_rejects_mismatched_files(tmp_path):
    model = small()
    directory = model.save_pretrained(tmp_path / "tok")
    weights = directory / "model.safetensors"
    state = load_file(str(weights))

    missing = dict(state)
    missing.pop("decoder.to_pixels.weight")
    save_file(missing, str(weights))
    with pytest.raises(ValueError, match="missing keys.*decoder.to_pixels.weight"):
        OneDTokenizer.from_pretrained(directory)

    save_file({**state, "decoder.extra": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match="unexpected keys.*decoder.extra"):
        OneDTokenizer.from_pretrained(directory)

    save_file(state, str(weights))
    config = json.loads((directory / "config.json").read_text())
    config["config"]["dec_width"] = 64
    config["config"]["dec_heads"] = 2
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape mismatches"):
        OneDTokenizer.from_pretrained(directory)

    with pytest.raises(FileNotFoundError, match="config.json"):
        OneDTokenizer.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.rand(2, 3, 32), ValueError, r"shape \[B, 3, H, W\]"),
        (torch.rand(2, 1, 32, 32), ValueError, "3 channels"),
        (torch.rand(2, 3, 48, 48), ValueError, "32x32"),
        (torch.rand(2, 3, 32, 32) * 2, ValueError, r"in \[0, 1\]"),
        (torch.rand(2, 3, 32, 32) - 0.5, ValueError, r"in \[0, 1\]"),
        (torch.full((2, 3, 32, 32), float("nan")), ValueError, "finite"),
        ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), TypeError, "float tensor"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_encode_rejects_bad_images(bad, error, message):
    with pytest.raises(error, match=message):
        small().encode(bad)


def test_bad_num_tokens_and_ids(images):
    model = small()
    for k in (0, 9, -1):
        with pytest.raises(ValueError, match=r"num_tokens must be in 1..8"):
            model.encode(images, num_tokens=k)
    with pytest.raises(TypeError, match="num_tokens must be an int"):
        model.encode(images, num_tokens=2.0)
    ids = model.encode(images)
    with pytest.raises(TypeError, match="integer tensor"):
        model.decode(ids.float())
    with pytest.raises(ValueError, match=rf"ids must be in \[0, {model.codebook_size}\)"):
        model.decode(ids + model.codebook_size)  # every id out of range, whatever the encoder picked
    with pytest.raises(ValueError, match=rf"ids must be in \[0, {model.codebook_size}\)"):
        model.decode(ids - model.codebook_size)
    with pytest.raises(ValueError, match="1..8 tokens"):
        model.decode(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="1..8 tokens"):
        model.decode(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[B, k\]"):
        model.decode(ids[0])


@pytest.mark.parametrize("quantizer", list(QUANTIZERS))
def test_unchecked_encode_and_decode_read_nothing_from_the_device_and_equal_the_checked_path(quantizer, images):
    """check_inputs=False (the evaluation and extraction loops, whose inputs are valid by construction) skips the
    value checks, each a host sync on a GPU: no syncing operator runs, and the results are the checked path's."""
    model = small(**QUANTIZERS[quantizer])
    lengths = torch.tensor([1, 5, 8])  # [B]
    ids = model.encode(images)
    checked = model.decode(ids, lengths=lengths)
    with no_host_sync("cpu", detector=True):
        fast_ids = model.encode(images, check_inputs=False)
        fast = model.decode(fast_ids, lengths=lengths, check_inputs=False)
    assert torch.equal(fast_ids, ids) and torch.equal(fast, checked)
    for checked_call in (lambda: model.encode(images), lambda: model.decode(ids, lengths=lengths)):
        with pytest.raises(RuntimeError, match="_local_scalar_dense"):  # what the default pays for its checks
            with no_host_sync("cpu", detector=True):
                checked_call()


def test_encode_does_not_update_codebook_or_change_mode(images):
    model = small().train()
    before = model.quantizer.impl._codebook.embed.clone()
    model.encode(images)
    model.decode(model.encode(images, num_tokens=2))
    assert model.training and torch.equal(model.quantizer.impl._codebook.embed, before)


def test_unpatchify_places_patches_row_major_with_channels_last():
    p, grid = 2, 3
    pixels = torch.arange(grid * grid, dtype=torch.float)[None, :, None].repeat(1, 1, p * p * 3)  # patch id everywhere
    pixels[..., 2::3] += 100  # channel 2 of every pixel (channels are the fastest-moving axis)
    img = unpatchify(pixels, p, grid)
    assert img.shape == (1, 3, grid * p, grid * p)
    assert img[0, 0, 2 * p, 1 * p].item() == 2 * grid + 1  # patch (row 2, col 1)
    assert img[0, 2, 0, 0].item() == 100 and img[0, 1, 0, 0].item() == 0


def test_dct_basis_is_orthonormal_and_coarse_to_fine():
    basis = dct_basis(4, 6)  # [6, 16]
    torch.testing.assert_close(basis @ basis.T, torch.eye(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(basis[0], torch.full((16,), 0.25))  # row 0: mean pooling
    grid = basis.view(6, 4, 4)
    # rows 1 and 2: the two first-order ramps (one varies along columns only, the other along rows only)
    assert {bool((g - g[:1]).abs().max() < 1e-6) for g in grid[1:3]} == {True, False}
    torch.testing.assert_close(grid[1], grid[2].T)
    # every row past the first has zero mean: a prefix adds detail, never moves the mean
    assert basis[1:].sum(1).abs().max() < 1e-5
    more_tokens_than_patches = dct_basis(2, 6)
    assert more_tokens_than_patches[4:].abs().max() == 0
    torch.testing.assert_close(more_tokens_than_patches[:4] @ more_tokens_than_patches[:4].T, torch.eye(4))


def test_token_mixing_stem_starts_as_a_low_pass_prefix():
    """At init the encoder stem pools the K lowest DCT frequencies and the decoder stem spreads them back: the
    decoder's stem applied to a k-prefix of the encoder's stem is the projection onto the first k frequencies."""
    model = small(token_mixing=True)
    pool, spread = model.encoder.latent_mixing.detach(), model.decoder.patch_mixing.detach()  # [K, N], [N, K]
    torch.testing.assert_close(spread, pool.T)
    field = torch.randn(model.config.num_patches, 5)  # a patch-embedding field [N, C]
    for k in (1, 3, model.max_tokens):
        low_pass = spread[:, :k] @ (pool[:k] @ field)
        torch.testing.assert_close(spread[:, :k] @ (pool[:k] @ low_pass), low_pass, atol=1e-5, rtol=0)  # idempotent
    torch.testing.assert_close(spread[:, :1] @ (pool[:1] @ field), field.mean(0, keepdim=True).expand_as(field))
    assert small(token_mixing=False).encoder.latent_mixing is None


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("token_mixing,decoder_final_norm", [(True, False), (False, True)])
def test_token_mixing_stem_keeps_every_prefix_exact(mechanism, token_mixing, decoder_final_norm, images):
    """With random stem weights (not the DCT they start from), a k-prefix decode still equals the training path with
    per-sample lengths, and tail drop still ignores every token past k."""
    torch.manual_seed(0)
    model = small(length_mechanism=mechanism, token_mixing=token_mixing, decoder_final_norm=decoder_final_norm)
    model.eval()
    assert (model.encoder.latent_mixing is not None) == token_mixing
    if token_mixing:
        with torch.no_grad():
            model.encoder.latent_mixing.normal_()
            model.decoder.patch_mixing.normal_()
    ids = model.encode(images)
    lengths = torch.tensor([1, 3, 8])  # a different k for each sample, as training with per_sample_length
    train_path = ((model(images, lengths=lengths).recon + 1) / 2).clamp(0, 1)
    for i, k in enumerate(lengths.tolist()):
        prefix = model.decode(ids[i : i + 1, :k])
        assert torch.allclose(prefix, train_path[i : i + 1], atol=1e-5), f"sample {i}, k={k}"
    if mechanism == "tail_token_drop":
        other = ids.clone()
        other[:, 3:] = (ids[:, 3:] + 1) % model.codebook_size
        codes = model.quantizer.codes_from_ids
        keep3 = torch.full((3,), 3)
        assert torch.allclose(model.decoder(codes(ids), keep3), model.decoder(codes(other), keep3), atol=1e-6)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_pixel_level_decoder_aids_keep_every_prefix_exact_and_train(mechanism, images):
    """decoder_refine_channels and decoder_coarse_head (the demo's decoder): the output keeps its shape, each
    k-prefix decode equals the training path at that length, both start as the identity on the plain pixel head
    and gradients reach them."""
    torch.manual_seed(0)
    aids = dict(decoder_refine_channels=6, decoder_conv=False, decoder_coarse_head=True)
    model = small(length_mechanism=mechanism, **aids).eval()
    dec = model.decoder
    assert dec.to_pixels.out_features == 8 * 8 * 6 and dec.conv_out is None
    assert dec.last_layer is dec.refine[-1].weight
    with torch.no_grad():  # at init both aids add nothing: the image is the pixel head's first 3 channels
        for module in (dec.refine[-1], dec.to_coarse):
            assert module.weight.abs().max() == 0 and module.bias.abs().max() == 0
        for param in list(dec.refine.parameters()) + list(dec.to_coarse.parameters()):
            param.normal_(0, 0.2)  # non-trivial aids for the prefix check
    ids = model.encode(images)
    lengths = torch.tensor([1, 3, 8])
    out = model(images, lengths=lengths)
    assert out.recon.shape == images.shape
    train_path = ((out.recon + 1) / 2).clamp(0, 1)
    for i, k in enumerate(lengths.tolist()):
        assert torch.allclose(model.decode(ids[i : i + 1, :k]), train_path[i : i + 1], atol=1e-5), f"k={k}"
    model.train()
    loss = (model(images).recon - (images * 2 - 1)).pow(2).mean()
    loss.backward()
    for name in ("refine.0.weight", "refine.2.weight", "to_coarse.weight", "to_pixels.weight"):
        grad = dict(dec.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached decoder.{name}"


def test_coarse_head_is_a_bicubic_upsampling_of_one_colour_per_patch(images):
    """With the per-pixel head zeroed, the decoder's output is exactly the grid x grid coarse image upsampled
    bicubically: smooth across patch borders (no patch grid)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = small(decoder_coarse_head=True, decoder_conv=False).eval()
    dec, cfg = model.decoder, model.config
    with torch.no_grad():
        dec.to_pixels.weight.zero_()
        dec.to_pixels.bias.zero_()
        dec.to_coarse.weight.normal_(0, 0.5)
    captured = {}
    dec.to_coarse.register_forward_hook(lambda module, args, result: captured.setdefault("coarse", result))
    out = dec(model.quantizer.codes_from_ids(model.encode(images)))
    coarse = captured["coarse"].transpose(1, 2).reshape(3, 3, cfg.grid_size, cfg.grid_size)
    expected = F.interpolate(coarse, size=(cfg.image_size, cfg.image_size), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out, expected)
    blocky = coarse.repeat_interleave(cfg.patch_size, -1).repeat_interleave(cfg.patch_size, -2)
    def largest_step(x):  # the largest jump between horizontal neighbours
        return (x[..., 1:] - x[..., :-1]).abs().max()
    assert largest_step(out) < 0.6 * largest_step(blocky)  # no patch grid: the steps are spread out


@pytest.mark.parametrize("bad", [dict(decoder_refine_channels=2, decoder_conv=False),
                                 dict(decoder_refine_channels=8, decoder_conv=True)])
def test_refine_channels_config_is_checked(bad):
    with pytest.raises(ValueError, match="decoder_refine_channels"):
        small(**bad)
    for name in ("S", "B", "L"):  # the paper presets keep the plain ViT decoder
        cfg = preset_config(name)
        assert cfg.decoder_refine_channels == 0 and not cfg.decoder_coarse_head
