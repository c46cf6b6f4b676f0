"""Tokenizer configuration and the named preset registry.

A preset is a complete `TokenizerConfig`; configs name a preset and override a few fields:

    OneDTokenizer.from_preset("B", max_tokens=128, quantizer="fsq")
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import TypedDict

QUANTIZERS = ("vq", "lfq", "fsq")
# K is `max_tokens` everywhere (README: one word per concept); TiTok's name for it still loads.
RENAMED_FIELDS = {"num_latent_tokens": "max_tokens"}
LENGTH_MECHANISMS = ("tail_token_drop", "nested_dropout", "fixed")
LENGTH_SAMPLING = ("uniform", "pow2", "log_uniform")
PIXEL_RANGES = ("[-1, 1]", "[0, 1]")
VQ_DISTANCES = ("cosine", "euclidean")
DECODER_HEADS = ("pixels", "vqgan")

# The allowed values of the numeric fields: (lowest, highest, whether the lowest itself is allowed), None for no
# bound. Checked first, before anything divides by a field (image_size % patch_size) or allocates with it: a
# patch_size of 0 used to end in a ZeroDivisionError, a codebook_size of 0 deep inside the quantizer.
RANGES = {
    "image_size": (1, None, True), "patch_size": (1, None, True), "max_tokens": (1, None, True),
    "enc_width": (1, None, True), "enc_depth": (1, None, True), "enc_heads": (1, None, True),
    "dec_width": (1, None, True), "dec_depth": (1, None, True), "dec_heads": (1, None, True),
    "mlp_ratio": (0, None, False), "codebook_size": (2, None, True), "token_dim": (1, None, True),
    "vq_commitment_weight": (0, None, True), "vq_decay": (0, 1, True), "vq_dead_code_threshold": (0, None, True),
    "lfq_entropy_weight": (0, None, True), "decoder_refine_channels": (0, None, True),
    "vqgan_codebook_size": (2, None, True), "vqgan_code_dim": (1, None, True), "vqgan_channels": (32, None, True),
    "vqgan_res_blocks": (1, None, True),
}  # fmt: skip


class ConfigTypeError(TypeError, ValueError):
    """A config field of the wrong type. Also a ValueError: for a command it is a bad value like any other."""


def check_ranges(config, ranges: dict[str, tuple]) -> None:
    """Raise ValueError naming the first field of the dataclass `config` outside its range in `ranges` (see
    RANGES), with its value and the allowed range. NaN is outside every range."""
    for name, (lo, hi, lo_allowed) in ranges.items():
        value = getattr(config, name)
        if value is None:  # an optional field left unset
            continue
        above = value >= lo if lo_allowed else value > lo
        if not (above and (hi is None or value <= hi)):
            if hi is None:
                allowed = f"{'>=' if lo_allowed else '>'} {lo}"
            else:
                allowed = f"in {'[' if lo_allowed else '('}{lo}, {hi}]"
            raise ValueError(f"{type(config).__name__}.{name} must be {allowed}, got {value!r}")


@dataclass
class TokenizerConfig:
    # geometry
    image_size: int = 256
    patch_size: int = 16
    max_tokens: int = 128  # K: the longest token sequence

    # transformers (encoder and decoder are sized independently)
    enc_width: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    mlp_ratio: float = 4.0

    # quantizer: one of QUANTIZERS
    quantizer: str = "vq"
    codebook_size: int = 4096  # vq, lfq (a power of two); fsq derives it from fsq_levels
    token_dim: int = 12  # vq: l2-normalised code dim (TiTok 4096 x 12); lfq: ignored (log2 codebook_size)
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    vq_commitment_weight: float = 0.25
    vq_decay: float = 0.99  # EMA decay of the codebook
    vq_dead_code_threshold: float = 2.0  # codes whose EMA cluster size falls below this are re-seeded
    lfq_entropy_weight: float = 0.1
    # all-reduce codebook EMA statistics across ranks (multi-GPU). Only the multi-node smoke test turns this
    # off, to prove that it detects ranks whose codebooks drift apart.
    vq_sync_codebook: bool = True

    # variable length: one of LENGTH_MECHANISMS; only used while training
    length_mechanism: str = "tail_token_drop"
    length_sampling: str = "uniform"  # k's distribution (length.py): uniform over 1..K, pow2, log_uniform
    per_sample_length: bool = False  # tail_token_drop: one k per batch (One-D-Piece) or one per sample
    causal_latents: bool = False  # encoder: latent i sees all patches and latents <= i (FlexTok)
    # cross-length joint training (NesTok): every training step decodes all K tokens AND one prefix drawn by the
    # length mechanism, from the same encoder pass, so that the loss always reaches every position (length.py)
    cross_length_joint: bool = False

    decoder_conv: bool = True  # a 3x3 conv after unpatchify smooths patch seams
    # Pixel-level decoder aids, off unless set (the CPU demo turns both on; docs/demo.md has the measurements).
    # A ViT decodes every patch on its own from its final state, so a small, briefly trained one draws the patch
    # grid; these let the decoder draw across patch borders.
    # - decoder_refine_channels C > 0: the pixel head emits C channels per pixel; the image is the first 3 plus
    #   a residual conv block over all C (3x3, GELU, 3x3 -> 3) that sees across patch borders. It takes the
    #   place of decoder_conv (set that false).
    # - decoder_coarse_head: one RGB value per patch from the same final state, bicubically upsampled and added:
    #   a smooth base image with no patch grid, which the per-pixel head only has to correct.
    decoder_refine_channels: int = 0
    decoder_coarse_head: bool = False

    # Small-scale training aids (on in `tiny`, off in the paper presets). Trained from pixels, a 1D ViT tokenizer
    # only starts using its tokens once attention has learned to route image regions into latents and latents
    # back to patch positions; without these aids, at CPU-demo budgets that never happens (held-out PSNR stayed
    # flat in k; see docs/demo.md).
    # - token_mixing: a learned linear stem beside attention. Encoder latent j starts as
    #   latent_token_j + sum_i A[j, i] * patch_i (A: [K, N]); decoder patch query i starts as
    #   query + pos_i + sum_{j < k} B[i, j] * latent_j (B: [N, K], kept latents only, so any prefix stays valid).
    #   A starts as the K lowest-frequency 2D-DCT basis images of the patch grid and B as its transpose
    #   (stem.py), so a k-prefix starts out carrying the k coarsest spatial frequencies.
    # - decoder_final_norm: the decoder's last LayerNorm. Without it the pixel head reads the residual stream
    #   directly and keeps absolute brightness, which the LayerNorm removes. (The encoder keeps its final norm:
    #   FSQ/LFQ need unit-scale inputs.)
    token_mixing: bool = False
    decoder_final_norm: bool = True

    # Released-weight compatibility (docs/released_weights.md; `onedtok convert`). All off in every preset and
    # config of this project: they exist so that TiTok and One-D-Piece checkpoints compute here exactly what they
    # compute in their own code. Each one is a quirk of that code, kept because the released weights depend on it.
    # - pixel_range: what the encoder reads and the decoder writes. TiTok works on [0, 1] images directly; this
    #   project maps them to [-1, 1]. The public API (encode, decode, forward) is [0, 1] in, [-1, 1]-space
    #   reconstruction out of `forward`, whichever is set.
    pixel_range: str = "[-1, 1]"
    # - class_token: a learned token first in the encoder's and the decoder's sequence ([cls, patches, latents]),
    #   read by nothing at the output: TiTok keeps CLIP's layout, and attention sees it.
    class_token: bool = False
    # - pre_norm: a LayerNorm over the whole sequence before the first block (CLIP's ln_pre), both sides.
    pre_norm: bool = False
    # - legacy_token_layout: the encoder's final latents [B, K, W] are read as [B, W, K] memory (a reshape, no
    #   transpose) before the projection to token_dim, so token j mixes channels j, j+K, j+2K, ... of all latents.
    #   Upstream calls it a bug (bytedance/1d-tokenizer#98, One-D-Piece#3); TiTok L-32/B-64/S-128 and every
    #   One-D-Piece model were trained with it.
    legacy_token_layout: bool = False
    # - vq_distance: cosine (l2-normalised codes and inputs: TiTok 4096 x 12) or euclidean (raw codebook and
    #   inputs: TiTok's single-stage 8192 x 64 models).
    vq_distance: str = "cosine"
    # - decoder_conv_residual: decoder_conv adds its output to the image (img + conv(img): starts as the
    #   identity); TiTok's single-stage head replaces the image with it (conv(img)).
    decoder_conv_residual: bool = True
    # - decoder_head: "pixels" (the linear pixel head above) or "vqgan": per patch, logits over the codes of a
    #   MaskGIT-VQGAN (Linear W->2W, Tanh, Linear 2W->vqgan_codebook_size), softmax, times that VQGAN's codebook
    #   (a soft code, not an argmax), then its convolutional pixel decoder (vqgan_decoder.py), which upsamples
    #   16x. TiTok's two-stage models and One-D-Piece ship this decoder fine-tuned inside their checkpoints.
    decoder_head: str = "pixels"
    vqgan_codebook_size: int = 1024
    vqgan_code_dim: int = 256
    vqgan_channels: int = 128  # the pixel decoder's base width (GroupNorm(32) needs a multiple of 32)
    vqgan_channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # per level, finest first
    vqgan_res_blocks: int = 2

    def __post_init__(self) -> None:
        self._check_types()
        check_ranges(self, RANGES)
        if not self.fsq_levels or min(self.fsq_levels) < 2:
            raise ValueError(f"TokenizerConfig.fsq_levels must be a non-empty list of levels >= 2, got "
                             f"{self.fsq_levels!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.length_mechanism not in LENGTH_MECHANISMS:
            raise ValueError(f"length_mechanism must be one of {LENGTH_MECHANISMS}, got {self.length_mechanism!r}")
        if self.length_sampling not in LENGTH_SAMPLING:
            raise ValueError(f"length_sampling must be one of {LENGTH_SAMPLING}, got {self.length_sampling!r}")
        if self.cross_length_joint and self.length_mechanism == "fixed":
            raise ValueError("cross_length_joint decodes a random prefix beside all K tokens: it needs "
                             "length_mechanism 'tail_token_drop' or 'nested_dropout', got 'fixed'")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("enc", "dec"):
            width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if width % heads:
                raise ValueError(f"{name}_width {width} is not divisible by {name}_heads {heads}")
        if self.decoder_refine_channels and (self.decoder_refine_channels < 3 or self.decoder_conv):
            raise ValueError("decoder_refine_channels must be 0 (off) or >= 3 with decoder_conv false (the refine "
                             f"block replaces that conv), got {self.decoder_refine_channels} with decoder_conv "
                             f"{self.decoder_conv}")
        if self.quantizer == "lfq" and self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"lfq needs a power-of-two codebook_size, got {self.codebook_size}")
        self._check_released_switches()
        self.fsq_levels = list(self.fsq_levels)
        self.vqgan_channel_mult = list(self.vqgan_channel_mult)

    def _check_released_switches(self) -> None:
        for name, allowed in (("pixel_range", PIXEL_RANGES), ("vq_distance", VQ_DISTANCES),
                              ("decoder_head", DECODER_HEADS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TokenizerConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.decoder_head != "vqgan":
            return
        if not self.vqgan_channel_mult or min(self.vqgan_channel_mult) < 1:
            raise ValueError(f"vqgan_channel_mult must be a non-empty list of multipliers >= 1, got "
                             f"{self.vqgan_channel_mult!r}")
        upsampling = 2 ** (len(self.vqgan_channel_mult) - 1)  # one 2x upsampling between levels
        if self.patch_size != upsampling:
            raise ValueError(f"decoder_head 'vqgan' upsamples each patch {upsampling}x "
                             f"(vqgan_channel_mult {self.vqgan_channel_mult}), so patch_size must be {upsampling}, "
                             f"got {self.patch_size}")
        if self.vqgan_channels % 32:
            raise ValueError(f"vqgan_channels must be a multiple of 32 (GroupNorm with 32 groups), got "
                             f"{self.vqgan_channels}")
        if self.decoder_refine_channels or self.decoder_coarse_head or self.decoder_conv:
            raise ValueError("decoder_head 'vqgan' draws the pixels itself: decoder_conv and decoder_coarse_head "
                             "must be false and decoder_refine_channels 0")

    def _check_types(self) -> None:
        """Every field has its declared type: "16" or 16.0 for K would otherwise fail deep inside torch. Floats
        accept ints (1 for 1.0); bools are not ints here (True for K is a mistake, not 1)."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type  # annotations are strings (from __future__ import)
            if kind == "list[int]":
                ok = isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)
            elif kind == "int":
                ok = _is_int(value)
            elif kind == "float":
                ok = _is_int(value) or isinstance(value, float)
            else:
                ok = type(value).__name__ == kind
            if not ok:
                raise ConfigTypeError(f"TokenizerConfig.{f.name} must be {kind}, got {value!r} "
                                f"({type(value).__name__})")

    @property
    def grid_size(self) -> int:
        """Patches along each side of the (square) image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def effective_codebook_size(self) -> int:
        if self.quantizer == "fsq":
            return math.prod(self.fsq_levels)
        return self.codebook_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TokenizerConfig:
        """A config from field values; a field under its old name (RENAMED_FIELDS: saved tokenizers and
        checkpoints written before the rename) is read under its current one and wins over a preset's value."""
        values = dict(values)
        for old, new in RENAMED_FIELDS.items():
            if old in values:
                values[new] = values.pop(old)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TokenizerConfig fields: {unknown}")
        return cls(**values)


