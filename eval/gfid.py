"""gFID: FID of N generated samples per token count k against a reference set (FID Inception, offline).

    # reference statistics once (an image source -> mu/sigma .npz, the ADM reference-batch keys)
    python -m eval.gfid --ref-source sample --ref-num 5000 --save-ref-stats checkpoints/ref_sample64.npz \\
        --image-size 64
    # generate N samples per k (accelerate: every process samples its share) and score them
    accelerate launch -m eval.gfid --checkpoint checkpoints/demo-generator/ckpt/last.ckpt \\
        --tokenizer checkpoints/demo/tokenizer --num-samples 5000 --num-tokens 4 8 16 32 \\
        --ref-stats checkpoints/ref_sample64.npz --out checkpoints/demo-generator/gfid
    # score existing sample sets (eval.sample_generator's samples_k*.npz, or any ADM-format .npz)
    python -m eval.gfid --samples OUT/samples_k008.npz OUT/samples_k032.npz --ref-source folder --ref-root VAL

Reference (exactly one):
- ``--ref-stats FILE.npz`` with ``mu`` [D] and ``sigma`` [D, D] (what ``--save-ref-stats`` writes; an ADM
  reference batch has them too);
- ``--ref-npz FILE.npz`` with images ``arr_0`` uint8 [N, H, W, 3] (e.g. an ADM reference batch);
- ``--ref-source sample``: ``--ref-num`` random crops of the embedded training photographs (the demo's data)
  at ``--image-size`` (default: the tokenizer's); ``--ref-source folder --ref-root DIR``: an ImageFolder tree
  through the eval transform (resize + center crop), at most ``--ref-num`` images.

Features: ``tokenizer.inception`` (torch-fidelity's TF-FID InceptionV3 with the converted weights; images
resized to 299 inside; create the weights with ``make weights`` / ``python -m tokenizer.weights``). Frechet
distance in float64. Features are computed on the main process, in fp32; sampling is distributed (see
``eval.sample_generator``; ``--precision fp32|bf16`` is its autocast for the GPT and the decoder, default bf16
on CUDA). Results: ``gfid.json`` and ``gfid.md`` in ``--out`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizer.inception import feature_statistics, frechet_distance  # noqa: E402
from tokenizer.precision import resolve_precision  # noqa: E402

# uint8 images [B, 3, H, W] -> features [B, D]
FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


def inception_extractor(device: str | torch.device = "cpu", batch_size: int = 64) -> FeatureExtractor:
    from tokenizer.inception import inception_features, load_fid_inception

    model = load_fid_inception(device)
    return lambda images: inception_features(images, model, batch_size=batch_size)


# ---- image sources: uint8 [B, 3, H, W] batches ------------------------------------------------------------
def npz_images(path: str | Path, batch_size: int = 256, limit: int | None = None) -> Iterator[torch.Tensor]:
    """Batches of an ADM-format npz (arr_0 uint8 [N, H, W, 3])."""
    with np.load(path) as z:
        if "arr_0" not in z:
            raise ValueError(f"{path}: no arr_0 (images uint8 [N, H, W, 3]); keys {list(z.keys())}")
        arr = z["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {arr.dtype} {arr.shape}")
    arr = arr[:limit] if limit else arr
    for i in range(0, len(arr), batch_size):
        yield torch.from_numpy(arr[i : i + batch_size]).permute(0, 3, 1, 2).contiguous()


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def sample_source_images(
    num: int, image_size: int, seed: int = 1, batch_size: int = 256
) -> Iterator[torch.Tensor]:
    """`num` random crops of the embedded training photographs (data.extract_tokens.SampleCrops) as uint8."""
    from data.extract_tokens import SampleCrops

    crops = SampleCrops(image_size, num, seed=seed)
    for i in range(0, num, batch_size):
        yield _to_uint8(torch.stack([crops[j][0] for j in range(i, min(i + batch_size, num))]))


def folder_images(root: str, image_size: int, limit: int | None = None, batch_size: int = 64,
                  num_workers: int = 0) -> Iterator[torch.Tensor]:  # fmt: skip
    """An ImageFolder tree through the eval transform (resize + center crop), as uint8."""
    from data.extract_tokens import FolderImages, _batches_from_dataset
    from data.folder import scan_image_folder

    _, items = scan_image_folder(root)
    if limit:
        items = items[:limit]
    for images, _, _ in _batches_from_dataset(FolderImages(root, items, image_size), batch_size, num_workers):
        yield _to_uint8(images)


def features_of(batches: Iterable[torch.Tensor], extractor: FeatureExtractor) -> torch.Tensor:
    feats = [extractor(b).double().cpu() for b in batches]
    if not feats:
        raise ValueError("no images")
    return torch.cat(feats)


def statistics_of(
    batches: Iterable[torch.Tensor], extractor: FeatureExtractor
) -> tuple[np.ndarray, np.ndarray, int]:
    f = features_of(batches, extractor)
    mu, sigma = feature_statistics(f)
    return mu.numpy(), sigma.numpy(), len(f)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **info) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, info=json.dumps(info))
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path}: reference statistics need 'mu' and 'sigma'; keys {list(z.keys())}")
        return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)


def reference_stats(args: argparse.Namespace, extractor: FeatureExtractor, image_size: int | None):
    """(mu, sigma, description) of the reference chosen by the --ref-* flags."""
    given = [x for x in (args.ref_stats, args.ref_npz, args.ref_source) if x]
    if len(given) != 1:
        raise SystemExit("give exactly one reference: --ref-stats, --ref-npz or --ref-source")
    if args.ref_stats:
        mu, sigma = load_stats(args.ref_stats)
        return mu, sigma, f"stats {args.ref_stats}"
    if args.ref_npz:
        batches, desc = npz_images(args.ref_npz, limit=args.ref_num), f"images {args.ref_npz}"
    else:
        if image_size is None:
            raise SystemExit("--ref-source needs --image-size (or a generator/tokenizer to take it from)")
        if args.ref_source == "sample":
            num = args.ref_num or 5000
            batches = sample_source_images(num, image_size, seed=args.ref_seed)
            desc = f"{num} embedded training-photo crops at {image_size}px (seed {args.ref_seed})"
        else:
            if not args.ref_root:
                raise SystemExit("--ref-source folder needs --ref-root DIR")
            batches = folder_images(args.ref_root, image_size, args.ref_num)
            desc = f"folder {args.ref_root} at {image_size}px"
    mu, sigma, n = statistics_of(batches, extractor)
    desc += f" ({n} images)"
    if args.save_ref_stats:
        save_stats(args.save_ref_stats, mu, sigma, reference=desc, num_images=n)
        print(f"reference statistics -> {args.save_ref_stats}")
    return mu, sigma, desc


def gfid(samples: dict[int, str | Path], ref_mu: np.ndarray, ref_sigma: np.ndarray,
         extractor: FeatureExtractor) -> dict[int, dict]:  # fmt: skip
    """{k: {"fid": float, "num_samples": N, "samples": path}} for ADM-format sample npz files."""
    rows = {}
    for k, path in sorted(samples.items()):
        mu, sigma, n = statistics_of(npz_images(path), extractor)
        rows[k] = {
            "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
            "num_samples": n,
            "samples": str(path),
        }
    return rows


def _k_of(path: str) -> int:
    """k from a samples_k<k>.npz name (0 when the name does not say)."""
    m = re.search(r"k(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else 0


def markdown(rows: dict[int, dict], reference: str) -> str:
    lines = [f"gFID against {reference}", "", "| k tokens | samples | gFID |", "|---:|---:|---:|"]
    lines += [f"| {k} | {r['num_samples']} | {r['fid']:.2f} |" for k, r in sorted(rows.items())]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from eval.sample_generator import add_model_args, add_sampling_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="+", help="existing ADM-format sample npz files (samples_k<k>.npz)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--num-samples", type=int, default=5000, help="samples per k when generating")
    p.add_argument("--num-tokens", type=int, nargs="+", help="token counts k when generating (default 1..K)")
    p.add_argument("--batch-size", type=int, default=64, help="sampling batch per process")
    p.add_argument("--ref-stats", help="reference mu/sigma .npz")
    p.add_argument("--ref-npz", help="reference images .npz (arr_0 uint8 [N, H, W, 3])")
    p.add_argument("--ref-source", choices=("sample", "folder"), help="reference image source")
    p.add_argument("--ref-root", help="--ref-source folder: ImageFolder root")
    p.add_argument("--ref-num", type=int, help="reference images (sample: default 5000; others: all)")
    p.add_argument("--ref-seed", type=int, default=1, help="--ref-source sample: crop seed")
    p.add_argument("--save-ref-stats", help="write the reference mu/sigma here")
    p.add_argument("--image-size", type=int, help="reference image size (default: the tokenizer's)")
    p.add_argument("--out", help="output directory (generated samples, gfid.json, gfid.md)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None, extractor: FeatureExtractor | None = None) -> dict:
    """Returns {"reference": ..., "rows": {k: {...}}} on the main process ({} elsewhere). `extractor`
    replaces the Inception features (tests)."""
    args = build_parser().parse_args(argv)
    generating = bool(args.checkpoint or args.gpt)
    if generating and args.samples:
        raise SystemExit("give either --samples or a generator (--checkpoint/--gpt), not both")
    image_size, samples, state, precision = args.image_size, {}, None, None
    if generating:
        from eval.sample_generator import sample_eval_sets, sampling_kwargs, setup

        if not args.out:
            raise SystemExit("--out is required when generating samples")
        state, gpt, tok, ks = setup(args)
        image_size = image_size or tok.image_size
        sampling = sampling_kwargs(args)
        precision = resolve_precision(args.precision, state.device)  # GPT + decoder; Inception stays fp32
        samples = sample_eval_sets(gpt, tok, ks, args.num_samples, Path(args.out), state, args.batch_size,
                                   args.seed, ("npz",), not args.no_progress, precision,
                                   **sampling)  # fmt: skip
        if not state.is_main_process:
            return {}
        del gpt, tok
    elif args.samples:
        samples = {_k_of(p): p for p in args.samples}
        if len(samples) != len(args.samples):
            raise SystemExit("--samples: name the files samples_k<k>.npz with a different k each")
        if image_size is None:
            image_size = next(npz_images(args.samples[0], batch_size=1)).shape[-1]
    if extractor is None:
        device = state.device if state is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        extractor = inception_extractor(device)
    ref_mu, ref_sigma, reference = reference_stats(args, extractor, image_size)
    result: dict = {"reference": reference, "rows": {}}
    if precision is not None:
        result["sampling_precision"] = precision
    if samples:
        rows = gfid(samples, ref_mu, ref_sigma, extractor)
        result["rows"] = rows
        table = markdown(rows, reference)
        print(table)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "gfid.md").write_text(table + "\n")
            (out / "gfid.json").write_text(json.dumps(result, indent=2))
    elif not args.save_ref_stats:
        raise SystemExit("nothing to do: give --samples or a generator, or --save-ref-stats")
    return result


if __name__ == "__main__":
    main()
