"""LPIPS perceptual distance (VGG16 trunk, v0.1 linear layers), offline.

Built on the ``lpips`` package: ``lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True)`` loads the v0.1
linear layers shipped inside the package and builds a randomly initialised VGG16 trunk (so torchvision does
not download anything); the ImageNet VGG16 trunk weights are then loaded from the file resolved by
:func:`tokenizer.weights.resolve_vgg16_weights` (torch hub cache ``vgg16-397923af.pth`` or the converted
``lpips_vgg16_backbone.safetensors``; create it with ``make weights``). A missing file raises
``FileNotFoundError``; the only way to get a random trunk is ``random_backbone_for_tests=True``.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn

from tokenizer.weights import load_vgg16_features_state_dict

# lpips' vgg16 wrapper splits torchvision ``vgg16().features`` into 5 slices, keeping the feature indices.
_VGG_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


def _features_to_lpips_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    slice_of = {i: s for s, idx in _VGG_SLICES for i in idx}
    out = {}
    for k, v in sd.items():
        _, i, name = k.split(".")  # features.{i}.{weight|bias}
        out[f"slice{slice_of[int(i)]}.{i}.{name}"] = v
    return out


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG (v0.1). ``forward(x, y)``: images in [-1, 1], [B, 3, H, W] -> distances [B].

    Gradients flow to the inputs (usable as a loss); the parameters never train and the module stays in
    eval mode even when a parent calls ``.train()``. Weights and inputs are channels_last (NHWC), the layout
    cuDNN's tensor-core and oneDNN's convolutions run in: NCHW would be transposed around every convolution. The
    parameters are frozen and never saved or optimised, so their layout is nobody else's concern.
    """

    def __init__(self, random_backbone_for_tests: bool = False):
        super().__init__()
        import lpips

        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation notice
            # pnet_rand: random VGG trunk, nothing downloaded. pretrained: packaged v0.1 linear layers.
            self.net = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        self.random_backbone = bool(random_backbone_for_tests)
        if not self.random_backbone:
            sd = _features_to_lpips_keys(load_vgg16_features_state_dict())
            self.net.net.load_state_dict(sd, strict=True)
        self.requires_grad_(False)
        self.to(memory_format=torch.channels_last)  # the 4-d conv weights; a 1-d bias has no layout
        super().train(False)

    def train(self, mode: bool = True) -> LPIPS:
        """Always stays in eval mode (dropout in the linear layers must stay off)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"expected two [B, 3, H, W] tensors of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))  # [B, 3, H, W] stored NHWC
        return self.net(x, y, normalize=False).reshape(x.shape[0])


_CACHE: dict[str, LPIPS] = {}


def cached_lpips(device: torch.device | str = "cpu") -> LPIPS:
    """The pretrained LPIPS-VGG, one cached instance per device (loading the VGG trunk costs seconds)."""
    key = str(torch.device(device))
    if key not in _CACHE:
        _CACHE[key] = LPIPS().to(device)
    return _CACHE[key]


@torch.no_grad()
def lpips_metric(x: torch.Tensor, y: torch.Tensor, model: LPIPS | None = None) -> torch.Tensor:
    """LPIPS distances [B] for images in [0, 1] (evaluation helper; no gradients).

    Uses ``model`` if given, else the cached pretrained :class:`LPIPS` of the images' device.
    """
    model = cached_lpips(x.device) if model is None else model
    return model(x * 2 - 1, y * 2 - 1)
