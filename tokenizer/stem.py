"""The token-mixing stem's starting point: a truncated 2D DCT over the patch grid, lowest frequencies first.

With `token_mixing` on (config.py), encoder latent j starts from sum_i A[j, i] * patch_i and decoder patch
query i from sum_j B[i, j] * latent_j. Initialising A with the first K 2D-DCT basis functions of the patch grid
(orthonormal rows, ordered by u + v, then max(u, v)) and B with their transpose makes a k-prefix start out as
the k lowest spatial frequencies of the patch-embedding field: the coarse-to-fine order that 1D tokenizers
find on their own only after long training (FlexTok, One-D-Piece). Training is free to move away from it.
"""

from __future__ import annotations

import math

import torch


def zigzag_frequencies(grid: int) -> list[tuple[int, int]]:
    """All (u, v) frequency pairs of a grid x grid DCT, ordered coarse to fine: by u + v, then max(u, v)."""
    pairs = [(u, v) for u in range(grid) for v in range(grid)]
    return sorted(pairs, key=lambda uv: (uv[0] + uv[1], max(uv)))


def dct_basis(grid: int, count: int) -> torch.Tensor:
    """[count, grid*grid]: the first `count` orthonormal 2D-DCT-II basis images of a grid x grid patch grid
    (row-major over patches), lowest frequency first. Row 0 is the constant (mean pooling). Rows past
    grid*grid (more tokens than patches) are zero: there are no further frequencies to give them."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) * math.pi / grid  # [grid]
    basis = torch.zeros(count, grid * grid, dtype=torch.float64)
    for row, (u, v) in enumerate(zigzag_frequencies(grid)[:count]):
        image = torch.outer(torch.cos(u * centres), torch.cos(v * centres)).flatten()  # [grid*grid]
        basis[row] = image / image.norm()
    return basis.float()
