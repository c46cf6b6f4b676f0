"""Robust image decoding and the train/eval transforms shared by all DataModules.

Decoding policy
---------------
``decode_image`` returns an RGB ``PIL.Image`` or ``None`` when the bytes cannot be decoded. The full
pixel data is decoded eagerly (``Image.load()``), so truncated files are detected here and not later in a
transform. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is deliberately *not* enabled: a truncated JPEG would
otherwise come back silently padded with grey, which is worse for a reconstruction model than skipping it.

Mode conversion (``to_rgb``):

- ``RGB``: unchanged.
- ``RGBA`` / ``LA`` / ``PA`` / palette or ``L`` with a transparency entry: alpha is composited on white.
- ``I;16*`` / ``I`` (16/32-bit integer gray, e.g. 16-bit PNG): scaled to 8 bit (``/257`` if the values
  exceed 255), then gray -> RGB.
- ``F`` (float gray): values in [0, 1] are scaled to [0, 255], otherwise clipped.
- anything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``...): ``Image.convert("RGB")``.
  PIL handles Adobe (inverted) CMYK JPEGs in its decoder; no colour management / ICC transform is done,
  and EXIF orientation is not applied (as in torchvision's ImageFolder).

Transforms return float32 [3, S, S] in [0, 1] by default, or uint8 with ``uint8=True`` (what the training
DataModules' workers send; ``to_float_images`` converts on the device, see ``data/loading.py``).
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image

# Exceptions PIL raises for unreadable data: UnidentifiedImageError and "image file is truncated" are
# OSError; broken PNG chunks raise SyntaxError; some plugins raise ValueError/EOFError/struct.error/
# IndexError on malformed headers; DecompressionBombError (> 2x MAX_IMAGE_PIXELS) is treated as corrupt.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (see module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    ):
        return _composite_on_white(img)
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            if arr.size and np.nanmax(arr) <= 1.0:
                arr = arr * 255.0
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        arr = np.nan_to_num(np.clip(np.rint(arr), 0, 255)).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image | None:
    """Decode encoded image bytes to an RGB PIL image, or return ``None`` if they are corrupt/truncated."""
    try:
        with warnings.catch_warnings():
            # e.g. "Palette images with Transparency expressed in bytes should be converted to RGBA"
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return to_rgb(img)
    except DECODE_ERRORS:
        return None


def read_image(path: str) -> Image.Image | None:
    """An image file as RGB, or None when it cannot be read (I/O error, vanished) or decoded (corrupt)."""
    try:
        with open(path, "rb") as f:
            return decode_image(f.read())
    except OSError:
        return None


def decode_error(data: bytes) -> str | None:
    """Return ``None`` if ``data`` decodes fully, else a short reason (used by the shard converter)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        return None
    except DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"


def image_format(data: bytes) -> str | None:
    """PIL's format name (``JPEG``, ``PNG``...) of encoded bytes, from the header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except DECODE_ERRORS:
        return None


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, H, W] in [0, 255] -> float32 in [0, 1], on the images' device.

    The one uint8 -> float conversion of the input pipeline: loader workers send uint8 (a quarter of the bytes of
    float32 through worker IPC, pinned memory and the host -> device copy) and every DataModule calls this in
    ``on_after_batch_transfer``, i.e. on the GPU. ``div(255)`` rather than ``mul(1 / 255)``: it is what
    ``ToTensor`` computes, so the result is bit-identical to the float pipeline on the same uint8 pixels.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images (0..255), got dtype {images.dtype} with shape {tuple(images.shape)}")
    return images.to(torch.float32).div_(255)


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """float images in [0, 1] (clipped) -> uint8, rounded to the nearest of the 256 levels (error <= 0.5/255)."""
    return images.clamp(0, 1).mul(255).round_().to(torch.uint8)


def train_transform(image_size: int = 256, *, uint8: bool = False):
    """Resize the shorter side to ``image_size`` (bicubic, antialiased), random crop, random h-flip.

    Returns a callable PIL RGB image -> tensor [3, image_size, image_size]: float32 in [0, 1], or with
    ``uint8=True`` uint8 in [0, 255] (what the training DataModules' workers send). Both go through the same PIL
    resize, which on an 8-bit RGB image resamples to 8 bit in either case, so ``uint8=True`` followed by
    ``to_float_images`` equals the float output exactly: producing uint8 costs no resize quality.
    """
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.RandomCrop(image_size),
            T.RandomHorizontalFlip(),
            T.PILToTensor() if uint8 else T.ToTensor(),
        ]
    )


def eval_transform(image_size: int = 256, *, uint8: bool = False):
    """Resize the shorter side to ``image_size`` and center crop; float32 [3, H, W] in [0, 1], or uint8 with
    ``uint8=True`` (same pixels, see ``train_transform``)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(image_size),
            T.PILToTensor() if uint8 else T.ToTensor(),
        ]
    )
