"""Pixel metrics on uint8 images, the one definition used by training logs, reports and adaptive encoding.

Every metric takes uint8 tensors [B, 3, H, W] (what an image file holds): a float image in [0, 1] is quantised
with `to_uint8` first, exactly like the references, so no metric sees sub-LSB detail a saved image would not have.
PSNR is per image with peak 255, capped at `PSNR_CAP_DB` (identical images would be +inf; the cap keeps means
finite; the smallest non-zero error of a 64x64 image already gives 119 dB).
"""

from __future__ import annotations

import torch

PSNR_CAP_DB = 100.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8, clamped and rounded to nearest (how a reconstruction becomes an image file)."""
    if images.dtype == torch.uint8:
        return images
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def check_uint8_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or y.dtype != torch.uint8:
        raise TypeError(f"metrics take uint8 images (use to_uint8 first), got {x.dtype} and {y.dtype}")
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected two [B, 3, H, W] tensors of equal shape, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """Per-image PSNR in dB (peak 255) of uint8 images, float64 [B]; identical images give `cap_db`."""
    check_uint8_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    out = 10 * torch.log10(255.0**2 / mse)  # +inf where mse == 0
    return out.clamp(max=cap_db)


__all__ = ["PSNR_CAP_DB", "to_uint8", "check_uint8_pair", "psnr"]