# `overrides` in configs: every TokenizerConfig field, optional, with its type, so the command line refuses an
# unknown field or a value of the wrong type while parsing, before anything is built.
TokenizerOverrides = TypedDict(  # noqa: UP013 (built from the dataclass fields, so it cannot drift from them)
    "TokenizerOverrides",
    {f.name: typing.get_type_hints(TokenizerConfig)[f.name] for f in dataclasses.fields(TokenizerConfig)},
    total=False,
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _paper(width: int, depth: int, heads: int) -> dict:
    # TiTok sizes: patch 16 at 256 px; encoder and decoder share the width/depth.
    return dict(
        image_size=256, patch_size=16, max_tokens=256,
        enc_width=width, enc_depth=depth, enc_heads=heads,
        dec_width=width, dec_depth=depth, dec_heads=heads,
        quantizer="vq", codebook_size=4096, token_dim=12,
    )  # fmt: skip


PRESETS: dict[str, dict] = {
    # CPU demo: 64 px, 8x8 patches, 16 tokens; trains in minutes on 2 cores.
    "tiny": dict(
        image_size=64, patch_size=8, max_tokens=16,
        enc_width=128, enc_depth=4, enc_heads=4,
        dec_width=128, dec_depth=4, dec_heads=4,
        quantizer="vq", codebook_size=1024, token_dim=8,
        vq_dead_code_threshold=1.0, token_mixing=True, decoder_final_norm=False,
    ),  # fmt: skip
    "S": _paper(512, 8, 8),
    "B": _paper(768, 12, 12),
    "L": _paper(1024, 24, 16),
}
_ALIASES = {"small": "S", "base": "B", "large": "L", "s": "S", "b": "B", "l": "L"}


def preset_config(name: str, **overrides) -> TokenizerConfig:
    """The named preset with `overrides` applied (unknown names and fields raise)."""
    key = _ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return TokenizerConfig.from_dict({**PRESETS[key], **overrides})
