"""Image files for the tokenizer: reading any file to RGB, the evaluation crop, and listing image folders.

The one home of what every path from disk to tokens shares: training DataModules, token extraction, evaluation,
the shard converter and the `onedtok` command. (The training-only transforms, random crops and the uint8 ->
float conversion on the device, are in `data/transforms.py`.)

Decoding policy
---------------
``decode_image_or_reason`` returns ``(RGB PIL.Image, "")``, or ``(None, reason)`` for an image that is skipped,
and the reason names why (the skip reasons every reader reports):

- ``"extreme aspect ratio WxH (...)"``: the longer side is over ``MAX_ASPECT_RATIO`` (16) times the shorter
  (``tokenizer/square_crop.py`` says why 16). Refused from the header, before a pixel is decoded: a 666-byte
  200000x1 PNG is a line, not a picture, and a square crop of it is under 1/16 of it;
- ``"decompression bomb (...)"``: more pixels than PIL's limit (``Image.MAX_IMAGE_PIXELS`` x 2, PIL's
  ``DecompressionBombError``, raised from the header) or a PNG text chunk that decompresses past PIL's limit;
- ``"unreadable image"``: the file cannot be read or does not decode (not an image, corrupt, truncated).

``decode_image`` / ``read_image`` return just the image (None when skipped). The full pixel data is decoded
eagerly (``Image.load()``), so truncated files are detected here and not later in a
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

Listing
-------
``walk_image_files`` follows symbolic links but never enters a directory twice (see its docstring), so a link
loop can neither repeat images nor relabel them.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .square_crop import MAX_ASPECT_RATIO

log = logging.getLogger(__name__)

# Exceptions PIL raises for unreadable data: UnidentifiedImageError and "image file is truncated" are
# OSError; broken PNG chunks raise SyntaxError; some plugins raise ValueError/EOFError/struct.error/
# IndexError on malformed headers. DecompressionBombError (> 2x MAX_IMAGE_PIXELS) is caught apart: its own reason.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
)
UNREADABLE = "unreadable image"  # the skip reason of a file that cannot be read or decoded

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


def aspect_refusal(width: int, height: int) -> str | None:
    """The skip reason of a ``width`` x ``height`` image too elongated to use, or None (see the module docstring)."""
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"extreme aspect ratio {width}x{height} (longer side over {MAX_ASPECT_RATIO}x the shorter; a square "
                "crop would keep under 1/16 of it)")
    return None


def decode_image_or_reason(data: bytes, *, detail: bool = False) -> tuple[Image.Image | None, str]:
    """``(RGB image, "")``, or ``(None, skip reason)`` (see the module docstring). ``detail``: an unreadable file's
    reason also names PIL's error (the shard converter lists it)."""
    try:
        with warnings.catch_warnings():
            # e.g. "Palette images with Transparency expressed in bytes should be converted to RGBA"
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                refusal = aspect_refusal(*img.size)
                if refusal is not None:
                    return None, refusal
                img.load()
                return to_rgb(img), ""
    except Image.DecompressionBombError as exc:
        return None, f"decompression bomb ({exc})"
    except DECODE_ERRORS as exc:
        if isinstance(exc, ValueError) and "Decompressed data too large" in str(exc):  # a PNG text chunk bomb
            return None, f"decompression bomb ({exc})"
        return None, f"{UNREADABLE} ({type(exc).__name__}: {exc})" if detail else UNREADABLE


def read_image_or_reason(path: str) -> tuple[Image.Image | None, str]:
    """``decode_image_or_reason`` of a file; a file that cannot be read (I/O error, vanished) is unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None, UNREADABLE
    return decode_image_or_reason(data)


def decode_image(data: bytes) -> Image.Image | None:
    """Encoded image bytes as an RGB PIL image, or None when they are skipped (``decode_image_or_reason``)."""
    return decode_image_or_reason(data)[0]


def read_image(path: str) -> Image.Image | None:
    """An image file as RGB, or None when it is skipped (``read_image_or_reason``)."""
    return read_image_or_reason(path)[0]


def decode_error(data: bytes) -> str | None:
    """Return ``None`` if ``data`` is a usable image, else the skip reason, with PIL's error for an unreadable
    file (the shard converter's ``{split}-skipped.json``)."""
    return decode_image_or_reason(data, detail=True)[1] or None


def image_format(data: bytes) -> str | None:
    """PIL's format name (``JPEG``, ``PNG``...) of encoded bytes, from the header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except (*DECODE_ERRORS, Image.DecompressionBombError):
        return None


def eval_transform(image_size: int = 256, *, uint8: bool = False):
    """Resize the shorter side to ``image_size`` and center crop; float32 [3, H, W] in [0, 1], or uint8 with
    ``uint8=True`` (same pixels, see ``train_transform``). The resize and crop are one ``ShorterSideCrop``
    (``tokenizer/square_crop.py``): torchvision's ``Resize`` + ``CenterCrop`` pixels, in bounded memory."""
    from torchvision import transforms as T

    from .square_crop import ShorterSideCrop

    return T.Compose(
        [
            ShorterSideCrop(image_size),
            T.PILToTensor() if uint8 else T.ToTensor(),
        ]
    )


def _dir_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the directory `path` resolves to (links followed), or None if it is not one."""
    try:
        st = os.stat(path)
    except OSError:  # a dangling link, a permission problem: nothing to walk
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def walk_image_files(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Relative paths (``/``-separated) of every image file below ``root``, sorted; the one directory walker of
    the data and evaluation code.

    Symbolic links are followed, but no directory is entered twice: a directory is identified by the
    ``(st_dev, st_ino)`` of what it resolves to, and claimed by the first path that reaches it in a
    breadth-first walk (shallowest path first, then sorted order). So a link back up the tree (``cat_b/loop ->
    ..``) or to itself (``.``) adds nothing, and a link from one class folder into another (``cat_a/x ->
    ../cat_b``) does not relabel the other class's images: ``cat_b`` is claimed at depth 1, before anything
    below ``cat_a`` is looked at. Hidden entries (names starting with ``.``) are skipped; the extension check
    is case-insensitive. Unreadable directories are skipped with a warning.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"not a directory: {root}")
    exts = tuple(e.lower() for e in extensions)
    seen = {_dir_id(root)}
    out: list[str] = []
    level = [""]  # relative directory paths at the current depth
    while level:
        deeper = []
        for rel_dir in level:
            full_dir = os.path.join(root, rel_dir)
            try:
                entries = sorted(os.scandir(full_dir), key=lambda e: e.name)
            except OSError as exc:
                log.warning("cannot list %s (%s): skipped", full_dir, exc)
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                if e.is_dir(follow_symlinks=True):
                    key = _dir_id(e.path)
                    if key is not None and key not in seen:
                        seen.add(key)
                        deeper.append(rel)
                elif e.name.lower().endswith(exts) and e.is_file(follow_symlinks=True):
                    out.append(rel)
        level = deeper
    return sorted(out)


def make_grid(rows: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """[R, C, 3, H, W] -> one image [3, R*(H+pad)+pad, C*(W+pad)+pad] with white padding."""
    r, c, _, h, w = rows.shape
    grid = torch.ones(3, r * (h + pad) + pad, c * (w + pad) + pad, dtype=rows.dtype, device=rows.device)
    for i in range(r):
        for j in range(c):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top : top + h, left : left + w] = rows[i, j]
    return grid
