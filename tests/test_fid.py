"""Frechet distance math (vs scipy.linalg.sqrtm) and the real FID Inception, offline."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision.transforms.functional as TF
from _weights_probe import needs_inception

from tokenizer import weights
from tokenizer.inception import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_features,
    load_fid_inception,
)


def _fid_scipy(x: np.ndarray, y: np.ndarray) -> float:
    """Independent reference (pytorch-fid style): scipy sqrtm of sigma1 @ sigma2."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 64))
    mix = rng.normal(size=(64, 64)) / 8
    y = rng.normal(size=(200, 64)) @ (np.eye(64) + mix) + 0.3
    ours, ref = fid_from_features(x, y), _fid_scipy(x, y)
    assert ref > 1
    assert abs(ours - ref) / ref < 1e-3
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_rank_deficient():
    # 20 samples in 64 dims: singular covariances; same set -> 0; shifted copy -> exactly |shift|^2.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 64))
    assert abs(fid_from_features(x, x)) < 1e-8
    shift = np.full(64, 0.5)
    assert fid_from_features(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    # Independent exact reference for singular covariances: with sigma = Xc^T Xc / (n - 1),
    # tr((s1 s2)^{1/2}) is the nuclear norm of Xc1 Xc2^T / (n - 1) (a small n1 x n2 matrix).
    y = rng.normal(size=(30, 64)) * 1.5 + 0.2
    xc, yc = (x - x.mean(0)) / np.sqrt(len(x) - 1), (y - y.mean(0)) / np.sqrt(len(y) - 1)
    nuc = np.linalg.svd(xc @ yc.T, compute_uv=False).sum()
    ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + (xc**2).sum() + (yc**2).sum() - 2 * nuc
    # (square roots of round-off eigenvalues of the r x r matrix leave ~1e-9 relative error)
    assert fid_from_features(x, y) == pytest.approx(ref, rel=1e-7)
    assert fid_from_features(y, x) == pytest.approx(ref, rel=1e-7)


def test_missing_inception_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as exc:
        load_fid_inception()
    msg = str(exc.value)
    assert str(tmp_path / "weights" / weights.INCEPTION_FILENAME) in msg
    assert weights.INCEPTION_HUB_FILENAME in msg and "make weights" in msg


def _photo_crops(size: int = 160) -> torch.Tensor:
    from skimage import data

    g = torch.Generator().manual_seed(0)
    crops = []
    per_image = {
        "astronaut": 2,
        "chelsea": 2,
        "coffee": 2,
        "rocket": 2,
        "hubble_deep_field": 3,
        "immunohistochemistry": 2,
        "retina": 3,
    }  # 16 real photographs (random crops)
    for name, n in per_image.items():
        a = torch.from_numpy(np.ascontiguousarray(getattr(data, name)()[..., :3])).permute(2, 0, 1)
        h, w = a.shape[1:]
        for _ in range(n):
            i = int(torch.randint(0, h - size + 1, (1,), generator=g))
            j = int(torch.randint(0, w - size + 1, (1,), generator=g))
            crops.append(a[:, i : i + size, j : j + size])
    return torch.stack(crops)  # uint8 [16, 3, size, size]


@pytest.fixture(scope="module")
def fid_inception() -> torch.nn.Module:
    return load_fid_inception()


# The real FID Inception's 2048 pool features of one photograph, the cat of skimage.data.chelsea() (uint8 300 x 451,
# resized to 299 inside): their mean and spread, and the five largest in order (the sixth is 1.4804, well apart).
# Random weights give other features altogether (torch-fidelity's initialisation: all near 0; the real tensors with
# their entries shuffled: mean 0.080, other top features); CPU kernels (AVX2 against AVX-512) move these by ~1e-5.
CHELSEA_MEAN_STD = (0.24551, 0.26786)
CHELSEA_TOP5 = {897: 2.01201, 1899: 1.73557, 292: 1.72989, 786: 1.56345, 642: 1.54661}  # feature index: value


@needs_inception
def test_real_inception_features_of_a_photograph_match_pinned_values(fid_inception):
    from skimage import data

    cat = torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1)[None]  # uint8 [1, 3, 300, 451]
    f = inception_features(cat, fid_inception)[0]  # float64 [2048]
    print(f"chelsea: mean {f.mean():.5f}, std {f.std():.5f}, top 5 {f.topk(5).indices.tolist()}")
    assert f.topk(5).indices.tolist() == list(CHELSEA_TOP5)
    torch.testing.assert_close(f[list(CHELSEA_TOP5)], torch.tensor(list(CHELSEA_TOP5.values()), dtype=torch.float64),
                               rtol=0, atol=1e-3)  # fmt: skip
    assert (f.mean().item(), f.std().item()) == pytest.approx(CHELSEA_MEAN_STD, abs=1e-3)


@needs_inception
@pytest.mark.slow
def test_real_inception_fid(fid_inception):
    model = fid_inception
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = _photo_crops()
    xb = TF.gaussian_blur(x.float(), kernel_size=9, sigma=2.0).round().clamp(0, 255).to(torch.uint8)
    f = inception_features(torch.cat([x, xb]), model)
    assert f.shape == (2 * len(x), 2048) and f.dtype == torch.float64
    assert torch.isfinite(f).all() and (f >= 0).all()  # post-ReLU average pool
    fa, fb = f[: len(x)], f[len(x) :]
    fid_same, fid_blur = fid_from_features(fa, fa), fid_from_features(fa, fb)
    print(f"FID(A, A) = {fid_same:.3e}, FID(A, blur(A)) = {fid_blur:.2f}")
    assert abs(fid_same) < 1e-3
    # pinned with the real weights: FID scales with the features, and random networks give anything from 1e-13 to
    # over 1000 here depending on their scale, so a lower bound alone would not tell them apart
    assert fid_blur == pytest.approx(126.55, abs=0.5)


@needs_inception
@pytest.mark.slow
def test_gfid_extractor_gives_logits_only_with_a_real_fc_layer(fid_inception):
    """eval.gfid's extractor: the same pool features as inception_features; IS logits only when the weight file
    has the fc layer (torch-fidelity's hub file), never from the NaN placeholder of the converted file."""
    from eval.gfid import inception_extractor

    has_fc = "fc.weight" in weights.load_inception_state_dict()
    x = _photo_crops()[:4]
    out = inception_extractor("cpu")(x)
    torch.testing.assert_close(out["pool"], inception_features(x, fid_inception))
    assert ("logits" in out) == has_fc
    if has_fc:
        assert out["logits"].shape == (4, 1008) and torch.isfinite(out["logits"]).all()
