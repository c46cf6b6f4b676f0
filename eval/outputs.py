"""Whole output directories for the eval commands: a report or a set of samples is written into a fresh directory
and swapped in at the end (``tokenizer.atomic.atomic_directory``), so that ``--out`` never holds new files beside
old ones of another run (new metrics beside reconstruction grids of another k list), and a failed run leaves the
previous output as it was.

What an output directory may hold: each writer names its own files (an ``owned`` predicate: the report's,
the sample sets', gFID's). Entries it does not own are never deleted:
- the commands that write a whole directory (``eval.reconstruction``, ``eval.sample_generator``, ``eval.gfid``
  when it samples) refuse an ``--out`` that holds anything else before they start (``check_out_dir``): a
  report directory holds one report, and ``--out`` pointed at a run directory or the working directory must
  not be swapped away;
- the commands that add a summary to a directory of their inputs (``eval.gfid --samples``, ``eval.gfid_sweep``
  beside its per-scale sample folders) keep everything else: it is moved into the new directory at the swap.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizer.atomic import atomic_directory, is_partial


def owned_by(pattern: str) -> Callable[[str], bool]:
    """A writer's `owned` predicate: the names that match `pattern` whole (re.fullmatch), and the temp files of
    tokenizer.atomic (what a killed writer left)."""
    compiled = re.compile(pattern)
    return lambda name: compiled.fullmatch(name) is not None or is_partial(name)


def check_out_dir(out: str | Path, owned: Callable[[str], bool], what: str) -> None:
    """Refuse (ValueError) an existing `out` that is not a directory or holds entries `owned` does not cover,
    naming up to five of them. Nothing is deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory; give another --out")
    if not out.is_dir():
        return
    foreign = sorted(name for name in os.listdir(out) if not owned(name))
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ValueError(f"--out {out} holds files that {what} does not write ({', '.join(foreign[:5])}{more}); "
                         f"{what} replaces its whole directory, so give a new or empty one (nothing was deleted)")


@contextlib.contextmanager
def shared_output_directory(state, out: str | Path, owned: Callable[[str], bool]) -> Iterator[Path]:
    """atomic_directory(out, owned) across the processes of `state` (data.processes): the main process creates
    the fresh directory and swaps it in when it leaves the block; every process receives its path. The other
    processes must have finished writing into it before the main process leaves the block (sample_eval_sets ends
    with a barrier)."""
    from data.processes import gather_objects

    if state.num_processes == 1:
        with atomic_directory(out, owned) as staging:
            yield staging
        return
    if state.is_main_process:
        with atomic_directory(out, owned) as staging:
            gather_objects(state, str(staging))
            yield staging
    else:
        yield Path(gather_objects(state, None)[0])


__all__ = ["owned_by", "check_out_dir", "shared_output_directory"]
