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
