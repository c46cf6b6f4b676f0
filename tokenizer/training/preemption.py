"""Stopping a training run on a signal: at a step boundary, on every rank at once, with a checkpoint of that step.

Who sends what (docs/multinode.md): `kill PID` and a stopping torchrun send SIGTERM; SLURM sends SIGTERM on
preemption (SIGKILL after the partition's GraceTime), on `scancel` and at the time limit (SIGKILL after KillWait),
and the `--signal` a job asks for (SIGUSR1 in scripts/slurm_train.sbatch) a set time before the time limit.

`StopOnSignal`, a callback that train.py installs in every run (tokenizer and generator):

- SIGTERM and SIGUSR1 only set a flag on the host, and only in the process that installed the handler (DataLoader
  workers leave both to it: data/worker_signals.py). Ranks get a signal at different points of a step, each inside
  another collective; a handler that saves there (Lightning's SLURM auto-requeue: a checkpoint and its barrier
  inside the handler, Lightning issue #21406) meets the other ranks in mismatched collectives and hangs.
- Every `check_every_n_batches` batches, at the end of the batch, the ranks sum their flags in one all-reduce of
  two integers: that all-reduce and its host read are all it costs, and only on those batches. With one process
  the flag is a Python bool, read after every batch.
- When a rank has a flag set, every rank saves the same checkpoint (`last-stop.ckpt` in the run's checkpoint
  directory, which `--ckpt_path last` finds), rank 0 requeues the SLURM job when a SIGUSR1 came under SLURM
  (`scontrol requeue`; the others wait for it), and all ranks raise `TrainingStopped`. train.py then exits with
  128 + the signal number (`exit_status`: 143 for SIGTERM, 138 for SIGUSR1), what a shell reports for a process
  that the signal killed: `&&` chains, make and SLURM see a failure, not success.

Lightning registers its own SIGTERM handler after the checkpoint is restored (it broadcasts inside the handler,
and its SIGTERMException exits with status 0); this callback installs its handlers before that (`setup`) and again
over Lightning's (`on_train_start`). A SIGTERM in between is also Lightning's, and train.py maps its exception to
143. SIGINT (Ctrl-C) is left to Lightning: it stops at once, without a checkpoint, with status 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import lightning.pytorch as pl
import torch

from ..distributed import all_reduce_sum

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what a cluster sends before it stops a job
STOP_CHECKPOINT = "last-stop.ckpt"  # "last" in the name: Lightning's own `last` lookup finds it too


class TrainingStopped(Exception):
    """Training stopped on a signal after saving a checkpoint; `exit_status` is what train.py exits with."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def exit_status(signum: int) -> int:
    """128 + the signal number: how a shell reports a process that the signal killed."""
    return 128 + int(signum)


