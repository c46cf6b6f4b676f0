"""A full disk, for real, without root: a process whose files may not grow past a size (RLIMIT_FSIZE). A write past
the limit fails in the kernel with EFBIG, as a write to a full disk fails with ENOSPC, and the code under test
meets the same OSError from the same system call. SIGXFSZ, which the kernel sends with it, is ignored (Python
ignores it at startup; the child is told so explicitly, for anything it starts that is not Python).

- `run_with_file_size_limit(args, limit)`: a subprocess under the limit from its first instruction.
- `FullDiskAtTrainEnd`: a Lightning callback that applies the limit to its own process when training ends,
  after the last checkpoint and before the LightningModule's own on_train_end (callbacks run first), i.e. the
  disk fills up exactly while the trained tokenizer is exported.
"""

from __future__ import annotations

import resource
import signal
import subprocess

import lightning.pytorch as pl


def limit_file_size(limit_bytes: int) -> None:
    """From now on no file of this process may grow past `limit_bytes` (the soft limit; the hard one stays)."""
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def run_with_file_size_limit(args: list[str], limit_bytes: int, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(args, capture_output=True, text=True, **kwargs) in a child whose files stop at
    `limit_bytes`."""
    return subprocess.run(args, preexec_fn=lambda: limit_file_size(limit_bytes), capture_output=True, text=True,
                          **kwargs)


class FullDiskAtTrainEnd(pl.Callback):
    """`--trainer.callbacks+=_disk_full.FullDiskAtTrainEnd` (tests/ on PYTHONPATH): the export at the end of
    training meets a full disk (see the module docstring)."""

    def __init__(self, limit_bytes: int = 1024):
        self.limit_bytes = limit_bytes

    def on_train_end(self, trainer, pl_module) -> None:
        limit_file_size(self.limit_bytes)
