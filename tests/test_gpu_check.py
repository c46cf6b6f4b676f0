"""scripts/gpu_check.sh off the GPU: a clear failure without CUDA, and its CPU dry run (--device cpu), every phase
at a tiny size with compile on, timed phase by phase."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["tokenizer_only", "full_objective", "generator_train", "generator_sampling", "generator_sampling_compiled",
          "reconstruction_eval"]  # fmt: skip


def gpu_check(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the check would run")
def test_gpu_check_without_cuda_fails_and_says_why():
    proc = gpu_check(timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: no CUDA device (for the CPU dry run: --device cpu)" in proc.stdout
    assert "START" not in proc.stdout, "no phase runs"


def test_gpu_check_refuses_an_unknown_part():
    proc = gpu_check("--part", "decoder", timeout=30)
    assert proc.returncode == 2 and "--part must be tokenizer, generator or all" in proc.stderr


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_runs_every_phase():
    """`--device cpu`: every phase of both parts passes and prints its JSON line, a start and an end timestamp, and
    its seconds in the closing summary."""
    proc = gpu_check("--device", "cpu", timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "GPU CHECK PASSED (part all, device cpu)" in out
    summary = out[out.index("---- seconds per phase ----") :]
    results = {}
    for name in PHASES:
        assert re.search(rf"\[gpu_check \+\d+s\] START {name}: ", out), name
        assert re.search(rf"\[gpu_check \+\d+s\] END {name}: \d+s", out), name
        assert re.search(rf"^  {name} \d+s$", summary, re.MULTILINE), name
        line = next(line for line in out.splitlines() if line.startswith(f"{name} {{"))
        results[name] = json.loads(line[len(name) + 1 :])
    for name in ("tokenizer_only", "full_objective", "generator_train"):
        r = results[name]
        assert r["device"] == "cpu" and r["compile"] and r["host_syncs_per_step"] == 0 and r["tflop_per_img"] > 0, r
