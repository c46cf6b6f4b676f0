"""Inference precision by name: "fp32" or "bf16" -> an autocast region around the model calls.

    precision = resolve_precision(args.precision, device)      # None -> bf16 on CUDA, fp32 elsewhere
    with autocast(precision, device):
        ids = tokenizer.encode(images)

Parameters stay fp32 either way; under "bf16" the matmuls/convolutions run in bf16 (tensor cores, half the
activation memory) while autocast keeps reductions and norms in fp32, and the tokenizer's quantizer forces
fp32 inside. "fp32" disables autocast, also inside an outer autocast region, and TF32 (`tokenizer.gpu.ieee_fp32`:
on a GPU cuDNN runs fp32 convolutions in TF32 by default), so the name always says what the model computes in.
Metrics are computed in "fp32" regions.

The default is bf16 on CUDA only: CPU bf16 matmuls are slow on most CPUs and CPU runs are where results are
compared against fp32 references. "fp16" exists for benchmarks (`scripts/bench_sampling.py --dtype
float16`); the command-line `--precision` offers `PRECISIONS` only.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from .gpu import ieee_fp32

PRECISIONS = ("fp32", "bf16")
_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision(device: torch.device | str) -> str:
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """`precision`, or the device's default when None; an unknown name is a ValueError."""
    if precision is None:
        return default_precision(device)
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; known: {sorted(_AUTOCAST_DTYPES)}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast compute dtype of a precision name (None for fp32: no autocast)."""
    return _AUTOCAST_DTYPES[resolve_precision(precision, "cpu")]


def autocast(precision: str | None, device: torch.device | str) -> contextlib.AbstractContextManager:
    """torch.autocast for `precision` on `device` (None: the device's default); "fp32" is autocast off and TF32
    off (IEEE fp32 matmuls and convolutions), both restored on exit."""
    device_type = torch.device(device).type
    dtype = autocast_dtype(resolve_precision(precision, device))
    if dtype is None:
        return _ieee_fp32_region(device_type)
    return torch.autocast(device_type, dtype=dtype)


@contextlib.contextmanager
def _ieee_fp32_region(device_type: str):
    with torch.autocast(device_type, enabled=False), ieee_fp32():
        yield


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="model compute precision (autocast); default bf16 on CUDA, fp32 on CPU")  # fmt: skip
