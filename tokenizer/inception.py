"""FID with the TensorFlow-FID InceptionV3 (torch-fidelity port), offline; Frechet distance in float64.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the module torchmetrics'
``FrechetInceptionDistance`` uses) with weights from :func:`tokenizer.weights.resolve_inception_weights`
(torch hub cache ``weights-inception-2015-12-05-6726825d.pth`` or the converted
``fid_inception_v3.safetensors``; create it with ``make weights``). Nothing is downloaded.

Preprocessing is torch-fidelity's: uint8 images of any size are resized to 299x299 with its TF1-compatible
bilinear interpolation (no antialias, identical to ``FrechetInceptionDistance(antialias=False)``), then
mapped to ``(x - 128) / 128``. Features are the 2048-d average-pool output.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from tokenizer.weights import load_inception_state_dict


def load_fid_inception(device: torch.device | str = "cpu") -> torch.nn.Module:
    """torch-fidelity ``FeatureExtractorInceptionV3`` (features ``"2048"``), real FID weights, eval mode.

    The converted file has no ``fc`` layer (FID needs only the pool features); ``fc`` is then filled with NaN
    so that any accidental use of ``"logits"`` is obviously wrong rather than silently random.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    sd = load_inception_state_dict()
    if "fc.weight" not in sd:
        sd["fc.weight"] = torch.full((1008, 2048), float("nan"))
        sd["fc.bias"] = torch.full((1008,), float("nan"))
    # torch-fidelity's constructor passes its weights "path" to torch.load (then a strict load_state_dict);
    # hand it an in-memory buffer of the tensors read above (our own bytes), so it never goes to the network.
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def inception_features(
    images_uint8: torch.Tensor, model: torch.nn.Module | None = None, batch_size: int = 32
) -> torch.Tensor:
    """2048-d FID features, float64 [B, 2048], for uint8 images [B, 3, H, W] (resized to 299 internally)."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise ValueError(
            f"expected uint8 [B, 3, H, W] images, got {images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    if model is None:
        model = load_fid_inception(images_uint8.device)
    device = next(model.parameters()).device
    feats = [model(chunk.to(device))[0].double() for chunk in images_uint8.split(batch_size)]
    return torch.cat(feats).cpu()


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (divisor N-1, as pytorch-fid/torchmetrics) in float64."""
    f = torch.as_tensor(features).double()
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"expected [N >= 2, D] features, got {tuple(f.shape)}")
    mu = f.mean(0)
    fc = f - mu
    sigma = fc.T @ fc / (f.shape[0] - 1)
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

        d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

    The trace term avoids a non-symmetric matrix square root (scipy ``sqrtm``, which needs an eps offset when
    the product is singular). Write sigma1 = R R^T with R = V_r diag(sqrt(w_r)) from the symmetric
    eigendecomposition sigma1 = V diag(w) V^T, keeping the r eigenvalues above the numerical-rank threshold
    ``w_max * D * eps``. The nonzero eigenvalues of sigma1 sigma2 = R (R^T sigma2) equal those of the
    symmetric PSD r x r matrix M = R^T sigma2 R, so tr((sigma1 sigma2)^{1/2}) = sum_i sqrt(lambda_i(M))
    (round-off negatives clamped to 0). This is exact for rank-deficient covariances (fewer samples than
    dimensions): the null space of sigma1 contributes nothing, instead of D - r noisy roots of round-off.
    Cost: one D x D ``eigh`` plus one r x r ``eigvalsh`` (a few seconds on CPU for D = 2048).
    """
    mu1, mu2 = torch.as_tensor(mu1).double(), torch.as_tensor(mu2).double()
    s1, s2 = torch.as_tensor(sigma1).double(), torch.as_tensor(sigma2).double()
    d = mu1.numel()
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
            f"sigma {tuple(s1.shape)}/{tuple(s2.shape)}"
        )
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    keep = w > w.max().clamp_min(0) * d * torch.finfo(torch.float64).eps
    r = v[:, keep] * w[keep].sqrt()  # [D, r], r @ r.T == sigma1 (up to round-off)
    m = r.T @ s2 @ r
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


def fid_from_features(features1, features2) -> float:
    """FID between two feature sets [N1, D], [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
