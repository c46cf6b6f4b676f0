"""What a DataLoader worker does with the signals that stop a job: it leaves them to the training process.

SLURM signals every process of a job step, DataLoader workers included: SIGUSR1 before the time limit (the
`--signal` of scripts/slurm_train.sbatch), SIGTERM on preemption or scancel. A worker that died of one, or ran the
handler it inherited with the fork, would break the batch stream before the training process has reached its next
step boundary and saved its checkpoint (tokenizer/training/preemption.py). So `ignore_stop_signals`, the
`worker_init_fn` of every DataLoader in `data/` (`data.loading.loader_kwargs`, the token DataModule):

- ignores SIGUSR1;
- ignores SIGTERM unless the training process itself sent it. The training process stops its workers with SIGTERM
  (multiprocessing terminates its daemonic children at exit, and DataLoader a worker that does not stop when
  asked): a worker that ignored those would keep its parent waiting forever. A thread of the worker waits for
  SIGTERM (`sigwaitinfo`, which names the sender) and lets the worker die of it only when the sender is the
  parent. Where `sigwaitinfo` does not exist (macOS), SIGTERM keeps its default.
"""

from __future__ import annotations

import os
import signal
import threading


def ignore_stop_signals(worker_id: int, training_pid: int | None = None) -> None:
    """A DataLoader `worker_init_fn` (runs in the worker's main thread): see the module docstring.
    `training_pid`: the process whose SIGTERM stops the worker (default: the worker's parent). Workers started
    by a forkserver (data.loading) have the forkserver as their parent, so the DataLoader passes its own pid."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the training process's handler, inherited with the fork
    # blocked in this thread and in every thread it starts later (they inherit the mask), so that only the
    # waiting thread below ever receives SIGTERM
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid() if training_pid is None else training_pid
    threading.Thread(target=_die_of_sigterm_from, args=(parent,), name="sigterm-from-parent", daemon=True).start()


def _die_of_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass  # SLURM, a shell's kill: the training process decides when its workers stop
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # this thread only; the disposition is default
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # the worker dies of it, as its parent asked


__all__ = ["ignore_stop_signals"]
