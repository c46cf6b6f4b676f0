"""How every command ends on an expected error: one line on stderr, exit status 1, no traceback.

Expected errors are the ones the user causes and can fix, each raised with a message that names the file or value
and says what to do:
- a full disk (`tokenizer.atomic.DiskFull`: which file, that its previous version is intact);
- an input that is missing or cannot be read, an output that cannot be written (any other `OSError`);
- a bad value: in a config (TokenizerConfig, GPTConfig, checked in their `__post_init__`), on the command line, in
  a file (`ValueError`, which CheckpointError, the config errors and the token-file errors are);
- a directory another process is writing (`tokenizer.directory_lock.DirectoryInUse`, naming the holder);
- what a command adds (`train.py`: a training that diverged, TrainingDiverged).

`run_command(prog, main)` calls `main()` and turns those into `prog: error: message` (argparse's own form) and
exit status 1. Anything else is a bug and keeps its traceback, and so does every error with `ONEDTOK_DEBUG=1`.
The entry points call it only when run as commands: called from Python (tests, notebooks) they raise as usual.

Used by: train.py, onedtok, python -m eval.reconstruction / eval.sample_generator / eval.gfid / eval.gfid_sweep,
python -m data.extract_tokens, python -m data.convert_shards.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from .directory_lock import DirectoryInUse

DEBUG_ENV = "ONEDTOK_DEBUG"
EXPECTED: tuple[type[BaseException], ...] = (OSError, ValueError, DirectoryInUse)

T = TypeVar("T")


def debugging() -> bool:
    """True when ONEDTOK_DEBUG asks for tracebacks (set, and not 0/false/no/empty)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_command(prog: str, main: Callable[[], T], also: tuple[type[BaseException], ...] = ()) -> T:
    """`main()`, with the expected errors (EXPECTED + `also`) ending the process as `prog: error: message` on
    stderr and exit status 1 (see the module docstring)."""
    try:
        return main()
    except (*EXPECTED, *also) as e:
        if debugging():
            raise
        # an OSError of the system reads "[Errno 13] Permission denied: 'path'", ours name the file themselves
        print(f"{prog}: error: {str(e) or type(e).__name__}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


__all__ = ["run_command", "debugging", "DEBUG_ENV", "EXPECTED"]
