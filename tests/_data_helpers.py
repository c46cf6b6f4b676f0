"""Helpers shared by the data tests: tiny ImageFolder trees with awkward images."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def _rgb(rng, h=40, w=56):
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def make_awkward_tree(root: str, seed: int = 0) -> dict[str, str]:
    """Two classes; normal RGB JPEGs plus gray JPEG, CMYK JPEG, RGBA PNG and a truncated JPEG.

    Returns {name: relative path} of the special files.
    """
    rng = np.random.default_rng(seed)
    for cls in ("cat", "dog"):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
    for i in range(3):
        _rgb(rng).save(os.path.join(root, "cat", f"rgb{i}.jpg"), quality=90)
        _rgb(rng, 48, 36).save(os.path.join(root, "dog", f"rgb{i}.JPEG"), quality=90)
    special = {
        "gray": "cat/gray.jpg",
        "cmyk": "cat/cmyk.jpg",
        "rgba": "dog/alpha.png",
        "corrupt": "dog/corrupt.jpg",
    }
    _rgb(rng).convert("L").save(os.path.join(root, special["gray"]), quality=90)
    _rgb(rng).convert("CMYK").save(os.path.join(root, special["cmyk"]), quality=90)
    rgba = np.concatenate([(rng.random((30, 30, 3)) * 255), np.full((30, 30, 1), 128)], axis=2)
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(os.path.join(root, special["rgba"]))
    good = open(os.path.join(root, "cat", "rgb0.jpg"), "rb").read()
    with open(os.path.join(root, special["corrupt"]), "wb") as f:
        f.write(good[: len(good) // 3])
    return special


def make_plain_tree(
    root: str, n_per_class: int, classes=("a", "b", "c"), size=(24, 20), seed: int = 0
) -> None:
    rng = np.random.default_rng(seed)
    for cls in classes:
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(n_per_class):
            _rgb(rng, *size).save(os.path.join(root, cls, f"{cls}{i:03d}.jpg"), quality=85)


ODD_IMAGES = {  # name -> (file name, PIL mode, width, height)
    "thin": ("thin_200000x1.png", "RGB", 200000, 1),  # 666 bytes: 4.4 GB at 64 px through a whole-image resize
    "thin_short": ("thin_20000x1.png", "RGB", 20000, 1),  # 143 bytes: 5.9 GB at 256 px
    "wide": ("wide_4000x300.png", "RGB", 4000, 300),  # 13.3:1, a legitimate panorama: read, not refused
    "bomb": ("bomb_20000x10000.png", "1", 20000, 10000),  # 24 KB, 2e8 pixels: over PIL's 1.8e8 limit
}


def make_odd_images(folder: str) -> dict[str, str]:
    """The ODD_IMAGES as real PNG files in `folder` (flat colour, so they compress to almost nothing);
    returns {name: path}."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, (file_name, mode, width, height) in ODD_IMAGES.items():
        paths[name] = os.path.join(folder, file_name)
        Image.new(mode, (width, height), (200, 40, 40) if mode == "RGB" else 0).save(paths[name])
    return paths
