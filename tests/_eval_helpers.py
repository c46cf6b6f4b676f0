"""What the evaluation tests share: a one-process stand-in for accelerate, and a free port for a 2-process launch."""

from __future__ import annotations

import socket

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
