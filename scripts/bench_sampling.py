"""Sampling throughput of the generator GPT, with and without the KV cache (random weights; speed only).

    PYTHONPATH=. python scripts/bench_sampling.py                                  # tiny preset, CPU
    PYTHONPATH=. python scripts/bench_sampling.py --preset B --device cuda --batch-sizes 8 64 \
        --num-tokens 32 128 --cfg-scale 2.0 --dtype bfloat16

Prints one row per (batch size, k, cache): seconds per batch, generated tokens/s and images/s (an "image" is
one sequence of k tokens; tokenizer decoding is not included). With CFG (scale != 1) the model runs on 2B
rows. `host s` is when `generate` returned, before waiting for the device: on a GPU a sync-free token loop
can return well before the kernels finish (on the CPU the two are equal).

`--compile` samples through the torch.compile'd one-token step (`generate(compile_step=True)`; CUDA graphs
on CUDA): the cache rows only (the compiled step is the cached one). The step compiles once per batch size
(for every k and cfg scale: decode_step.py), in the first warm-up call; each row's warm-up call (its full k)
also makes that row's CUDA-graph captures, so the rows time the compiled steady state. `compiles` in the JSON
counts Dynamo's graphs over the whole run, sync check included (torch._dynamo.utils.counters' unique_graphs;
all of them are the decode step's, so it recompiled compiles - 1 times), and `graph_breaks` its graph breaks.

`--dtype bfloat16|float16` runs `generate(precision=...)`, i.e. fp32 weights sampled through a copy of the
Linear weights in that dtype (made once per call, once per model when compiled) with the KV cache in that
dtype, exactly what `eval.sample_generator --precision bf16` does; `--dtype float32` is plain fp32.

On CUDA, `sync_check` runs one more `generate` of the last timed row's shapes (its batch size and k: no
new compile, no new capture; labels already on the device, the same sampling settings) under
torch.cuda.set_sync_debug_mode("error"): "passed" when nothing in it synchronised the host, else "failed: <the
error>" (null on the CPU; tests/test_sampling.py checks the same on the CPU by counting aten ops).

The LAST line printed is one JSON object: the settings, sync_check, compiles, graph_breaks, peak_mem_gb
(torch.cuda.max_memory_allocated in 1e9 bytes over the whole run; null on the CPU) and one entry per row with
tokens_per_s, images_per_s and that row's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizer.compiling import compile_counts  # noqa: E402
from tokenizer.generator import GPT, generate  # noqa: E402

PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.startswith("cuda") else None


def bench(model: GPT, batch_size: int, k: int, use_kv_cache: bool, device: str, repeats: int,
          **sampling) -> tuple[float, float]:  # fmt: skip
    """(best wall seconds per batch including the device, host seconds of that call before the sync)."""
    labels = torch.arange(batch_size) % max(1, model.cfg.num_classes)
    # warm-up: the full k when compiling (its shapes are what gets compiled / captured), else a short call
    generate(model, labels, k if sampling.get("compile_step") else min(k, 4), use_kv_cache=use_kv_cache, **sampling)
    sync(device)
    best, host = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(model, labels, k, use_kv_cache=use_kv_cache, **sampling)
        t_host = time.perf_counter() - t0
        sync(device)
        t = time.perf_counter() - t0
        if t < best:
            best, host = t, t_host
    return best, host


def sync_check(model: GPT, device: str, batch_size: int, k: int, **sampling) -> str | None:
    """One generate call of a timed row's shapes (batch_size, k: already compiled and captured) with every host
    sync turned into an error (CUDA only; None on the CPU)."""
    if not device.startswith("cuda"):
        return None
    # on the device: no CPU range check, no copy
    labels = (torch.arange(batch_size) % max(1, model.cfg.num_classes)).to(device)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        generate(model, labels, k, **sampling)
        return "passed"
    except RuntimeError as e:
        return "failed: " + str(e).strip().splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(PRECISION_OF_DTYPE),
        help="compute dtype (autocast over fp32 weights, as generate(precision=...))",
    )
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=None, help="the GPT's K (default: the largest k)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--num-tokens", type=int, nargs="+", default=[32, 128])
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="the compiled one-token decode step (cache rows only)")
    p.add_argument(
        "--no-cache-max-tokens",
        type=int,
        default=None,
        help="skip the no-cache path above this k (it costs O(k^2); 0: never run it); default: run all",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_tokens is None:
        args.max_tokens = max(args.num_tokens)

    torch.manual_seed(0)
    model = GPT.from_preset(
        args.preset, vocab_size=args.vocab_size, max_tokens=args.max_tokens, num_classes=args.num_classes
    )
    model = model.to(args.device).eval()
    precision = PRECISION_OF_DTYPE[args.dtype]
    sampling = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    precision=precision, compile_step=args.compile)  # fmt: skip
    print(
        f"preset {args.preset}: {model.num_params() / 1e6:.1f}M params, vocab {args.vocab_size}, K "
        f"{args.max_tokens}, device {args.device}, dtype {args.dtype} (precision {precision}), cfg_scale "
        f"{args.cfg_scale}, temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, "
        f"compile {args.compile}, threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(f"{'batch':>5} {'k':>5} {'kv_cache':>8} {'s/batch':>9} {'host s':>9} {'tokens/s':>10} {'images/s':>9} "
          f"{'peak GB':>8}")  # fmt: skip
    rows = []
    for B in args.batch_sizes:
        for k in args.num_tokens:
            if k > args.max_tokens:
                continue
            for cache in (True, False):
                if not cache and (args.compile or (args.no_cache_max_tokens is not None
                                                   and k > args.no_cache_max_tokens)):  # fmt: skip
                    continue
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats(args.device)
                s, host = bench(model, B, k, cache, args.device, args.repeats, **sampling)
                peak = peak_memory_gb(args.device)
                rows.append(dict(batch=B, k=k, kv_cache=cache, s_per_batch=s, host_s=host, tokens_per_s=B * k / s,
                                 images_per_s=B / s, peak_mem_gb=peak))  # fmt: skip
                peak_s = "-" if peak is None else f"{peak:.2f}"
                print(f"{B:>5} {k:>5} {str(cache):>8} {s:>9.3f} {host:>9.3f} {B * k / s:>10.0f} {B / s:>9.2f} "
                      f"{peak_s:>8}", flush=True)  # fmt: skip
    timed = rows[-1] if rows else dict(batch=args.batch_sizes[0], k=min(args.num_tokens))
    check = sync_check(model, args.device, timed["batch"], timed["k"], **sampling)
    if check is not None:
        print(f"sync check (torch.cuda.set_sync_debug_mode('error') around generate): {check}")
    counts = compile_counts()
    compiles, breaks = counts["compiles"], counts["graph_breaks"]
    print(f"Dynamo graphs compiled {compiles} (the decode step: recompiles = graphs - 1), graph breaks {breaks}")
    peaks = [r["peak_mem_gb"] for r in rows if r["peak_mem_gb"] is not None]
    result = dict(
        bench="sampling", preset=args.preset, params_m=model.num_params() / 1e6, vocab_size=args.vocab_size,
        max_tokens=args.max_tokens, num_classes=args.num_classes, device=args.device, dtype=args.dtype,
        precision=precision, cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, compile=args.compile, repeats=args.repeats, threads=torch.get_num_threads(),
        torch=torch.__version__,
        sync_check=check, compiles=compiles, graph_breaks=breaks, peak_mem_gb=max(peaks) if peaks else None,
        rows=rows,
    )  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
