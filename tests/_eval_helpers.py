"""What the evaluation tests share: a one-process stand-in for accelerate, and a free port for a 2-process launch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch


class OneProcess:
    """The parts of accelerate.Accelerator that the evaluation passes use (eval.gather), for one process."""

    device = torch.device("cpu")
    process_index, num_processes, is_main_process = 0, 1, True

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t

    def gather(self, t):
        return t

    def reduce(self, t, reduction="sum"):
        return t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_ranks(module: str, out_dir) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 -m MODULE OUT_DIR` over gloo on 'lo', one thread per rank,
    with the repository and tests/ importable; run in OUT_DIR, output captured."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", module, str(out_dir)]  # fmt: skip
    return subprocess.run(cmd, cwd=out_dir, env=env, capture_output=True, text=True, timeout=600)
