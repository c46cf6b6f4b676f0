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

A write that fails for lack of space (ENOSPC, EDQUOT, or EFBIG from a file size limit) raises `DiskFull`, an
OSError whose message names the file and says that its previous version is intact. torch.save reports such a
failure as `RuntimeError: ... unexpected pos` and safetensors as `SafetensorError: ... (os error 28)`: the cause
is found in the exception's chain or message (`disk_full_errno`).

Outputs of several files (a report: tables, JSON, figures) are written as a whole with `atomic_directory`: into
a fresh directory beside the destination, swapped in when every file is written, so that the destination never
holds new files beside old ones of another run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
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
    existed = os.path.exists(path)  # what a full disk's message says: the previous version is intact
    os.makedirs(directory, exist_ok=True)
    tmp = _create_partial(directory, os.path.basename(path))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what the umask (or a default ACL) gives a new file here
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the library may not have fsynced what it wrote
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # a library may have replaced it by its own 0600 temp file (safetensors 0.8 does)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise_if_disk_full(e, path, existed)
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


# ---- a full disk --------------------------------------------------------------------------------------------------
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFull(OSError):
    """A write that failed for lack of space: ENOSPC, EDQUOT (quota) or EFBIG (a file size limit). `errno` is
    the system's; the message (`str`) names the file, says that its previous version is intact and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full_errno(exc: BaseException | None) -> int | None:
    """The ENOSPC/EDQUOT/EFBIG behind `exc`, else None. Looks through the exception's chain, because libraries
    hide it: torch.save to a file raises RuntimeError("... unexpected pos ...") with the OSError as its context,
    safetensors a SafetensorError whose message ends "(os error 28)" (Rust's form of an errno)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc.errno
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found and int(found.group(1)) in DISK_FULL_ERRNOS:
            return int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def raise_if_disk_full(exc: BaseException, path: str | os.PathLike, previous_intact: bool, what: str = "") -> None:
    """Raise DiskFull (from `exc`) when `exc` comes from a full disk and is not a DiskFull already."""
    code = disk_full_errno(exc)
    if code is not None and not isinstance(exc, DiskFull):
        raise disk_full(code, path, previous_intact, what) from exc


def disk_full(code: int, path: str | os.PathLike, previous_intact: bool, what: str = "") -> DiskFull:
    """The DiskFull for a failed write of `path` (`what`: which part of it was being written, if not all)."""
    path = os.fspath(path)
    kept = (f"the previous {os.path.basename(path)} is intact" if previous_intact
            else f"nothing was written at {path}")
    return DiskFull(code, f"{path}: disk full (no space left) while writing {what or 'it'} "
                          f"[{errno.errorcode[code]}: {os.strerror(code)}]; {kept}. Free space on that filesystem "
                          "(or raise the quota or file size limit) and run the command again", path)


# ---- outputs of several files -------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, owned: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """Yield a fresh, empty directory beside `path` to write a whole output into; when the block exits cleanly it
    takes the place of `path`. On any exception the fresh directory is removed and `path` is left as it was.

    `owned(name)` says which entries of an existing `path` are this writer's own outputs: those are replaced as a
    set (an output of the previous run that this one did not write is removed with them, so nothing of another
    run stays beside the new files). Every other entry (a file someone put there) is moved into the new
    directory at the swap, never deleted.

    The swap is two renames in the parent directory (the old directory aside, the new one in); only between
    them is `path` absent, and the old outputs are deleted only after the new directory is in place. A
    disk-full write inside the block raises DiskFull naming `path`."""
    path = Path(os.path.abspath(path))
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a directory; give another output directory")
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkdir, not mkdtemp (mode 0700): the output directory gets the permissions any new directory gets, or
        # those of the directory it replaces
        staging = path.parent / f".{path.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        staging.mkdir()
        if path.is_dir():
            os.chmod(staging, stat.S_IMODE(path.stat().st_mode))
        yield staging
        _swap_in(staging, path, owned)
    except BaseException as e:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if disk_full_errno(e) is not None:  # named for the directory: the file's own message names the staging one
            what = os.path.basename(e.filename) if isinstance(e, OSError) and e.filename else ""
            raise disk_full(disk_full_errno(e), path, path.is_dir(), what=what or "its files") from e
        raise


def _swap_in(staging: Path, path: Path, owned: Callable[[str], bool]) -> None:
    if not path.exists():
        os.rename(staging, path)
        _fsync_directory(str(path.parent))
        return
    # renamed onto an empty directory of a unique name (POSIX replaces an empty directory atomically)
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.replaced-", suffix=PARTIAL_SUFFIX))
    os.rename(path, old)
    written, moved = set(os.listdir(staging)), []
    try:
        for name in os.listdir(old):
            if name not in written and not owned(name):  # not ours: it moves with the directory
                os.rename(old / name, staging / name)
                moved.append(name)
        os.rename(staging, path)
    except BaseException:  # put everything back as it was: the old directory, with what was moved out of it
        for name in moved:
            with contextlib.suppress(OSError):
                os.rename(staging / name, old / name)
        if not path.exists():
            os.rename(old, path)
        raise
    _fsync_directory(str(path.parent))
    shutil.rmtree(old)  # only the previous outputs of this writer are left in it


__all__ = ["atomic_path", "atomic_open", "atomic_directory", "write_text", "write_json", "torch_save", "is_partial",
           "remove_stale_partials", "DiskFull", "disk_full", "disk_full_errno", "raise_if_disk_full"]
