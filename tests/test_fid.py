"""Frechet distance math (vs scipy.linalg.sqrtm) and the real FID Inception, offline."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision.transforms.functional as TF

from tokenizer import weights
from tokenizer.inception import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_features,
    load_fid_inception,
)


def _have_inception() -> bool:
    try:
        weights.resolve_inception_weights()
        return True
    except FileNotFoundError:
        return False


needs_inception = pytest.mark.skipif(
    not _have_inception(),
    reason=f"FID Inception weights absent ({weights.inception_weights_path()}); run `make weights`",
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


@needs_inception
@pytest.mark.slow
def test_real_inception_fid():
    model = load_fid_inception()
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
    assert fid_blur > 10


@needs_inception
@pytest.mark.slow
def test_gfid_extractor_gives_logits_only_with_a_real_fc_layer():
    """eval.gfid's extractor: the same pool features as inception_features; IS logits only when the weight file
    has the fc layer (torch-fidelity's hub file), never from the NaN placeholder of the converted file."""
    from eval.gfid import inception_extractor

    has_fc = "fc.weight" in weights.load_inception_state_dict()
    x = _photo_crops()[:4]
    out = inception_extractor("cpu")(x)
    torch.testing.assert_close(out["pool"], inception_features(x, load_fid_inception()))
    assert ("logits" in out) == has_fc
    if has_fc:
        assert out["logits"].shape == (4, 1008) and torch.isfinite(out["logits"]).all()
