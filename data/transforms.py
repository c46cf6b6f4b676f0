"""The training-only image transforms: random crops for training, and the uint8 -> float conversion on the device.

Reading files, the evaluation crop and folder listing are shared with evaluation and the `onedtok` command and
live in `tokenizer/images.py`. Transforms return float32 [3, S, S] in [0, 1] by default, or uint8 with
``uint8=True`` (what the training DataModules' workers send; ``to_float_images`` converts on the device, see
``data/loading.py``).
"""

from __future__ import annotations

import torch


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


def train_transform(image_size: int = 256, *, uint8: bool = False):
    """Resize the shorter side to ``image_size`` (bicubic, antialiased), random crop, random h-flip.

    The resize and the crop are one ``tokenizer.square_crop.ShorterSideCrop``: torchvision's ``Resize`` +
    ``RandomCrop`` pixels, positions and RNG draws, in memory bounded by the output whatever the aspect ratio.

    Returns a callable PIL RGB image -> tensor [3, image_size, image_size]: float32 in [0, 1], or with
    ``uint8=True`` uint8 in [0, 255] (what the training DataModules' workers send). Both go through the same PIL
    resize, which on an 8-bit RGB image resamples to 8 bit in either case, so ``uint8=True`` followed by
    ``to_float_images`` equals the float output exactly: producing uint8 costs no resize quality.
    """
    from torchvision import transforms as T

    from tokenizer.square_crop import ShorterSideCrop

    return T.Compose(
        [
            ShorterSideCrop(image_size, random=True),
            T.RandomHorizontalFlip(),
            T.PILToTensor() if uint8 else T.ToTensor(),
        ]
    )
