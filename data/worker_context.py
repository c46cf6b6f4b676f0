"""How DataLoader workers start, and the one multiprocessing context of everything they share with training.

Workers are forked from the training process where the interpreter forks safely, and started by a forkserver
where it does not. CPython up to 3.11.7 (and the 3.8-3.10 releases before their 2024 backports) can deadlock in
a child forked from a multi-threaded process, inside `PyOS_AfterFork_Child`, on a runtime lock another thread
held at the fork (gh-112275; fixed in 3.11.8 and 3.12). By the time the loaders start, the training process runs
threads (gloo / NCCL, Lightning, the pin-memory thread): a resumed two-rank run hung before its first step with a
worker stuck there (issue 24, finding 10; 1 launch in 19-43 on this machine's 3.11.7). A forkserver is a clean
single-threaded process started once; workers fork from it, with torch preloaded. `scripts/check_fork_safety.py`
counts stuck children of both methods on any interpreter (here: plain fork 1 to 6 in 2000, the forkserver 0).

Where fork is safe it stays: workers then share the parent's memory copy-on-write (a token dataset of ImageNet
is 650 MB that a forkserver worker would receive pickled). `ONEDTOK_WORKER_START=fork|forkserver|spawn` forces
a method (the tests run both paths on one interpreter).

SLURM signals every process of a job step (tokenizer/training/preemption.py), the forkserver and multiprocessing's
resource tracker included: both are started here with SIGUSR1 and SIGTERM ignored (an ignored signal stays ignored
across their exec, and workers forked from the server start that way; data/worker_signals.py then lets a worker
die of its training process's SIGTERM only). A lock or shared value handed to workers must come from their
context: a SemLock made in the fork context refuses to travel to a forkserver child, so the data pipeline's
shared state (data/skips.py, data/shard_stream.py) is made with `worker_context()`.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
import threading

START_METHOD_ENV = "ONEDTOK_WORKER_START"
# The modules every worker needs, imported once in the forkserver: a worker forks from it with them loaded.
FORKSERVER_PRELOAD = ["torch", "numpy", "PIL.Image"]
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM) if hasattr(signal, "SIGUSR1") else ()


def fork_is_safe(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Whether this CPython has the fix of gh-112275 (forking a multi-threaded process cannot deadlock there)."""
    return version >= (3, 12) or (3, 11, 8) <= version < (3, 12)


@functools.cache
def worker_start_method() -> str:
    """fork where it is safe, else forkserver (see the module docstring); the platform default where neither
    exists (Windows: spawn); ONEDTOK_WORKER_START forces one."""
    available = multiprocessing.get_all_start_methods()
    forced = os.environ.get(START_METHOD_ENV, "").strip()
    if forced:
        if forced not in available:
            raise ValueError(f"{START_METHOD_ENV}={forced!r}: not a start method of this platform {available}")
        return forced
    if "fork" not in available:
        return multiprocessing.get_start_method()
    return "fork" if fork_is_safe() else "forkserver"


@functools.cache
def worker_context() -> multiprocessing.context.BaseContext:
    """The context of DataLoader workers and of the locks and shared values they use."""
    method = worker_start_method()
    context = multiprocessing.get_context(method)
    if method in ("forkserver", "spawn"):
        if method == "forkserver":
            context.set_forkserver_preload(FORKSERVER_PRELOAD)
        _start_helpers_ignoring_stop_signals(method)
    return context


def _start_helpers_ignoring_stop_signals(method: str) -> None:
    """Start the forkserver and the resource tracker now, with the stop signals ignored while they start (a
    signal in that window of milliseconds is lost). Only the main thread may change signal dispositions; from
    another thread the helpers start later, on first use, with the default dispositions."""
    if threading.current_thread() is not threading.main_thread():
        return
    from multiprocessing import forkserver, resource_tracker

    saved = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        resource_tracker.ensure_running()
        if method == "forkserver":
            forkserver.ensure_running()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


__all__ = ["worker_context", "worker_start_method", "fork_is_safe", "START_METHOD_ENV", "FORKSERVER_PRELOAD"]
