"""One writer per output directory: a second training or extraction into a directory in use is refused at once.

    with lock_directory("checkpoints/demo", "run directory", "use another run name"):
        ...  # no other process that asks for this directory's lock holds it

Without it, two trainings sharing a run directory both finished with status 0 over each other's files
(interleaved checkpoints, the other run's config.yaml and exported tokenizer), and two extractions into one
token-set directory wrote shards of the same name with different contents, leaving keys in two shards.

How: `fcntl.flock(LOCK_EX | LOCK_NB)` on `<directory>/.onedtok.lock`. The kernel releases the lock when the
holder's file descriptor closes, which includes every death (SIGKILL, the OOM killer): a lock file left behind by
a dead process is simply taken over, with nothing to clean up and no pid to guess about. Forked children
(DataLoader workers) close their copy of the descriptor at once: a killed holder's orphaned workers, which live on
for seconds, would otherwise keep its lock. The file is never deleted (deleting a lock file that another process
has open is the classic race of lock files: two holders of two inodes). The holder writes its host, pid, start
time and command line into the file, so that the refusal names it. The lock is advisory: it stops processes that
ask for it (train.py fit, data.extract_tokens), not a `cp` into the directory.

Filesystems. Local disks: as above. NFS: Linux turns flock into an NFS byte-range lock, held across clients when
the server supports locking (NFSv4, or NFSv3 with lockd); a `nolock` mount keeps locks local to one client, so
two nodes are then not stopped. Lustre: needs the `flock` mount option (`localflock`: one node only). Where the
filesystem refuses flock outright (ENOLCK, EOPNOTSUPP, ENOSYS) the writer goes on unlocked with a warning naming
the directory, since refusing would stop every run on such a filesystem. A pid check of the recorded holder
would add nothing where flock works (a dead holder's lock is already gone) and could not see other hosts where
it does not, so there is none.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import warnings

LOCK_NAME = ".onedtok.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}  # the filesystem cannot lock at all
_held: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    # a flock belongs to the open file description: the child's close drops its reference only (no LOCK_UN here,
    # which would release the parent's lock too)
    for fd in list(_held):
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class DirectoryInUse(RuntimeError):
    """Another live process holds the directory's lock; the message names it and what to do."""


class DirectoryLock:
    """The held lock of one directory; `release()` (or leaving the `with` block) gives it up. Idempotent."""

    def __init__(self, directory: str, fd: int | None):
        self.directory, self._fd = directory, fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd not in _held:  # released already, unlocked from the start, or a forked child (its copy is closed)
            return
        _held.discard(fd)
        try:
            os.ftruncate(fd, 0)  # nobody holds it now: leave no record that reads like a holder
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder_record() -> dict:
    """What the lock file says about its holder (this process)."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable), *sys.argv])}  # fmt: skip


def describe_holder(text: str) -> str:
    """The holder named in a lock file's text, for the refusal."""
    try:
        rec = json.loads(text)
        command = rec["command"] if len(rec["command"]) <= 160 else rec["command"][:157] + "..."
        return f"pid {rec['pid']} on host {rec['host']} (started {rec['started']}: {command})"
    except (ValueError, KeyError, TypeError):  # the holder has locked but not yet written its record
        return "another process (it has not recorded its pid yet)"


def lock_directory(directory: str | os.PathLike, what: str = "directory", hint: str = "") -> DirectoryLock:
    """Lock `directory` (created if missing) for this process, or raise DirectoryInUse naming the holder:
    "<what> <directory> is in use by pid P on host H (started T: CMD); wait for it to finish, or <hint>"."""
    directory = os.path.realpath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by exec'd children (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        os.close(fd)
        advice = f"wait for it to finish, or {hint}" if hint else "wait for it to finish"
        raise DirectoryInUse(f"{what} {directory} is in use by {holder}; {advice}") from None
    except OSError as exc:
        os.close(fd)
        if exc.errno not in _NO_FLOCK:
            raise
        warnings.warn(f"cannot lock {what} {directory} ({exc.strerror}: the filesystem does not support flock); "
                      "going on unlocked: a second writer into it would not be stopped", stacklevel=2)
        return DirectoryLock(directory, None)
    record = json.dumps(holder_record()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record + b"\n", 0)
    _held.add(fd)
    return DirectoryLock(directory, fd)


__all__ = ["LOCK_NAME", "DirectoryInUse", "DirectoryLock", "describe_holder", "holder_record", "lock_directory"]
