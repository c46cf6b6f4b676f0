"""gFID: FID of N generated samples per token count k against a reference set (FID Inception, offline).

    # reference statistics once (an image source -> mu/sigma .npz, the ADM reference-batch keys)
    python -m eval.gfid --ref-source photos --ref-num 5000 --save-ref-stats checkpoints/ref_sample64.npz \\
        --image-size 64
    # generate N samples per k (accelerate: every process samples its share) and score them
    accelerate launch -m eval.gfid --checkpoint checkpoints/demo-generator/ckpt/last.ckpt \\
        --tokenizer checkpoints/demo/tokenizer --num-samples 5000 --num-tokens 4 8 16 32 \\
        --ref-stats checkpoints/ref_sample64.npz --out checkpoints/demo-generator/gfid
    # score existing sample sets (eval.sample_generator's samples_k*.npz, or any ADM-format .npz)
    python -m eval.gfid --samples OUT/samples_k008.npz OUT/samples_k032.npz --ref-source folder --ref-root VAL

Reference (exactly one):
- ``--ref-batch VIRTUAL_imagenet256_labeled.npz``: guided-diffusion's ImageNet 256 reference batch (the field's
  protocol; see docs/generator.md for where it comes from). Its ``mu``/``sigma`` are the reference statistics as
  given; its images ``arr_0`` (uint8 [10000, 256, 256, 3]) give the reference features of precision/recall
  (computed only for those). Any npz with ``arr_0`` and/or ``mu``/``sigma`` is read the same way;
- ``--ref-stats FILE.npz`` with ``mu`` [D] and ``sigma`` [D, D] (what ``--save-ref-stats`` writes);
- ``--ref-npz FILE.npz`` with images ``arr_0`` uint8 [N, H, W, 3] (e.g. an ADM reference batch);
- ``--ref-source photos``: ``--ref-num`` random crops of the embedded training photographs (the demo's data)
  at ``--image-size`` (default: the tokenizer's); ``--ref-source folder --ref-root DIR``: an ImageFolder tree
  through the eval transform (resize + center crop), at most ``--ref-num`` images.

Features: ``tokenizer.inception`` (torch-fidelity's TF-FID InceptionV3 with the converted weights; images
resized to 299 inside; create the weights with ``make weights`` / ``python scripts/fetch_weights.py``). Frechet
distance in float64. Per k the table also has the Inception Score when the Inception has its logits layer (the
hub file does; the converted ``fid_inception_v3.safetensors`` has no ``fc``, and then IS is left out, said in
the output, never computed from made-up weights) and precision/recall (k-NN manifolds, k = 3, ``eval.fidelity``)
when the reference has images (``--no-precision-recall`` skips them). Features are computed on the main process,
in fp32; sampling is distributed (see
``eval.sample_generator``; ``--precision fp32|bf16`` is its autocast for the GPT and the decoder, default bf16
on CUDA). Results: ``gfid.json`` and ``gfid.md`` in ``--out`` and a table on stdout. ``--out`` is written as a
whole (``eval.outputs``): when sampling, the sample sets and the results form one directory that replaces an
earlier run's (an ``--out`` holding other files is refused, nothing is deleted); with ``--samples`` the two
result files replace the earlier two together and everything else in ``--out`` stays.

``--num-tokens 8 16 natural``: the row "natural" scores samples that stopped at the generator's own end token
(a GPT trained with ``end_token: true``), beside fixed k; every row also gives the generated lengths (mean,
median, histogram: ``eval/generated_lengths.py``), the natural row's mean in its label.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.token_format import length_stats  # noqa: E402
from eval.fidelity import inception_score, precision_recall  # noqa: E402
from eval.generated_lengths import NATURAL, k_order, npz_lengths, parse_num_tokens  # noqa: E402
from eval.outputs import check_out_dir, owned_by, shared_output_directory  # noqa: E402
from tokenizer.atomic import atomic_directory, atomic_open, write_json, write_text  # noqa: E402
from tokenizer.errors import run_command  # noqa: E402
from tokenizer.inception import feature_statistics, frechet_distance  # noqa: E402
from tokenizer.precision import autocast, resolve_precision  # noqa: E402

GFID_FILES = owned_by(r"gfid\.(md|json)")  # what a gFID run writes in --out (besides the samples it generates)

# uint8 images [B, 3, H, W] -> pool features [B, D], or {"pool": [B, D], "logits": [B, C]} (logits for IS)
FeatureExtractor = Callable[[torch.Tensor], torch.Tensor | dict]
NO_LOGITS = ("the offline FID Inception (converted weights) has no logits layer, so no Inception Score: put "
             "torch-fidelity's weights-inception-2015-12-05-6726825d.pth in $TORCH_HOME/hub/checkpoints for IS")


PROTOCOL = ("FID/IS/precision/recall as guided-diffusion's evaluator: TF-FID InceptionV3 (torch-fidelity port, "
            "299 px bilinear resize), 2048-d pool features, float64 Frechet distance; IS over chunks of 5000; "
            "precision/recall k-NN manifolds, k = 3, against the reference images")


@torch.no_grad()
def inception_extractor(device: str | torch.device = "cpu", batch_size: int = 64) -> FeatureExtractor:
    """Pool features, plus the unbiased logits (ADM's IS input) when the loaded weights have a real fc layer."""
    from tokenizer.inception import load_fid_inception

    model = load_fid_inception(device)
    has_logits = not torch.isnan(model.fc.weight).any()  # NaN-filled when the weight file has no fc
    model.features_list = ["2048", "logits_unbiased"] if has_logits else ["2048"]

    @torch.no_grad()
    def extract(images: torch.Tensor) -> dict:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
        with autocast("fp32", device):  # IEEE fp32, also on a GPU (TF32 off) and inside an outer autocast
            outs = [model(chunk.to(device)) for chunk in images.split(batch_size)]
        result = {"pool": torch.cat([o[0] for o in outs]).double().cpu()}
        if has_logits:
            result["logits"] = torch.cat([o[1] for o in outs]).double().cpu()
        return result

    return extract


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


def source_images(source, batch_size: int = 64, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, S, S] batches of a ``data.sources`` source, in its order (one process: the main one)."""
    from data.sources import ImageLoader, process_dataset

    for batch in ImageLoader(process_dataset(source), batch_size, num_workers):
        yield batch.images


def photo_crop_images(
    num: int, image_size: int, seed: int = 1, batch_size: int = 256
) -> Iterator[torch.Tensor]:
    """`num` random crops of the embedded training photographs (``data.sources.PhotoCrops``) as uint8."""
    from data.sources import PhotoCrops

    return source_images(PhotoCrops(image_size, num, seed), batch_size)


def folder_images(root: str, image_size: int, limit: int | None = None, batch_size: int = 64,
                  num_workers: int = 0) -> Iterator[torch.Tensor]:  # fmt: skip
    """An ImageFolder tree through the eval transform (resize + center crop), as uint8."""
    from data.sources import FolderImages

    return source_images(FolderImages(root, image_size, limit=limit or None), batch_size, num_workers)


def features_of(batches: Iterable[torch.Tensor], extractor: FeatureExtractor) -> dict[str, torch.Tensor]:
    """{"pool": [N, D] float64, and "logits": [N, C] when the extractor gives them}."""
    parts: dict[str, list[torch.Tensor]] = {}
    for b in batches:
        out = extractor(b)
        for name, t in (out if isinstance(out, dict) else {"pool": out}).items():
            parts.setdefault(name, []).append(t.double().cpu())
    if not parts:
        raise ValueError("no images")
    return {name: torch.cat(ts) for name, ts in parts.items()}


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **info) -> Path:
    path = Path(path)
    with atomic_open(path) as f:
        np.savez(f, mu=mu, sigma=sigma, info=json.dumps(info))
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path}: reference statistics need 'mu' and 'sigma'; keys {list(z.keys())}")
        return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)


@dataclass
class Reference:
    mu: np.ndarray  # [D]
    sigma: np.ndarray  # [D, D]
    description: str
    features: torch.Tensor | None = None  # pool features [N, D] of the reference images, for precision/recall


def read_ref_batch(path: str | Path) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
    """(mu, sigma) of an ADM-format reference batch (None when absent) and whether it holds images arr_0."""
    with np.load(path) as z:
        keys = set(z.keys())
        if not ({"mu", "sigma"} <= keys or "arr_0" in keys):
            raise ValueError(f"{path}: an ADM reference batch has 'arr_0' (images) and/or 'mu'/'sigma'; "
                             f"keys {sorted(keys)}")
        stats = (z["mu"].astype(np.float64), z["sigma"].astype(np.float64)) if {"mu", "sigma"} <= keys else (None, None)
        return (*stats, "arr_0" in keys)


def image_source(args: argparse.Namespace, image_size: int | None) -> tuple[Iterable[torch.Tensor] | None, str]:
    """(batches of the reference images or None, description) for the --ref-* flags."""
    given = [x for x in (args.ref_stats, args.ref_npz, args.ref_source, args.ref_batch) if x]
    if len(given) != 1:
        raise SystemExit("give exactly one reference: --ref-batch, --ref-stats, --ref-npz or --ref-source")
    if args.ref_stats:
        return None, f"stats {args.ref_stats}"
    if args.ref_npz or args.ref_batch:
        path = args.ref_npz or args.ref_batch
        if args.ref_batch and not read_ref_batch(path)[2]:
            return None, f"reference batch {path} (statistics only)"
        return npz_images(path, limit=args.ref_num), f"{'reference batch' if args.ref_batch else 'images'} {path}"
    if image_size is None:
        raise SystemExit("--ref-source needs --image-size (or a generator/tokenizer to take it from)")
    if args.ref_source == "photos":
        num = args.ref_num or 5000
        desc = f"{num} embedded training-photo crops at {image_size}px (seed {args.ref_seed})"
        return photo_crop_images(num, image_size, seed=args.ref_seed), desc
    if not args.ref_root:
        raise SystemExit("--ref-source folder needs --ref-root DIR")
    return folder_images(args.ref_root, image_size, args.ref_num), f"folder {args.ref_root} at {image_size}px"


def reference(args: argparse.Namespace, extractor: FeatureExtractor, image_size: int | None,
              need_features: bool) -> Reference:  # fmt: skip
    """The reference chosen by the --ref-* flags. A reference batch's own mu/sigma are used as given (the ADM
    protocol); its images are read only when `need_features` (precision/recall)."""
    batches, desc = image_source(args, image_size)
    if args.ref_stats:
        return Reference(*load_stats(args.ref_stats), desc)
    mu = sigma = None
    if args.ref_batch:
        mu, sigma, _ = read_ref_batch(args.ref_batch)
    features = None
    if batches is not None and (mu is None or need_features):
        features = features_of(batches, extractor)["pool"]
        desc += f" ({len(features)} images)"
        if mu is None:
            mu, sigma = (t.numpy() for t in feature_statistics(features))
    if mu is None:
        raise SystemExit(f"{args.ref_batch}: no 'mu'/'sigma' and no images to compute them from")
    if args.save_ref_stats:
        num = None if features is None else len(features)
        save_stats(args.save_ref_stats, mu, sigma, reference=desc, num_images=num)
        print(f"reference statistics -> {args.save_ref_stats}")
    return Reference(mu, sigma, desc, features if need_features else None)


def gfid(samples: dict[int | str, str | Path], ref: Reference, extractor: FeatureExtractor) -> dict[int | str, dict]:
    """{k: {"fid", "inception_score" (None without logits), "precision", "recall" (None without reference
    features), "num_samples", "samples", "lengths" (stats of the stored lengths, None when the file has none)}}
    for ADM-format sample npz files; k is a token count or "natural"."""
    rows = {}
    for k, path in sorted(samples.items(), key=lambda kv: k_order(kv[0])):
        lengths = npz_lengths(path)
        f = features_of(npz_images(path), extractor)
        mu, sigma = feature_statistics(f["pool"])
        p_r = (None, None)  # precision/recall need reference features and more than k = 3 points on each side
        if ref.features is not None and min(len(ref.features), len(f["pool"])) > 3:
            p_r = precision_recall(ref.features, f["pool"])
        rows[k] = {
            "fid": frechet_distance(mu, sigma, ref.mu, ref.sigma),
            "inception_score": inception_score(f["logits"]) if "logits" in f else None,
            "precision": p_r[0],
            "recall": p_r[1],
            "num_samples": len(f["pool"]),
            "samples": str(path),
            "lengths": None if lengths is None else length_stats(lengths),
        }
    return rows


def _k_of(path: str) -> int | str:
    """k from a samples_k<k>.npz name, "natural" from samples_natural.npz (0 when the name does not say)."""
    if NATURAL in os.path.basename(path):
        return NATURAL
    m = re.search(r"k(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else 0


def fmt_metric(x: float | None, digits: int) -> str:
    """A table cell: the value to `digits` decimals, "-" when absent."""
    return "-" if x is None else f"{x:.{digits}f}"


def k_label(k: int | str, row: dict) -> str:
    """A table's k cell: the count, or "natural (mean L)" for samples that stopped at their end token."""
    lengths = row.get("lengths")
    return f"{NATURAL} (mean {lengths['mean']:.1f})" if k == NATURAL and lengths else str(k)


