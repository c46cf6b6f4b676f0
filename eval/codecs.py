"""Classical codec baselines (Pillow JPEG and WebP, and a thumbnail) at a target number of bits per image.

    rec, bits, quality = compress_to_bits(image_uint8, "jpeg", target_bits=320)
    rec, bits, side = thumbnail_batch(images_uint8, target_bits=320)  # rec None when not even 1x1 fits
    out = compress_batch(images_uint8, "thumbnail", [20.0, 320.0])   # same contract for every codec name

JPEG and WebP: for each image the quality is searched so that the encoded file size in bits is as close as
possible to the target (the tokenizer's k * log2(V) bits), so the mean over images is close to the target too.
Bits count the WHOLE file as Pillow writes it (headers, quantisation and Huffman tables included): at a few
hundred bits neither gets there (a 64x64 JPEG at quality 1 is still ~300+ bytes, a WebP ~100 bytes), and the
lowest quality is used; the achieved bits are what the report shows.

Settings: JPEG ``quality`` 1..95 (Pillow's useful range; 4:2:0 chroma subsampling, ``optimize=True`` Huffman
tables), WebP lossy ``quality`` 0..100, ``method=6`` (slowest/best). Decoded back to uint8 RGB by Pillow.

Thumbnail: the most trivial codec, and the only one here that fits a budget of a few hundred bits (it has no
header). The image is box-downsampled to s x s (area average; ``adaptive_avg_pool2d``, which is exactly the
mean over (H/s) x (W/s) blocks when s divides the size), each value stored as uint8 (8 bits per channel), and
upsampled back bicubically (``align_corners=False``), clamped and rounded to uint8. s is the largest side with
s * s * 3 * 8 <= target bits, so the achieved bits s * s * 24 never exceed the target; below 24 bits there is
no thumbnail (s = 0) and no reconstruction. The thumbnail is s x s whatever the image's aspect (the tokenizer's
images are square).
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Codec:
    name: str
    min_quality: int
    max_quality: int
    options: tuple = ()

    def encode(self, image: Image.Image, quality: int) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=self.name.upper(), quality=int(quality), **dict(self.options))
        return buf.getvalue()


CODECS: dict[str, Codec] = {
    "jpeg": Codec("jpeg", 1, 95, (("optimize", True), ("subsampling", "4:2:0"))),
    "webp": Codec("webp", 0, 100, (("method", 6), ("lossless", False))),
}
THUMBNAIL = "thumbnail"
CODEC_NAMES = (*CODECS, THUMBNAIL)  # every name compress_batch accepts
THUMBNAIL_BITS_PER_PIXEL = 3 * 8  # RGB, one uint8 per channel


def _to_pil(image: torch.Tensor) -> Image.Image:
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")
    return Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy(), mode="RGB")


def _from_bytes(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class CodecSearch:
    """One image, one codec: encoded sizes per quality, computed lazily and cached across targets."""

    def __init__(self, image: torch.Tensor, codec: str | Codec):
        self.codec = CODECS[codec] if isinstance(codec, str) else codec
        self.pil = _to_pil(image)
        self._cache: dict[int, bytes] = {}

    def encoded(self, quality: int) -> bytes:
        if quality not in self._cache:
            self._cache[quality] = self.codec.encode(self.pil, quality)
        return self._cache[quality]

    def bits(self, quality: int) -> int:
        return 8 * len(self.encoded(quality))

    def best_quality(self, target_bits: float) -> int:
        """Quality whose file size is closest to ``target_bits`` (ties: the smaller file).

        Binary search for the largest quality with size <= target (sizes grow with quality, up to small
        non-monotonic wiggles), then the closer of it and its neighbour above.
        """
        lo, hi = self.codec.min_quality, self.codec.max_quality
        if self.bits(lo) >= target_bits:
            return lo
        if self.bits(hi) <= target_bits:
            return hi
        while hi - lo > 1:  # invariant: bits(lo) < target < bits(hi)
            mid = (lo + hi) // 2
            if self.bits(mid) <= target_bits:
                lo = mid
            else:
                hi = mid
        return lo if abs(self.bits(lo) - target_bits) <= abs(self.bits(hi) - target_bits) else hi

    def compress(self, target_bits: float) -> tuple[torch.Tensor, int, int]:
        """(reconstruction uint8 [3, H, W], achieved bits, quality) closest to ``target_bits``."""
        q = self.best_quality(target_bits)
        data = self.encoded(q)
        return _from_bytes(data), 8 * len(data), q


def compress_to_bits(image: torch.Tensor, codec: str, target_bits: float) -> tuple[torch.Tensor, int, int]:
    """Encode ``image`` (uint8 [3, H, W]) with ``codec`` at the quality closest to ``target_bits``."""
    return CodecSearch(image, codec).compress(target_bits)


def _compress_all(search: CodecSearch, targets: list[float]) -> list[tuple]:
    return [search.compress(t) for t in targets]


# ------------------------------------------------------------------------------------------ thumbnail
def thumbnail_side(target_bits: float) -> int:
    """The largest s with s * s * 24 <= target_bits; 0 when not even a 1x1 thumbnail (24 bits) fits."""
    if not math.isfinite(target_bits) or target_bits < 0:
        raise ValueError(f"target_bits must be a finite number >= 0, got {target_bits}")
    # floor(target / 24) is the number of whole pixels the budget pays for; isqrt: the largest square of them
    return math.isqrt(math.floor(target_bits / THUMBNAIL_BITS_PER_PIXEL))


def thumbnail_encode(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> the stored thumbnail, uint8 [B, 3, side, side] (side * side * 24 bits per image).

    Area average in float64, so which way a block mean rounds to uint8 (half to even) does not hinge on the
    accumulation error of a float32 kernel, and is the same on every device.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if not 1 <= side <= min(h, w):
        raise ValueError(f"thumbnail side must be within 1..{min(h, w)} for {h}x{w} images, got {side}")
    # adaptive pooling = the exact (H/s) x (W/s) block means (avg_pool2d with kernel = stride = H/s) when s
    # divides H and W; otherwise windows of floor/ceil sizes that overlap by at most one pixel
    small = F.adaptive_avg_pool2d(images.double(), side)  # [B, 3, s, s] in [0, 255]
    return small.round().clamp(0, 255).to(torch.uint8)


def thumbnail_decode(thumbs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [B, 3, s, s] -> uint8 [B, 3, H, W]: bicubic upsampling (align_corners=False), clamped, rounded."""
    if thumbs.dtype != torch.uint8 or thumbs.dim() != 4:
        raise ValueError(f"expected uint8 thumbnails [B, 3, s, s], got {thumbs.dtype} {tuple(thumbs.shape)}")
    up = F.interpolate(thumbs.double(), size=tuple(size), mode="bicubic", align_corners=False)  # [B, 3, H, W]
    # bicubic overshoots next to edges: clamp before rounding, like the tokenizer's reconstructions
    return up.clamp(0, 255).round().to(torch.uint8)


