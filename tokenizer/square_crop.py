"""The square crop of every image transform: shorter side resized to S, an S x S square cut, in bounded memory.

torchvision's ``Resize(S)`` followed by ``RandomCrop(S)`` or ``CenterCrop(S)`` resizes the *whole* image before it
keeps S x S of it, so the work grows with the aspect ratio, not with the output: a 666-byte 200000x1 PNG becomes
12,800,000 x 64 pixels at S = 64 (a 4.4 GB peak), and about 52 GB at S = 256. ``ShorterSideCrop`` picks the square
first, in the coordinates of the resized image, then resamples in one of two ways (``resize_crop``):

- aspect ratio (longer side / shorter side) up to MAX_ASPECT_RATIO: the whole image, with torchvision's own call
  (``Image.resize`` to the resized size), then the crop. The same pixels as before by construction, and the resized
  image has at most MAX_ASPECT_RATIO x S^2 pixels;
- beyond: only the square's fractional source box (``Image.resize(..., box=...)``, ``box_crop``), which costs
  S x the source rows under the box whatever the ratio. The readers (``tokenizer.images``) refuse such images as a
  named skip, so this path only serves callers that hand the transform an image directly.

Same crops as torchvision's on either path:
- sizes: the shorter side becomes S and the longer ``int(S * long / short)`` (``resized_size``, torchvision's rule);
  an image already at that size is cropped without resampling, as torchvision leaves it unresized;
- positions: the centre square at ``round((n - S) / 2)``; the random square uniform over every position, drawn as
  ``RandomCrop`` draws it (``torch.randint`` for the top, then the left; no draw when the image is S x S already),
  so seeded runs keep their crops and consume the global torch RNG exactly as before.
Memory per image: ``scripts/bench_image_memory.py``.
"""

from __future__ import annotations

import torch
from PIL import Image

# Longer side over shorter side up to which the whole image is resized as torchvision resizes it (at most this x S^2
# pixels); also the readers' limit: tokenizer.images refuses longer images as a named skip. Photographic formats
# are 1:1 to about 3:1 (3:2, 16:9, 2.39:1 cinema, 2.7:1 panoramic film) and stitched panoramas rarely pass 10:1;
# beyond 16:1 a centre square keeps under 1/16 of the picture (banners, strips, 1-pixel lines, crafted files).
MAX_ASPECT_RATIO = 16


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) once the shorter side is ``size``: torchvision's rule, the longer side truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def resize_crop(img: Image.Image, size: int, top: int, left: int) -> Image.Image:
    """The ``size`` x ``size`` square at (``top``, ``left``) of ``img`` resized (bicubic, antialiased) so that its
    shorter side is ``size``: torchvision's pixels up to MAX_ASPECT_RATIO, the square's source box beyond."""
    width, height = img.size
    new_w, new_h = resized_size(width, height, size)
    if not (0 <= top <= new_h - size and 0 <= left <= new_w - size):
        raise ValueError(f"a {size}x{size} square at top={top}, left={left} does not fit in {new_w}x{new_h} (the "
                         f"{width}x{height} image with its shorter side resized to {size})")
    if (new_w, new_h) == (width, height):  # torchvision does not resample an image already at its size
        return img.crop((left, top, left + size, top + size))
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return box_crop(img, size, top, left)
    # torchvision's own call (F.resize on a PIL image), so the same pixels; at most MAX_ASPECT_RATIO x size^2 of them
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))


def box_crop(img: Image.Image, size: int, top: int, left: int) -> Image.Image:
    """``resize_crop`` as one resampling of the square's fractional source box: the same filter scale and positions
    as the whole resize, with work bounded by ``size`` x the source rows (or columns) under the box, whatever the
    aspect ratio. Not bit-identical to the whole resize (Pillow's box is float32, and it may order its two passes
    differently for the smaller output), hence only beyond MAX_ASPECT_RATIO, where the readers refuse images."""
    width, height = img.size
    new_w, new_h = resized_size(width, height, size)
    # (left * width) / new_w: integer products are exact in float64, so each corner is rounded once and a square
    # reaching the far edge ends exactly at `width` (PIL refuses a box past the image)
    box = (left * width / new_w, top * height / new_h, (left + size) * width / new_w, (top + size) * height / new_h)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box)


class ShorterSideCrop:
    """PIL image -> PIL ``size`` x ``size``: the shorter side resized to ``size`` and the centre square, or
    (``random=True``) a square at a uniformly random position (see the module docstring)."""

    def __init__(self, size: int, random: bool = False):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.random = int(size), bool(random)

    def position(self, new_w: int, new_h: int) -> tuple[int, int]:
        """(top, left) of the square in the resized image: centred, or drawn as torchvision's RandomCrop draws it."""
        s = self.size
        if not self.random:
            return int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        if (new_w, new_h) == (s, s):
            return 0, 0
        top = int(torch.randint(0, new_h - s + 1, size=(1,)).item())
        left = int(torch.randint(0, new_w - s + 1, size=(1,)).item())
        return top, left

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left = self.position(*resized_size(*img.size, self.size))
        return resize_crop(img, self.size, top, left)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, random={self.random})"


__all__ = ["MAX_ASPECT_RATIO", "ShorterSideCrop", "box_crop", "resize_crop", "resized_size"]
