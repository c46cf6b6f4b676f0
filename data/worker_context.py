"""The one multiprocessing context of DataLoader workers, and of everything they share with the training process.

Workers are started by a forkserver (data/loading.py says why: forking the multi-threaded training process can
deadlock). A lock or shared value handed to them must come from the same context: a SemLock made in the default
(fork) context refuses to travel to a forkserver child. So the shared state of the data pipeline (the skip counter
of data/skips.py, the epoch of data/shard_stream.py) is made with `worker_context()` too.
"""

from __future__ import annotations

import functools
import multiprocessing

# The modules every worker needs, imported once in the forkserver: a worker forks from it with them loaded.
FORKSERVER_PRELOAD = ["torch", "numpy", "PIL.Image"]


@functools.cache
def worker_context() -> multiprocessing.context.BaseContext:
    """The forkserver context where the platform has one (Linux, macOS), else the default (Windows: spawn)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)  # read when the server starts, at the first worker
    return context


__all__ = ["worker_context", "FORKSERVER_PRELOAD"]
