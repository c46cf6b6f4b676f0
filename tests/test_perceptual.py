"""LPIPS (VGG16, v0.1) with the real converted backbone; missing weights; random trunk only on request."""

import pytest
import torch
import torchvision.transforms.functional as TF

from tokenizer import weights
from tokenizer.perceptual import LPIPS


def _have_vgg() -> bool:
    try:
        weights.resolve_vgg16_weights()
        return True
    except FileNotFoundError:
        return False


needs_vgg = pytest.mark.skipif(
    not _have_vgg(), reason=f"LPIPS VGG16 weights absent ({weights.vgg16_weights_path()}); run `make weights`"
)


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 127.5 - 1  # [-1, 1]
    return TF.resize(img, [128, 128], antialias=True)[None]


@pytest.fixture(scope="module")
def lpips_model() -> LPIPS:
    return LPIPS()


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty weights dir and empty torch hub cache."""
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


@needs_vgg
def test_identical_images_zero(lpips_model, astronaut):
    with torch.no_grad():
        d = lpips_model(astronaut, astronaut.clone())
    assert d.shape == (1,)
    assert d.abs().item() < 1e-6


@needs_vgg
def test_grows_with_blur(lpips_model, astronaut):
    x = astronaut.expand(3, -1, -1, -1)
    y = torch.cat([TF.gaussian_blur(astronaut, kernel_size=25, sigma=s) for s in (1.0, 2.0, 4.0)])
    with torch.no_grad():
        d = lpips_model(x, y)
    print("LPIPS blur sigma 1/2/4:", d.tolist())
    assert d.shape == (3,)
    assert 0.01 < d[0] < d[1] < d[2]


@needs_vgg
def test_frozen_and_stays_eval(lpips_model, astronaut):
    parent = torch.nn.Sequential(lpips_model)
    parent.train()
    assert not lpips_model.training and not any(m.training for m in lpips_model.modules())
    assert not any(p.requires_grad for p in lpips_model.parameters())
    x = astronaut[..., :64, :64].clone().requires_grad_(True)
    lpips_model(x, torch.zeros_like(x)).sum().backward()  # usable as a loss: gradients reach the input
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_missing_weights_raise(no_weights):
    with pytest.raises(FileNotFoundError) as exc:
        LPIPS()
    msg = str(exc.value)
    assert str(no_weights / "weights" / weights.VGG16_FILENAME) in msg
    assert "make weights" in msg and "python scripts/fetch_weights.py" in msg


def test_random_backbone_only_with_flag(no_weights):
    m = LPIPS(random_backbone_for_tests=True)
    assert m.random_backbone
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert m(x, x.flip(0)).shape == (2,)


def test_hub_cache_takes_precedence(no_weights):
    hub = weights.vgg16_hub_path()
    assert hub == no_weights / "torch_home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    converted = weights.vgg16_weights_path()
    converted.parent.mkdir(parents=True)
    converted.touch()
    assert weights.resolve_vgg16_weights() == converted
    hub.parent.mkdir(parents=True)
    hub.touch()
    assert weights.resolve_vgg16_weights() == hub


def test_weights_dir_default_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(weights.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert weights.weights_dir() == tmp_path / "onedtok" / "weights"
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "w"))
    assert weights.weights_dir() == tmp_path / "w"
