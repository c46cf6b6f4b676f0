"""Atomic file writes: the one way this project writes a file that a later run reads.

Checkpoints, resolved configs, token shards, `meta.json`, reports and exported models are all written to a temp
file *in the destination directory*, flushed to disk, and renamed over the final name. Readers therefore see
either the old complete file or the new complete file, never a prefix of one.

Why the destination directory: `os.replace` is atomic only within one filesystem. A temp file in `$TMPDIR` (what
fsspec, and so Lightning's default checkpoint writer, uses) is *copied* when `$TMPDIR` is on another filesystem,
the usual cluster layout, and a kill during that copy leaves a truncated file under the final name.

Permissions: the temp file is created like any file `open` creates (mode 0o666 filtered by the process umask, or
by the directory's default ACL), and that mode is set again just before the rename, for libraries that replace the
file by their own temp file. `tempfile.mkstemp` (and safetensors' own temp file) create 0o600, which survived the
rename: every checkpoint, shard and report was unreadable by the rest of the group on a shared cluster, whatever
umask the user had set.

A writer killed with SIGKILL cannot clean up: its temp file stays behind, named `.<final name>.partial-*.tmp`.
`remove_stale_partials(directory)` deletes exactly those (and nothing else), and the checkpoint writer calls it
when a run starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO, TextIO

PARTIAL_MARK = ".partial-"
PARTIAL_SUFFIX = ".tmp"


def _fsync_directory(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_partial(directory: str, name: str) -> str:
    """A new, empty `.<name>.partial-XXXXXXXX.tmp` in `directory` (O_EXCL: never another writer's file), with the
    mode the umask allows (module docstring)."""
    while True:
        tmp = os.path.join(directory, f".{name}{PARTIAL_MARK}{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside `path`; when the block exits cleanly the temp file is fsynced and renamed to
    `path`. On any exception (or KeyboardInterrupt) the temp file is removed and `path` is left untouched.
    For libraries that insist on writing by file name (safetensors, torch.save to a path)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = _create_partial(directory, os.path.basename(path))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what the umask (or a default ACL) gives a new file here
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the library may not have fsynced what it wrote
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # a library may have replaced it by its own 0600 temp file (safetensors 0.8 does)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO | TextIO]:
    """`open(path, mode)` for writing, made atomic (see the module docstring). mode is "w" or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    """JSON with a trailing newline; `dump_kwargs` go to json.dumps (indent defaults to 2)."""
    dump_kwargs.setdefault("indent", 2)
    write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def is_partial(name: str) -> bool:
    """True for the temp names this module creates (and only those)."""
    return name.startswith(".") and PARTIAL_MARK in name and name.endswith(PARTIAL_SUFFIX)


def remove_stale_partials(directory: str | os.PathLike) -> list[str]:
    """Delete the temp files that killed writers left in `directory` (not recursive); returns their paths.
    Call it only where no other process is writing at the same moment (e.g. rank 0 at the start of a run)."""
    directory = os.fspath(directory)
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if is_partial(name) and os.path.isfile(full):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
                removed.append(full)
    return removed


__all__ = ["atomic_path", "atomic_open", "write_text", "write_json", "torch_save", "is_partial",
           "remove_stale_partials"]
