"""Encode and decode throughput of the tokenizer at each token count k (random weights; speed only).

    PYTHONPATH=. python scripts/bench_tokenizer.py                                   # tiny, CPU, batch 32
    PYTHONPATH=. python scripts/bench_tokenizer.py --preset B --device cuda --dtype bfloat16 --batch-size 64

Encoding always produces all K tokens (one number per mechanism). Decoding a prefix of k tokens: with
``tail_token_drop`` / ``fixed`` the decoder runs on N patch queries + k tokens only, so short prefixes are
cheaper; with ``nested_dropout`` the missing K - k tokens are mask tokens and it always runs on N + K.
Times are the best of ``--repeats`` after one warm-up, all (mechanism, op, k) interleaved in every round;
images/s = batch size / wall seconds per batch. CPU: torch uses all cores unless ``--threads`` says otherwise,
and the CPU-time columns (process CPU seconds, all threads) show the work done, which is robust to other
processes competing for the cores (wall-clock numbers on a shared machine are not).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizer import OneDTokenizer  # noqa: E402
from tokenizer.length import powers_of_two_upto  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_times(fns: dict, device: str, repeats: int) -> dict:
    """Best-of-`repeats` wall-clock and process CPU seconds per call of each function, the functions
    interleaved within every round (so a burst of load from other processes hits all of them alike)."""
    for fn in fns.values():
        fn()  # warm-up
    sync(device)
    wall, cpu = dict.fromkeys(fns, float("inf")), dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for key, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[key] = min(wall[key], time.perf_counter() - t0)
            cpu[key] = min(cpu[key], time.process_time() - c0)
    return wall, cpu


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-tokens", type=int, nargs="+", help="k values (default 1, 2, 4, ..., K)")
    p.add_argument("--mechanisms", nargs="+", default=["tail_token_drop", "nested_dropout"],
                   choices=["tail_token_drop", "nested_dropout", "fixed"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(f"preset {args.preset}, device {args.device}, dtype {args.dtype}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    fns, rows = {}, []
    for mechanism in args.mechanisms:
        tok = OneDTokenizer.from_preset(args.preset, length_mechanism=mechanism).to(args.device, dtype).eval()
        k_max, n = tok.max_tokens, tok.config.num_patches
        ks = sorted(set(args.num_tokens or powers_of_two_upto(k_max)))
        images = torch.rand(args.batch_size, 3, tok.image_size, tok.image_size, device=args.device)
        with torch.inference_mode():
            ids = tok.encode(images)
        fns[(mechanism, "encode", k_max)] = lambda tok=tok, images=images: tok.encode(images)
        rows.append((mechanism, "encode", k_max, f"{n}+{k_max}", None))
        for k in ks:
            fns[(mechanism, "decode", k)] = lambda tok=tok, ids=ids[:, :k]: tok.decode(ids)
            seq = k if mechanism != "nested_dropout" else k_max
            rows.append((mechanism, "decode", k, f"{n}+{seq}", (mechanism, "decode", k_max)))
    with torch.inference_mode():
        times, cpu = best_times(fns, args.device, args.repeats)  # all mechanisms and k interleaved
    on_cpu = args.device == "cpu"
    extra = " CPU ms / batch | CPU speed-up vs k=K |" if on_cpu else ""
    print(f"| mechanism | op | k | transformer sequence | ms / batch | images/s | speed-up vs k=K |{extra}")
    print("|:---|:---|---:|---:|---:|---:|---:|" + ("---:|---:|" if on_cpu else ""))
    for mechanism, op, k, seq, ref in rows:
        key = (mechanism, op, k)
        t = times[key]
        line = (f"| {mechanism} | {op} | {k} | {seq} | {1e3 * t:.1f} | {args.batch_size / t:.1f} | "
                f"{f'{times[ref] / t:.2f}x' if ref else ''} |")
        if on_cpu:
            line += f" {1e3 * cpu[key]:.1f} | {f'{cpu[ref] / cpu[key]:.2f}x' if ref else ''} |"
        print(line)


if __name__ == "__main__":
    main()
