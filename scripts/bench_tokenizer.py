"""Encode and decode throughput of the tokenizer at each token count k (random weights; speed only).

    PYTHONPATH=. python scripts/bench_tokenizer.py                                   # tiny, CPU, batch 32
    PYTHONPATH=. python scripts/bench_tokenizer.py --preset B --device cuda --dtype bfloat16 --batch-size 64
    PYTHONPATH=. python scripts/bench_tokenizer.py --lfq-entropy --lfq-tokens 512     # LFQ entropy, one JSON line

Encoding always produces all K tokens (one number per mechanism). Decoding a prefix of k tokens: with
``tail_token_drop`` / ``fixed`` the decoder runs on N patch queries + k tokens only, so short prefixes are
cheaper; with ``nested_dropout`` the missing K - k tokens are mask tokens and it always runs on N + K.
Times are the best of ``--repeats`` after one warm-up, all (mechanism, op, k) interleaved in every round;
images/s = batch size / wall seconds per batch. CPU: torch uses all cores unless ``--threads`` says otherwise,
and the CPU-time columns (process CPU seconds, all threads) show the work done, which is robust to other
processes competing for the cores (wall-clock numbers on a shared machine are not).

``--lfq-entropy`` times LFQ's entropy loss instead (tokenizer/lfq_entropy.py `lfq_entropy`, forward + backward of
``--lfq-tokens`` unit-scale tokens over ``--lfq-codebook-size`` codes, in its default checkpointed chunks), eager
and torch.compile'd, and prints one JSON line: ms per call and the largest loss / gradient difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizer import OneDTokenizer  # noqa: E402
from tokenizer.length import powers_of_two_upto  # noqa: E402
from tokenizer.lfq_entropy import lfq_entropy  # noqa: E402


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


def bench_lfq_entropy(args) -> dict:
    """Eager vs compiled `lfq_entropy`, forward + backward: ms per call (best of --repeats; the compiled one's
    warm-up call compiles) and how far the compiled loss and input gradient are from eager's."""
    bits = args.lfq_codebook_size.bit_length() - 1
    codes = ((torch.arange(args.lfq_codebook_size)[:, None] >> torch.arange(bits - 1, -1, -1)) & 1) * 2.0 - 1.0
    codes = codes.to(args.device)  # [V, d] the +-1 codes (any code order: the entropies do not depend on it)
    z = torch.randn(args.lfq_tokens, bits, device=args.device)  # [N, d] unit scale, as the encoder makes it
    results = {}

    def call(compiled: bool):
        x = z.clone().requires_grad_()
        per_sample, codebook_entropy = lfq_entropy(x, codes, compiled=compiled)
        loss = per_sample - codebook_entropy
        loss.backward()
        results[compiled] = loss.detach(), x.grad

    t0 = time.perf_counter()
    call(True)  # compiles
    compile_s = time.perf_counter() - t0
    wall, cpu = best_times({"eager": lambda: call(False), "compiled": lambda: call(True)}, args.device, args.repeats)
    (loss_e, grad_e), (loss_c, grad_c) = results[False], results[True]
    return {"op": "lfq_entropy forward+backward", "device": args.device, "codebook_size": args.lfq_codebook_size,
            "tokens": args.lfq_tokens, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "eager_ms": round(1e3 * wall["eager"], 2), "compiled_ms": round(1e3 * wall["compiled"], 2),
            "eager_cpu_ms": round(1e3 * cpu["eager"], 2), "compiled_cpu_ms": round(1e3 * cpu["compiled"], 2),
            "compile_s": round(compile_s, 1), "loss_abs_diff": (loss_c - loss_e).abs().item(),
            "grad_max_abs_diff": (grad_c - grad_e).abs().max().item(), "grad_max_abs": grad_e.abs().max().item()}


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
    p.add_argument("--lfq-entropy", action="store_true", help="time LFQ's entropy loss, eager vs compiled")
    p.add_argument("--lfq-tokens", type=int, default=4096, help="tokens (B x K) for --lfq-entropy")
    p.add_argument("--lfq-codebook-size", type=int, default=2**16, help="codes (a power of two) for --lfq-entropy")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    if args.lfq_entropy:
        print(json.dumps(bench_lfq_entropy(args)))
        return
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
