"""Generated lengths: sampling at the generator's natural lengths (it stops at its end-of-image token) beside
fixed token counts k, and the report of how long the generated images are.

`--num-tokens 8 16 natural` (eval.sample_generator, eval.gfid, eval.gfid_sweep): "natural" samples up to K
tokens and lets each sample stop where it draws END (`generate(..., stop_at_end=True)`; needs a GPT trained
with `end_token: true`); a fixed k never stops early (END masked out). Files are named by `k_name`:
samples_k008.npz, samples_natural.npz; each holds `lengths` [N] beside the ADM arrays (arr_0 images, arr_1
labels), so the length distribution travels with the images it describes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from data.token_format import length_stats

NATURAL = "natural"


def parse_num_tokens(value: str) -> int | str:
    """argparse type of --num-tokens: a positive int, or "natural"."""
    if value == NATURAL:
        return NATURAL
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--num-tokens takes token counts or '{NATURAL}', got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"--num-tokens must be >= 1, got {k}")
    return k


def k_order(k: int | str) -> tuple[int, int]:
    """Sort key: fixed counts ascending, then natural."""
    return (1, 0) if k == NATURAL else (0, int(k))


def k_name(k: int | str) -> str:
    """The file/folder stem of a token count: "k008", or "natural"."""
    return NATURAL if k == NATURAL else f"k{int(k):03d}"


def npz_lengths(path: str | Path) -> np.ndarray | None:
    """The per-sample lengths stored in a sample npz (None for files written without them)."""
    with np.load(path) as z:
        return z["lengths"].astype(np.int64) if "lengths" in z.files else None


def length_report(samples: dict) -> dict:
    """{k: {"mean", "median", "min", "max", "histogram"}} of the lengths stored in each sample npz {k: path}."""
    out = {}
    for k, path in sorted(samples.items(), key=lambda kv: k_order(kv[0])):
        lengths = npz_lengths(path) if str(path).endswith(".npz") else None
        if lengths is not None:
            out[k] = length_stats(lengths)
    return out


def lengths_markdown(report: dict) -> str:
    """A table of the generated lengths: one row per k (a fixed k is always k; natural is what the model chose)."""
    lines = ["Generated lengths (tokens per image)", "",
             "| k | mean | median | min | max | histogram (length: count) |", "|---|---:|---:|---:|---:|---|"]
    for k, s in sorted(report.items(), key=lambda kv: k_order(kv[0])):
        hist = ", ".join(f"{n}: {c}" for n, c in s["histogram"].items())
        lines.append(f"| {k} | {s['mean']:.2f} | {s['median']:g} | {s['min']} | {s['max']} | {hist} |")
    return "\n".join(lines)


__all__ = ["NATURAL", "parse_num_tokens", "k_order", "k_name", "npz_lengths", "length_report", "lengths_markdown"]
