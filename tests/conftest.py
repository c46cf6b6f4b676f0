"""Shared pytest fixtures, and the guard that the suite leaves the checkout as it found it.

Every test runs in its own temporary working directory, so an output path relative to the working directory (a
Trainer's default root, an export directory) lands there and not in the repository, where it could overwrite a
user's model and race with a parallel run. Tests that need the repository name it (REPO, or cwd= for a
subprocess). At the end of the run the repository's files are compared with what they were at the start: any
file created, changed or deleted fails the run, named (the user's untracked scratch files aside: scratch_files).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Not the suite's to watch: git's own files, the virtual environments (.venv-oldest: make test-oldest), and the
# caches Python and the tools keep.
UNWATCHED_DIRS = frozenset({".git", ".venv", ".venv-oldest", "__pycache__", ".pytest_cache", ".ruff_cache"})


def repository_files() -> dict[str, tuple[int, int]]:
    """{path relative to REPO: (size, mtime in ns)} of every file outside UNWATCHED_DIRS and *.egg-info."""
    files = {}
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in UNWATCHED_DIRS and not d.endswith(".egg-info")]
        for name in names:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # removed while walking: the comparison will say so
                continue
            files[os.path.relpath(path, REPO)] = (st.st_size, st.st_mtime_ns)
    return files


def scratch_files() -> set[str]:
    """Files that are neither tracked nor ignored by git (`git status`'s "??"): the user's own scratch files, such
    as a log this very run is being written into (`make test > test.log`). They are not watched: the run changes
    them, the suite does not. Without git (a source tarball) every file is watched."""
    try:
        out = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=REPO, text=True,
                             capture_output=True, timeout=60, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return set()
    return {os.path.normpath(p) for p in out.split("\0") if p}


def pytest_sessionstart(session):
    scratch = scratch_files()
    session.config.stash[_SCRATCH] = scratch
    session.config.stash[_BEFORE] = {p: v for p, v in repository_files().items() if p not in scratch}


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    scratch = session.config.stash[_SCRATCH]
    after = {p: v for p, v in repository_files().items() if p not in scratch}
    created = sorted(set(after) - set(before))
    deleted = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    if created or deleted or changed:
        lines = [f"{what}: {', '.join(paths[:10])}{' ...' if len(paths) > 10 else ''}"
                 for what, paths in (("created", created), ("changed", changed), ("deleted", deleted)) if paths]
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "the test run touched the repository (tests must write under tmp_path): " + "; ".join(lines)
        if reporter is not None:
            reporter.write_sep("=", "REPOSITORY CHANGED", red=True)
            reporter.write_line(message)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[dict]()
_SCRATCH = pytest.StashKey[set]()


@pytest.fixture(autouse=True)
def _in_temporary_directory(tmp_path, monkeypatch):
    """Each test's working directory is its own tmp_path (module docstring)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread than on two contended ones (shared 2-core CI machines). Use it per
    module: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    """A random tiny tokenizer (64 px, K = 32, 1024 codes, one block each side), saved; its directory."""
    from tokenizer import OneDTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    OneDTokenizer.from_preset("tiny", enc_depth=1, dec_depth=1, max_tokens=32).save_pretrained(path)
    return str(path)