class StopOnSignal(pl.Callback):
    """Save and stop, on every rank at the same batch, after SIGTERM or SIGUSR1 (see the module docstring).

    Args:
        check_every_n_batches: with several processes, the ranks compare their flags every this many batches (one
            all-reduce of two integers and a host read); the stop comes at most this many batches after the
            signal, plus the checkpoint write. With one process the flag is read after every batch.
        requeue: under SLURM (`SLURM_JOB_ID` set), rank 0 runs `scontrol requeue` after the checkpoint of a stop
            that a SIGUSR1 caused.
    """

    def __init__(self, check_every_n_batches: int = 10, requeue: bool = True):
        super().__init__()
        if check_every_n_batches < 1:
            raise ValueError(f"check_every_n_batches must be >= 1, got {check_every_n_batches}")
        self.check_every_n_batches = check_every_n_batches
        self.requeue = requeue
        self._received = dict.fromkeys(STOP_SIGNALS, False)  # host flags, set by the handler only
        self._before: dict[int, object] = {}  # the handlers ours replaced: put back, and obeyed, after the run
        self._active = False
        self._pid: int | None = None
        self._batches = 0

    # ---- the handler: a flag, nothing else ------------------------------------------------------------------
    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a process forked since: a DataLoader worker before its worker_init_fn ran
        if self._active:
            self._received[signal.Signals(signum)] = True
            return
        # after the run: Lightning's teardown may have put this handler back (it restores what it found at its
        # start); behave as the handler from before the run would
        before = self._before.get(signum)
        before = signal.SIG_DFL if before is None else before
        signal.signal(signum, before)
        if before == signal.SIG_DFL:
            os.kill(os.getpid(), signum)
        elif callable(before):
            before(signum, frame)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python sets handlers from the main thread only
        self._pid, self._active = os.getpid(), True
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._handle)
            if previous != self._handle:
                self._before.setdefault(signum, previous)

    def _restore(self) -> None:
        self._active = False
        if threading.current_thread() is threading.main_thread():
            for signum, before in self._before.items():
                signal.signal(signum, signal.SIG_DFL if before is None else before)

    # ---- Lightning hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._received = dict.fromkeys(STOP_SIGNALS, False)
            self._install()  # before Lightning registers its own: it then leaves SIGUSR1 alone

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = 0
        self._install()  # over Lightning's SIGTERM handler, registered since setup
        if getattr(trainer, "received_sigterm", False):  # Lightning's handler caught one before ours took over
            self._received[signal.SIGTERM] = True
        # Under DDP Lightning broadcasts rank 0's `received_sigterm` before every batch and reads it with .item()
        # (`_broadcast_sigterm_tensor`, lightning/pytorch/loops/training_epoch_loop.py): one collective and one
        # host sync per step. With our handler installed its flag is never set again, so that broadcast carries
        # nothing; the check above, every `check_every_n_batches`, replaces it. A Lightning without the method
        # (renamed) leaves it in place: tests/test_signals.py's whole-step DDP audit then fails, naming it.
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = _no_sigterm_broadcast

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._batches += 1
        if trainer.world_size == 1:
            received = [int(self._received[s]) for s in STOP_SIGNALS]  # ranks that got each signal
        elif self._batches % self.check_every_n_batches == 0:
            flags = torch.tensor([int(self._received[s]) for s in STOP_SIGNALS], device=trainer.strategy.root_device)
            all_reduce_sum(flags)  # [2] the same on every rank: how many ranks got SIGTERM, SIGUSR1
            received = flags.tolist()  # the host read, on checking batches only
        else:
            return
        if any(received):
            self._stop(trainer, dict(zip(STOP_SIGNALS, received)))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    # ---- the stop -------------------------------------------------------------------------------------------
    def _stop(self, trainer: pl.Trainer, received: dict[signal.Signals, int]) -> None:
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or trainer.default_root_dir
        path = os.path.join(directory, STOP_CHECKPOINT)
        trainer.save_checkpoint(path)  # every rank: rank 0 writes (atomically), then all meet in a barrier
        # SIGTERM decides the status when both came: a preempted or cancelled job is not a time-limit requeue
        signum = signal.SIGTERM if received[signal.SIGTERM] else signal.SIGUSR1
        got = ", ".join(f"{s.name} on {n} of {trainer.world_size} rank(s)" for s, n in received.items() if n)
        requeued = ""
        if received[signal.SIGUSR1] and self.requeue and os.environ.get("SLURM_JOB_ID"):
            if trainer.is_global_zero:
                requeued = " " + requeue_slurm_job()
            # no rank exits before the requeue: srun --kill-on-bad-exit ends the step at the first non-zero exit
            trainer.strategy.barrier("requeue")
        raise TrainingStopped(
            f"rank {trainer.global_rank}: stopped after optimizer step {trainer.global_step} ({got}); checkpoint "
            f"{path} saved.{requeued} Resume with --ckpt_path last. Exit status {exit_status(signum)} "
            f"(128 + {signum.name}).", exit_status(signum))


def _no_sigterm_broadcast() -> None:
    """What replaces Lightning's per-batch SIGTERM broadcast while StopOnSignal owns the signal (on_train_start)."""


def requeue_slurm_job() -> str:
    """Put this SLURM job back in the queue (`scontrol requeue`); returns what happened, for the stop message."""
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"SLURM job {job} NOT requeued (scontrol: {e}); submit the job again."
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr, end="")
        return f"SLURM job {job} NOT requeued (scontrol requeue exited {done.returncode}); submit the job again."
    return f"SLURM job {job} requeued."


__all__ = ["StopOnSignal", "TrainingStopped", "exit_status", "requeue_slurm_job", "STOP_SIGNALS", "STOP_CHECKPOINT"]