def thumbnail(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> uint8 [B, 3, H, W]: what the decoder of a side x side thumbnail shows."""
    return thumbnail_decode(thumbnail_encode(images, side), images.shape[-2:])


def thumbnail_batch(images: torch.Tensor, target_bits: float) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """uint8 [B, 3, H, W] -> (reconstruction uint8 [B, 3, H, W] or None, bits int64 [B], side s).

    None (and 0 bits, s = 0) when the budget is under 24 bits: no thumbnail exists, so there is nothing to
    score. The side is capped at the image size (a thumbnail as large as the image is the image, losslessly).
    """
    h, w = images.shape[-2:]
    side = min(thumbnail_side(target_bits), h, w)
    bits = torch.full((len(images),), side * side * THUMBNAIL_BITS_PER_PIXEL, dtype=torch.long)
    return (thumbnail(images, side) if side else None), bits, side


# ------------------------------------------------------------------------------------------ any codec
def compress_batch(images: torch.Tensor, codec: str, targets: list[float],
                   threads: int | None = None) -> dict[float, tuple]:
    """uint8 [B, 3, H, W] -> {target: (recons uint8 [B, 3, H, W], bits int64 [B], quality int64 [B])}.

    ``codec``: one of CODEC_NAMES. For "thumbnail" the quality is the side s, and recons is None where no
    thumbnail fits the target (bits and s are then 0).

    Images are encoded on ``threads`` threads (Pillow releases the GIL while encoding; default: up to 8,
    bounded by the CPU count). Results do not depend on the number of threads.
    """
    if codec == THUMBNAIL:
        out = {}
        for t in targets:
            recon, bits, side = thumbnail_batch(images, t)
            out[t] = (recon, bits, torch.full_like(bits, side))
        return out
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODEC_NAMES}")
    searches = [CodecSearch(img, codec) for img in images]
    threads = threads or min(8, os.cpu_count() or 1, max(1, len(searches)))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            per_image = list(pool.map(_compress_all, searches, [targets] * len(searches)))
    else:
        per_image = [_compress_all(s, targets) for s in searches]
    out = {}
    for j, t in enumerate(targets):
        res = [r[j] for r in per_image]
        out[t] = (
            torch.stack([r[0] for r in res]),
            torch.tensor([r[1] for r in res], dtype=torch.long),
            torch.tensor([r[2] for r in res], dtype=torch.long),
        )
    return out
