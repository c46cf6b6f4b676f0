"""Classical codec baselines (Pillow JPEG and WebP) at a target number of bits per image.

    rec, bits, quality = compress_to_bits(image_uint8, "jpeg", target_bits=320)

For each image the quality is searched so that the encoded file size in bits is as close as possible to the
target (the tokenizer's k * log2(V) bits), so the mean over images is close to the target too. Bits count the
WHOLE file as Pillow writes it (headers, quantisation and Huffman tables included): at a few hundred bits no
codec gets there (a 64x64 JPEG at quality 1 is still ~300+ bytes, a WebP ~100 bytes), and the lowest quality
is used; the achieved bits are what the report shows.

Settings: JPEG ``quality`` 1..95 (Pillow's useful range; 4:2:0 chroma subsampling, ``optimize=True`` Huffman
tables), WebP lossy ``quality`` 0..100, ``method=6`` (slowest/best). Decoded back to uint8 RGB by Pillow.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
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


def compress_batch(images: torch.Tensor, codec: str, targets: list[float],
                   threads: int | None = None) -> dict[float, tuple]:
    """uint8 [B, 3, H, W] -> {target: (recons uint8 [B, 3, H, W], bits int64 [B], quality int64 [B])}.

    Images are encoded on ``threads`` threads (Pillow releases the GIL while encoding; default: up to 8,
    bounded by the CPU count). Results do not depend on the number of threads.
    """
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
