"""torch.compile of submodules in place, with Inductor's compile workers bounded per rank.

    compile_in_place([model.encoder, model.decoder.transformer], local_ranks=trainer.num_devices)

Inductor compiles kernels in a pool of min(32, CPUs the process may run on) workers, in every process. Under DDP
each rank of a node starts its own pool, so 8 ranks that each see a whole node (torchrun, Lightning's own launcher,
an srun that binds nothing) start up to 8 x 32 workers, on top of 8 x data.num_workers DataLoader workers.
`compile_threads_per_rank` gives each rank its share instead: under SLURM what the job asked per task
(SLURM_CPUS_PER_TASK, the cores srun binds the task to), elsewhere the CPUs the process may run on divided by the
ranks on its node; at most Inductor's own cap, at least 1. TORCHINDUCTOR_COMPILE_THREADS, when set, wins.

In place (`module.compile()`): parameter names stay as they are (no `_orig_mod.`), so checkpoints of compiled
and eager runs are interchangeable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch

INDUCTOR_MAX_COMPILE_THREADS = 32  # torch._inductor.config.decide_compile_threads: min(32, CPUs)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which cgroups and srun's binding narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def compile_threads_per_rank(local_ranks: int, environ: Mapping[str, str] = os.environ,
                             cpus: int | None = None) -> int:  # fmt: skip
    """Inductor compile workers for one of `local_ranks` ranks on this node (see the module docstring). `cpus`:
    the CPUs this process may run on (default: its affinity mask)."""
    if environ.get("TORCHINDUCTOR_COMPILE_THREADS"):
        return int(environ["TORCHINDUCTOR_COMPILE_THREADS"])
    if environ.get("SLURM_CPUS_PER_TASK"):
        share = int(environ["SLURM_CPUS_PER_TASK"])
    else:
        share = (usable_cpus() if cpus is None else cpus) // max(1, local_ranks)
    return max(1, min(INDUCTOR_MAX_COMPILE_THREADS, share))


def compile_in_place(modules: Iterable[torch.nn.Module], local_ranks: int) -> int:
    """Bound Inductor's compile workers for this rank, then `compile()` each module in place (lazily: the first
    forward compiles). Returns the number of compile workers set."""
    import torch._inductor.config as inductor_config

    threads = compile_threads_per_rank(local_ranks)
    inductor_config.compile_threads = threads  # read when the worker pool starts, at the first compilation
    for module in modules:
        module.compile()
    return threads


__all__ = ["compile_in_place", "compile_threads_per_rank", "usable_cpus", "INDUCTOR_MAX_COMPILE_THREADS"]
