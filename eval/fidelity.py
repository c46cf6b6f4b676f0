"""Inception Score and improved precision/recall: the other numbers of the ADM evaluator, from the same features.

    is_ = inception_score(logits)                       # logits [N, 1008] of the Inception's fc (no bias)
    p, r = precision_recall(real_feats, fake_feats)     # pool features [N, 2048], k = 3 nearest neighbours

Inception Score (Salimans et al. 2016) as guided-diffusion's evaluator computes it: softmax of the unbiased
logits (ADM multiplies the pool features by the fc weight, no bias: torch-fidelity's "logits_unbiased"), split
into consecutive chunks of `split_size` = 5000 samples, exp(mean_x KL(p(y|x) || p(y))) per chunk, averaged over
chunks (a set under 5000 samples is one chunk).

Precision and recall (Kynkäänniemi et al. 2019): each real feature gets a radius, the distance to its k-th nearest
real neighbour (k = 3, itself excluded); precision is the fraction of generated samples inside at least one real
ball, recall the fraction of real samples inside at least one generated ball (radii from the generated set). As in
ADM, the reference side is the reference batch's images (its 10,000 images) and distances are Euclidean in the
2048-d pool space. Pairwise distances are computed in blocks of `block` rows: memory O(block * N), not O(N^2).
"""

from __future__ import annotations

import math

import torch

ADM_IS_SPLIT = 5000  # samples per Inception Score chunk in guided-diffusion's evaluator


def inception_score(logits: torch.Tensor, split_size: int = ADM_IS_SPLIT) -> float:
    """IS of logits [N, C] (float; softmax taken here, in float64)."""
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"expected logits [N >= 1, C], got {tuple(logits.shape)}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    log_p = torch.log_softmax(logits.double(), dim=1)  # log p(y|x) [N, C]
    scores = []
    for part in log_p.split(split_size):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log p(y) [C]
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)  # KL(p(y|x) || p(y)) [n]
        scores.append(float(kl.mean().exp()))
    return sum(scores) / len(scores)


def _blocks(x: torch.Tensor, block: int):
    for start in range(0, x.shape[0], block):
        yield start, x[start : start + block]


def knn_radii(features: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Distance of each row [N, D] to its k-th nearest other row -> [N] (float64)."""
    f = torch.as_tensor(features).double()
    if f.ndim != 2 or f.shape[0] <= k:
        raise ValueError(f"need more than k={k} features [N, D] for k-NN radii, got {tuple(f.shape)}")
    radii = torch.empty(f.shape[0], dtype=torch.float64)
    for start, rows in _blocks(f, block):
        d = torch.cdist(rows, f)  # [b, N]; each row's own distance (0) is among them
        radii[start : start + rows.shape[0]] = d.kthvalue(k + 1, dim=1).values  # k+1: skip the row itself
    return radii


def coverage_of(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, block: int = 1024) -> float:
    """Fraction of `queries` [M, D] within radii[i] of some manifold point i ([N, D], radii [N])."""
    m, q = torch.as_tensor(manifold).double(), torch.as_tensor(queries).double()
    inside = 0
    for _, rows in _blocks(q, block):
        d = torch.cdist(rows, m)  # [b, N]
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / q.shape[0]


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` [M, D] against `real` [N, D] (Kynkäänniemi, k-NN)."""
    real, fake = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features [N, D] with the same D expected, got {tuple(real.shape)} and {tuple(fake.shape)}")
    precision = coverage_of(real, knn_radii(real, k, block), fake, block)
    recall = coverage_of(fake, knn_radii(fake, k, block), real, block)
    return precision, recall


__all__ = ["inception_score", "knn_radii", "coverage_of", "precision_recall", "ADM_IS_SPLIT"]
