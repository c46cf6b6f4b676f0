"""The one process/rank shim of the entry points that are not Lightning (extraction, generator sampling).

``process_state`` gives an object with accelerate's ``PartialState`` interface: ``process_index``,
``num_processes``, ``is_main_process``, ``is_local_main_process``, ``device``, ``wait_for_everyone()``. Under
``torchrun`` / ``accelerate launch`` it is accelerate's ``PartialState``; a single process gets
``SingleProcess`` (no accelerate needed). ``gather_objects`` collects one Python object per process.
"""

from __future__ import annotations

import atexit
import os

import torch


class SingleProcess:
    """``PartialState`` of a run without a launcher: process 0 of 1 on ``device`` (default: CUDA if any)."""

    process_index, num_processes = 0, 1
    is_main_process = is_local_main_process = True

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def wait_for_everyone(self) -> None:
        pass


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_state(cpu: bool = False):
    """This process's place in the run (see the module docstring).

    A single CPU process is a ``SingleProcess`` even when accelerate is installed: accelerate's state is a
    process-wide singleton, so a ``--cpu`` call after a GPU call in the same Python process would otherwise
    keep the GPU. Launched processes without a GPU ask accelerate for CPU processes explicitly: otherwise each
    would believe it is alone and all would do all the work. A WORLD_SIZE that accelerate does not see is
    refused for the same reason."""
    world = launched_world_size()
    if world == 1 and cpu:
        return SingleProcess("cpu")
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover
        if world > 1:
            raise SystemExit(f"WORLD_SIZE={world}: running several processes needs accelerate "
                             "(pip install accelerate)") from None
        return SingleProcess()
    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    if world > 1:
        atexit.register(_destroy_process_group)
    if world > 1 and state.num_processes != world:
        raise SystemExit(f"WORLD_SIZE={world} but accelerate sees {state.num_processes} process(es); refusing "
                         "to run (every process would do all the work): check the launcher's settings")
    return state


def _destroy_process_group() -> None:
    """At exit, the process group accelerate created: left to interpreter teardown, its communication threads were
    still running when C++ destroyed them, and a process that had finished its work aborted (SIGABRT, "terminate
    called without an active exception"), failing the whole torchrun launch after the output was complete."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(state, obj) -> list:
    """``obj`` from every process (picklable), in process order; ``[obj]`` for a single process."""
    if state.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


__all__ = ["SingleProcess", "gather_objects", "launched_world_size", "process_state"]
