"""Does starting a DataLoader worker deadlock on this interpreter? Starts children while native threads enter and
leave Python, by plain fork and by the project's worker start method (data/worker_context.py), and counts the
children stuck (not exited within --stuck-after seconds; killed, then counted).

    python scripts/check_fork_safety.py [--children 2000] [--project-method-only]

Why native threads: a thread that is not Python's enters the interpreter with PyGILState_Ensure, which creates its
thread state under the runtime's HEAD_LOCK *without the GIL* (torch's autograd, gloo and pin-memory threads do).
A fork at that moment copies the lock held, and on CPython up to 3.11.7 the child waits for it forever in
PyOS_AfterFork_Child (gh-112275): the resumed two-rank run of issue 24's finding 10 hung before its first step
with a DataLoader worker stuck there. Here the native threads are made with pthread_create through ctypes and run
a Python callback, in a loop, while the main thread starts the children.

On this project's 2-core machine (CPython 3.11.7) a plain fork left 1 child stuck in 2000 (6 in 2000 in a first
version of this loop); the forkserver that data/worker_context.py picks there, 0 in 2000. A stuck child, under
gdb: os.fork -> PyOS_AfterFork_Child -> _PyEval_ReInitThreads -> _PyThreadState_DeleteExcept, waiting on the lock
forever. Where the interpreter has the fix, both rows should be 0.

The last line printed is one JSON object: interpreter, fork_is_safe, worker_start_method, and per method the
children started and stuck and the seconds taken.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.worker_context import fork_is_safe, worker_context, worker_start_method  # noqa: E402

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)


def enter_python_from_native_threads_forever() -> None:
    """In a loop: create a native thread that calls into Python once (a thread state made and deleted), join it."""
    libc = ctypes.CDLL(None)
    callback = _CALLBACK(lambda arg: None)
    libc.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, _CALLBACK, ctypes.c_void_p]
    libc.pthread_join.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
    thread = ctypes.c_ulong()
    while True:
        if libc.pthread_create(ctypes.byref(thread), None, callback, None) != 0:
            raise OSError("pthread_create failed")
        libc.pthread_join(thread.value, None)


def child() -> None:
    pass


def count_stuck(context: multiprocessing.context.BaseContext, children: int, stuck_after: float) -> dict:
    """Start `children` processes one after another in `context`; a child still alive after `stuck_after` seconds
    is stuck: killed and counted."""
    start, stuck = time.perf_counter(), 0
    for _ in range(children):
        process = context.Process(target=child)
        process.start()
        process.join(stuck_after)
        if process.exitcode is None:
            stuck += 1
            os.kill(process.pid, signal.SIGKILL)
            process.join()
    return {"method": context.get_start_method(), "children": children, "stuck": stuck,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--children", type=int, default=2000, help="children started per method")
    p.add_argument("--threads", type=int, default=2, help="threads entering Python from native threads")
    p.add_argument("--stuck-after", type=float, default=5.0, help="seconds after which a child is stuck")
    p.add_argument("--project-method-only", action="store_true",
                   help="only the project's start method (default: plain fork too, where the platform has it)")
    a = p.parse_args()
    if a.children < 1 or a.threads < 1 or a.stuck_after <= 0:
        p.error("--children and --threads must be >= 1 and --stuck-after > 0")
    project = worker_start_method()
    fork = [] if a.project_method_only or "fork" not in multiprocessing.get_all_start_methods() else ["fork"]
    methods = list(dict.fromkeys(fork + [project]))
    # Contexts (and the project's forkserver, started by worker_context) before the threads, as in training,
    # where the loaders' context is made before the first worker starts.
    contexts = [worker_context() if m == project else multiprocessing.get_context(m) for m in methods]
    for _ in range(a.threads):
        threading.Thread(target=enter_python_from_native_threads_forever, daemon=True).start()
    rows = []
    for context in contexts:
        rows.append(count_stuck(context, a.children, a.stuck_after))
        print(f"{rows[-1]['method']}: {rows[-1]['stuck']} of {a.children} children stuck "
              f"({rows[-1]['seconds']} s)", flush=True)
    print(json.dumps({"interpreter": platform.python_version(), "fork_is_safe": fork_is_safe(),
                      "worker_start_method": project, "threads": a.threads, "rows": rows}), flush=True)
    os._exit(0)  # the native threads loop forever and cannot be joined


if __name__ == "__main__":
    main()
