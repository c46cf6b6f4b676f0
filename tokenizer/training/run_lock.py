"""One training per run directory: global rank 0 locks the run's directories before `fit` reads or writes them.

Two trainings sharing `checkpoints/<run>/` used to both finish with status 0: their checkpoints interleaved
(Lightning's `-v1` names), config.yaml belonged to whichever started second, the exported tokenizer/ to whichever
finished last, and TensorBoard overlaid both runs. Now the second is refused at once, naming the first's host and
pid (`tokenizer/directory_lock.py`: flock, released by the kernel when the holder dies, so a resume after a crash
or a kill takes the directory over).
"""

from __future__ import annotations

import contextlib
import os

from tokenizer.directory_lock import lock_directory

RUN_DIRECTORY_HINT = ("give this run its own directories: another `run:` name in its config, or "
                      "--trainer.logger.init_args.name NAME and --trainer.callbacks.init_args.dirpath DIR")


def lock_run_directories(trainer) -> contextlib.ExitStack:
    """Lock the run directory (`trainer.log_dir`: config.yaml, TensorBoard, tokenizer/, and the checkpoints of the
    configs, in ckpt/ inside it) and every local checkpoint directory outside it, on global rank 0 only: the other
    ranks, on this node or others, share them legitimately. Called before `fit`, where Lightning already knows the
    rank (LOCAL_RANK/NODE_RANK of its launcher, RANK of torchrun, SLURM_PROCID). Closing the returned stack
    releases them; raises DirectoryInUse naming the holder."""
    locks = contextlib.ExitStack()
    if not trainer.is_global_zero:
        return locks
    log_dir = trainer.log_dir  # before fit: no process group yet, so no broadcast either
    run_dir = os.path.realpath(log_dir) if log_dir else None
    targets = {run_dir: "run directory"} if run_dir else {}
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)  # None: Lightning puts them under log_dir
        if not dirpath or "://" in str(dirpath):
            continue
        dirpath = os.path.realpath(dirpath)
        # one inside the run directory is covered by its lock, and a lock file in it would make Lightning warn
        # "Checkpoint directory ... exists and is not empty" on every fresh run
        if run_dir is None or os.path.commonpath([run_dir, dirpath]) != run_dir:
            targets.setdefault(dirpath, "checkpoint directory")
    try:
        for directory in sorted(targets):  # one order for every run: two racing runs do not each get one
            locks.enter_context(lock_directory(directory, targets[directory], RUN_DIRECTORY_HINT))
    except BaseException:
        locks.close()
        raise
    return locks


__all__ = ["RUN_DIRECTORY_HINT", "lock_run_directories"]
