"""Reconstruction-evaluation throughput of a tokenizer preset (random weights, random images; speed only).

    PYTHONPATH=. python scripts/bench_eval.py --batch-size 4 --num-tokens 4 16 --no-fid    # tiny, CPU
    PYTHONPATH=. python scripts/bench_eval.py --preset B --num-tokens 32 256 --batch-size 64 --device cuda \
        --precision bf16
    PYTHONPATH=. python scripts/bench_eval.py --released one-d-piece-B-256 --num-tokens 32 256 --batch-size 2 \
        --no-fid --metric-weights random                                                # a converted B, CPU

``--released NAME`` (a tokenizer.released.VARIANTS name) benches the architecture that ``onedtok convert`` builds
for that released model (class token, ln_pre, the legacy layout and the MaskGIT-VQGAN pixel decoder for the
two-stage ones), with random weights: the same speed as the converted weights (docs/released_weights.md).

Times the per-batch work of ``eval.recon_eval.evaluate`` with its own functions (best of ``--repeats``
after a warm-up, the device synchronised around every call):

- ``encode``: the K tokens of a batch (``--precision`` autocast);
- per k, ``encode+decode``: ``reconstruct`` = encode, decode the first k tokens, quantise to uint8;
- ``metrics``: ``image_metrics`` of one reconstruction (PSNR, SSIM, LPIPS against precomputed reference VGG
  features, all fp32) and, separately, the reference-feature pass ``LPIPSReference(refs)`` done once per batch;
- ``fid``: Inception pool features of one batch (``--no-fid`` skips it);
- ``eval_step``: one whole batch as ``evaluate`` does it for all the given k: encode once, reference LPIPS and
  Inception features once, then decode + metrics (+ features) per k; codec baselines excluded.

LPIPS / Inception weights (``--metric-weights``): the real ones when ``tokenizer.weights`` finds them
(``auto``, the default) or demanded (``real``: missing files are an error); otherwise, or with ``random``, a
randomly initialised network of the same architecture: same speed, meaningless values. The JSON says which
was used (``lpips_backbone``, ``fid_backbone``: "real" | "random").

The LAST line printed is one JSON object with every number (images/s = batch size / seconds per batch) and
peak_mem_gb (torch.cuda.max_memory_allocated in 1e9 bytes; null on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.metrics import LPIPSReference  # noqa: E402
from eval.recon_eval import image_metrics, reconstruct  # noqa: E402
from tokenizer import OneDTokenizer, weights  # noqa: E402
from tokenizer.length import powers_of_two_upto  # noqa: E402
from tokenizer.precision import add_precision_arg, autocast, resolve_precision  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernel selection, caches)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def weights_choice(choice: str, resolve) -> str:
    """"real" | "random": with "auto", real when `resolve()` finds the weight file."""
    if choice != "auto":
        return choice
    try:
        resolve()
        return "real"
    except FileNotFoundError:
        return "random"


def lpips_network(choice: str, device: torch.device):
    """(LPIPS module, "real" | "random"): the real VGG trunk when its weights resolve, unless told random."""
    from tokenizer.perceptual import LPIPS

    choice = weights_choice(choice, weights.resolve_vgg16_weights)
    return LPIPS(random_backbone_for_tests=choice == "random").to(device), choice


def inception_network(choice: str, device: torch.device):
    """(FID Inception, "real" | "random"); random = torch-fidelity's architecture with its random init."""
    from tokenizer.inception import load_fid_inception

    choice = weights_choice(choice, weights.resolve_inception_weights)
    if choice == "real":
        return load_fid_inception(device), choice
    net = weights.inception_skeleton()  # the same modules, nothing loaded
    return net.to(device).eval().requires_grad_(False), choice


