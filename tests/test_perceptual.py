"""LPIPS (VGG16, v0.1) with the real converted backbone; missing weights; random trunk only on request."""

import pytest
import torch
import torchvision.transforms.functional as TF
from _weights_probe import needs_lpips

from tokenizer import weights
from tokenizer.perceptual import LPIPS


def _photo(name: str) -> torch.Tensor:
    """A scikit-image photograph as [1, 3, 128, 128] in [-1, 1]."""
    from skimage import data

    img = torch.from_numpy(getattr(data, name)()[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1
    return TF.resize(img, [128, 128], antialias=True)[None]


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    return _photo("astronaut")


@pytest.fixture(scope="module")
def lpips_model() -> LPIPS:
    return LPIPS()


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty weights dir and empty torch hub cache."""
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


@needs_lpips
def test_identical_images_zero(lpips_model, astronaut):
    with torch.no_grad():
        d = lpips_model(astronaut, astronaut.clone())
    assert d.shape == (1,)
    assert d.abs().item() < 1e-6


# LPIPS of five fixed pairs of real photographs: the astronaut against itself blurred (sigma 1, 2, 4), the astronaut
# against the cat, the cat against the coffee cup. Computed with the reference implementation, the `lpips` package
# (0.1.4): lpips.LPIPS(net="vgg", version="0.1", pretrained=True) with its own VGG16 slicing, the ImageNet trunk
# read from the converted weight file instead of torchvision's download. A random trunk under the same trained
# linear layers gives 0.008-0.21 on these pairs, so it cannot reach them; CPU kernels (AVX2 against AVX-512) move
# them by ~1e-5.
REFERENCE_PAIRS = [("astronaut", 1.0), ("astronaut", 2.0), ("astronaut", 4.0), ("astronaut", "chelsea"),
                   ("chelsea", "coffee")]  # fmt: skip
REFERENCE_LPIPS = [0.1430, 0.3633, 0.5258, 0.6910, 0.6979]


@needs_lpips
def test_real_pairs_match_the_reference_lpips_package(lpips_model):
    x = torch.cat([_photo(a) for a, _ in REFERENCE_PAIRS])
    y = torch.cat([TF.gaussian_blur(_photo(a), kernel_size=25, sigma=b) if isinstance(b, float) else _photo(b)
                   for a, b in REFERENCE_PAIRS])  # fmt: skip
    with torch.no_grad():
        d = lpips_model(x, y)
    print("LPIPS of the reference pairs:", [round(v, 5) for v in d.tolist()])
    torch.testing.assert_close(d, torch.tensor(REFERENCE_LPIPS), rtol=0, atol=1e-3)
    assert d[0] < d[1] < d[2], "more blur, further away"


@needs_lpips
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
