"""Sampling throughput of the generator GPT, with and without the KV cache (random weights; speed only).

    PYTHONPATH=. python scripts/bench_sampling.py                                  # tiny preset, CPU
    PYTHONPATH=. python scripts/bench_sampling.py --preset B --device cuda --batch-sizes 8 64 \
        --num-tokens 32 128 --cfg-scale 2.0 --dtype bfloat16

Prints one row per (batch size, k, cache): seconds per batch, generated tokens/s and images/s (an "image" is
one sequence of k tokens; tokenizer decoding is not included). With CFG (scale != 1) the model runs on 2B
rows.
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenizer.generator import GPT, generate


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(
    model: GPT, batch_size: int, k: int, use_kv_cache: bool, cfg_scale: float, device: str, repeats: int
) -> float:
    labels = torch.arange(batch_size) % max(1, model.cfg.num_classes)
    generate(model, labels, min(k, 4), cfg_scale=cfg_scale, use_kv_cache=use_kv_cache)  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(model, labels, k, cfg_scale=cfg_scale, top_k=None, use_kv_cache=use_kv_cache)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--num-tokens", type=int, nargs="+", default=[32, 128])
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--no-cache-max-tokens",
        type=int,
        default=None,
        help="skip the no-cache path above this k (it costs O(k^2)); default: run all",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = GPT.from_preset(
        args.preset, vocab_size=args.vocab_size, block_size=args.block_size, num_classes=args.num_classes
    )
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    print(
        f"preset {args.preset}: {model.num_params() / 1e6:.1f}M params, vocab {args.vocab_size}, K "
        f"{args.block_size}, device {args.device}, dtype {args.dtype}, cfg_scale {args.cfg_scale}, "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(f"{'batch':>5} {'k':>5} {'kv_cache':>8} {'s/batch':>9} {'tokens/s':>10} {'images/s':>9}")
    for B in args.batch_sizes:
        for k in args.num_tokens:
            if k > args.block_size:
                continue
            for cache in (True, False):
                if not cache and args.no_cache_max_tokens is not None and k > args.no_cache_max_tokens:
                    continue
                s = bench(model, B, k, cache, args.cfg_scale, args.device, args.repeats)
                print(f"{B:>5} {k:>5} {str(cache):>8} {s:>9.3f} {B * k / s:>10.0f} {B / s:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