def markdown(rows: dict[int | str, dict], reference: str) -> str:
    lines = [f"gFID against {reference}", "", "| k tokens | samples | gFID | IS | precision | recall |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for k, r in sorted(rows.items(), key=lambda kv: k_order(kv[0])):
        lines.append(f"| {k_label(k, r)} | {r['num_samples']} | {r['fid']:.2f} | "
                     f"{fmt_metric(r.get('inception_score'), 1)} | {fmt_metric(r.get('precision'), 3)} | "
                     f"{fmt_metric(r.get('recall'), 3)} |")  # fmt: skip
    if any(r.get("inception_score") is None for r in rows.values()):
        lines += ["", f"IS: -, {NO_LOGITS}."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from eval.sample_generator import add_model_args, add_sampling_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="+", help="existing ADM-format sample npz files (samples_k<k>.npz)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--num-samples", type=int, default=5000, help="samples per k when generating")
    p.add_argument("--num-tokens", type=parse_num_tokens, nargs="+",
                   help="token counts k and/or 'natural' when generating (default 1, 2, 4, .., K (+ natural))")
    p.add_argument("--batch-size", type=int, default=64, help="sampling batch per process")
    p.add_argument("--ref-batch", help="ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz (mu/sigma + arr_0)")
    p.add_argument("--ref-stats", help="reference mu/sigma .npz")
    p.add_argument("--ref-npz", help="reference images .npz (arr_0 uint8 [N, H, W, 3])")
    p.add_argument("--ref-source", choices=("photos", "folder"), help="reference image source")
    p.add_argument("--ref-root", help="--ref-source folder: ImageFolder root")
    p.add_argument("--ref-num", type=int, help="reference images (photos: default 5000; others: all)")
    p.add_argument("--ref-seed", type=int, default=1, help="--ref-source photos: crop seed")
    p.add_argument("--save-ref-stats", help="write the reference mu/sigma here")
    p.add_argument("--image-size", type=int, help="reference image size (default: the tokenizer's)")
    p.add_argument("--no-precision-recall", action="store_true", help="skip precision/recall (no reference images)")
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
    if generating:
        if not args.out:
            raise SystemExit("--out is required when generating samples")
        return sample_and_score(args, extractor)
    samples, image_size = {}, args.image_size
    if args.samples:
        samples = {_k_of(p): p for p in args.samples}
        if len(samples) != len(args.samples):
            raise SystemExit("--samples: name the files samples_k<k>.npz with a different k each")
        if image_size is None:
            image_size = next(npz_images(args.samples[0], batch_size=1)).shape[-1]
    if not (samples and args.out):
        return score(args, samples, extractor, image_size)
    # gfid.md and gfid.json replace those of an earlier run together; the rest of --out (the samples) is kept
    with atomic_directory(args.out, GFID_FILES) as staging:
        return score(args, samples, extractor, image_size, out=staging)


def sample_and_score(args, extractor: FeatureExtractor | None) -> dict:
    """Sample the evaluation sets into --out and score them: the samples and gfid.md/json are written as one
    whole directory (eval.outputs), which replaces an earlier run's and refuses an --out holding other files."""
    from eval.sample_generator import SAMPLING_OUTPUT, sample_eval_sets, sampling_kwargs, setup

    check_out_dir(args.out, SAMPLING_OUTPUT, "eval.gfid")  # the sets and gfid.md/json: what sampling writes
    state, gpt, tok, ks = setup(args)
    sampling = sampling_kwargs(args)
    precision = resolve_precision(args.precision, state.device)  # GPT + decoder; Inception stays fp32
    with shared_output_directory(state, args.out, SAMPLING_OUTPUT) as staging:
        samples = sample_eval_sets(gpt, tok, ks, args.num_samples, staging, state, args.batch_size, args.seed,
                                   ("npz",), not args.no_progress, precision, **sampling)  # fmt: skip
        if not state.is_main_process:
            return {}
        image_size = args.image_size or tok.image_size
        del gpt, tok
        final = {k: str(Path(args.out) / Path(p).relative_to(staging)) for k, p in samples.items()}
        return score(args, samples, extractor, image_size, state, precision, staging, final)


def score(args, samples: dict, extractor: FeatureExtractor | None, image_size: int | None, state=None,
          precision: str | None = None, out: Path | None = None, recorded: dict | None = None) -> dict:
    """gFID of `samples` ({k: npz}) against the reference of `args`; gfid.md and gfid.json into `out` (if given),
    with the sample paths `recorded` ({k: path}, default: the paths read)."""
    if extractor is None:
        device = state.device if state is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        extractor = inception_extractor(device)
    ref = reference(args, extractor, image_size, need_features=bool(samples) and not args.no_precision_recall)
    result: dict = {"reference": ref.description, "rows": {}}
    if precision is not None:
        result["sampling_precision"] = precision
    if samples:
        rows = gfid(samples, ref, extractor)
        for k, path in (recorded or {}).items():
            rows[k]["samples"] = path
        result["rows"] = rows
        result["protocol"] = PROTOCOL
        table = markdown(rows, ref.description)
        print(table)
        if out is not None:
            write_text(out / "gfid.md", table + "\n")
            write_json(out / "gfid.json", result)
    elif not args.save_ref_stats:
        raise SystemExit("nothing to do: give --samples or a generator, or --save-ref-stats")
    return result


if __name__ == "__main__":
    run_command("eval.gfid", main)