def build_tokenizer(preset: str, released: str | None) -> OneDTokenizer:
    """The preset's model, or with `released` the converted architecture of that released model (random init)."""
    if released is None:
        return OneDTokenizer.from_preset(preset)
    from tokenizer.released import VARIANTS, tokenizer_config

    if released not in VARIANTS:
        raise SystemExit(f"--released {released!r} is no released model; known: {sorted(VARIANTS)}")
    variant = VARIANTS[released]
    return OneDTokenizer(tokenizer_config(variant.family, variant.reference_config(), released))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tokenizer preset (tokenizer.config.PRESETS)")
    p.add_argument("--released", default=None, metavar="NAME",
                   help="instead of --preset: the converted architecture of a released model "
                        "(tokenizer.released.VARIANTS, e.g. one-d-piece-B-256)")
    p.add_argument("--device", default="cpu")
    add_precision_arg(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-tokens", type=int, nargs="+", help="k values (default 1, 2, 4, ..., K)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--metric-weights", choices=("auto", "real", "random"), default="auto",
                   help="LPIPS VGG and FID Inception weights: real, random init, or real when found (auto)")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="time the FID Inception features too")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    tok = build_tokenizer(args.preset, args.released).to(device).eval().requires_grad_(False)
    name = args.released or args.preset
    k_max, size, b = tok.max_tokens, tok.image_size, args.batch_size
    ks = sorted(set(args.num_tokens or powers_of_two_upto(k_max)))
    if not all(1 <= k <= k_max for k in ks):
        raise SystemExit(f"--num-tokens must be within 1..{k_max} for {name}, got {ks}")
    refs = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=device)  # [b, 3, S, S]
    lpips_net, lpips_backbone = lpips_network(args.metric_weights, device)
    inception, fid_backbone = inception_network(args.metric_weights, device) if args.fid else (None, None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kind = "released" if args.released else "preset"
    print(f"{kind} {name} ({size}px, K={k_max}, {tok.codebook_size} codes), device {device}, precision "
          f"{precision}, batch {b}, best of {args.repeats}, lpips {lpips_backbone}, fid {fid_backbone}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")  # fmt: skip

    def rate(seconds: float) -> float:
        return b / seconds

    def encode():
        with autocast(precision, device):
            return tok.encode(refs.float() / 255, check_inputs=False)  # as eval.recon_eval.reconstruct

    result: dict = dict(bench="eval", preset=None if args.released else args.preset, released=args.released,
                        params=sum(t.numel() for t in tok.parameters()), image_size=size, max_tokens=k_max,
                        codebook_size=tok.codebook_size, device=str(device), precision=precision, batch_size=b,
                        repeats=args.repeats, threads=torch.get_num_threads(), torch=torch.__version__,
                        lpips_backbone=lpips_backbone, fid_backbone=fid_backbone)  # fmt: skip
    with torch.inference_mode():
        s = best_seconds(encode, device, args.repeats)
        result["encode"] = dict(s_per_batch=s, images_per_s=rate(s))
        print(f"{'encode':<16} {'K=' + str(k_max):>7} {1e3 * s:>9.1f} ms/batch {rate(s):>9.1f} images/s")
        rows = []
        for k in ks:
            s = best_seconds(lambda k=k: reconstruct(tok, refs, [k], precision), device, args.repeats)
            rows.append(dict(k=k, encode_decode_s_per_batch=s, encode_decode_images_per_s=rate(s)))
            print(f"{'encode+decode':<16} {'k=' + str(k):>7} {1e3 * s:>9.1f} ms/batch {rate(s):>9.1f} images/s")
        result["rows"] = rows

        _, (rec,) = reconstruct(tok, refs, [ks[-1]], precision)  # one uint8 reconstruction to score
        lpips_ref = LPIPSReference(refs, lpips_net)
        s_ref = best_seconds(lambda: LPIPSReference(refs, lpips_net), device, args.repeats)
        s_metrics = best_seconds(lambda: image_metrics(rec, refs, lpips_ref), device, args.repeats)
        result["metrics"] = dict(
            lpips_reference_s_per_batch=s_ref, lpips_reference_images_per_s=rate(s_ref),
            psnr_ssim_lpips_s_per_batch=s_metrics, psnr_ssim_lpips_images_per_s=rate(s_metrics),
        )  # fmt: skip
        print(f"{'LPIPS refs':<16} {'':>7} {1e3 * s_ref:>9.1f} ms/batch {rate(s_ref):>9.1f} images/s")
        print(f"{'PSNR+SSIM+LPIPS':<16} {'':>7} {1e3 * s_metrics:>9.1f} ms/batch {rate(s_metrics):>9.1f} images/s")
        if inception is not None:
            from tokenizer.inception import inception_features

            s_fid = best_seconds(lambda: inception_features(rec, inception, batch_size=b), device, args.repeats)
            result["fid"] = dict(s_per_batch=s_fid, images_per_s=rate(s_fid))
            print(f"{'FID features':<16} {'':>7} {1e3 * s_fid:>9.1f} ms/batch {rate(s_fid):>9.1f} images/s")
        else:
            result["fid"] = None

        def eval_step():  # evaluate()'s per-batch work for all ks, without codecs and bookkeeping
            _, recs = reconstruct(tok, refs, ks, precision)
            ref = LPIPSReference(refs, lpips_net)
            if inception is not None:
                inception_features(refs, inception, batch_size=b)
            for r in recs:
                image_metrics(r, refs, ref)
                if inception is not None:
                    inception_features(r, inception, batch_size=b)

        s = best_seconds(eval_step, device, args.repeats)
        result["eval_step"] = dict(num_tokens=ks, s_per_batch=s, images_per_s=rate(s))
        print(f"{'eval step':<16} {len(ks):>5} k {1e3 * s:>9.1f} ms/batch {rate(s):>9.1f} images/s")
    result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
