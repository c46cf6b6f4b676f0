"""The suite's own guard (conftest.py): a run that writes into the repository fails and names the file, and a
test's relative paths land in its temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_relative_paths_land_in_the_tests_temporary_directory(tmp_path):
    Path("written-by-a-test.txt").write_text("x")
    assert Path.cwd() == tmp_path and (tmp_path / "written-by-a-test.txt").exists()
    assert not (REPO / "written-by-a-test.txt").exists()


def _copy_of_the_guard(tmp_path: Path, test_body: str) -> Path:
    """A small git repository with this suite's conftest.py, one test file and a tracked file, plus an untracked
    scratch file (run.log) that is not committed."""
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", repo / "tests" / "conftest.py")
    (repo / "kept.txt").write_text("a user's file")
    (repo / "tests" / "test_one.py").write_text(test_body)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    (repo / "run.log").write_text("a log the run is written into\n")
    return repo


def _pytest(repo: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_a_run_that_writes_into_the_repository_fails_naming_the_files(tmp_path):
    body = ("from conftest import REPO\n\n"
            "def test_writes():\n"
            "    (REPO / 'checkpoints').mkdir()\n"
            "    (REPO / 'checkpoints' / 'model.bin').write_text('x')\n"
            "    (REPO / 'kept.txt').write_text('overwritten, longer')\n")  # fmt: skip
    proc = _pytest(_copy_of_the_guard(tmp_path, body))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 passed" in out and "REPOSITORY CHANGED" in out
    assert f"created: checkpoints{os.sep}model.bin" in out and "changed: kept.txt" in out


def test_a_run_that_writes_only_under_tmp_path_passes(tmp_path):
    """Also when the user's untracked scratch file changes during the run (output redirected into the checkout)."""
    body = ("from pathlib import Path\nfrom conftest import REPO\n\n"
            "def test_writes(tmp_path):\n"
            "    Path('out.txt').write_text('x')\n"
            "    with open(REPO / 'run.log', 'a') as log:\n"
            "        log.write('more output\\n')\n")  # fmt: skip
    _assert_the_guard_passes(tmp_path, body)


def test_a_run_that_writes_into_the_virtual_environments_passes(tmp_path):
    """.venv and .venv-oldest (make test-oldest) are the environment the suite runs in, not the checkout's files:
    a package that writes its cache next to itself there does not fail the run."""
    body = ("from conftest import REPO\n\n"
            "def test_writes():\n"
            "    for venv in ('.venv', '.venv-oldest'):\n"
            "        (REPO / venv / 'lib').mkdir(parents=True)\n"
            "        (REPO / venv / 'lib' / 'cache.bin').write_text('x')\n")  # fmt: skip
    _assert_the_guard_passes(tmp_path, body)


def _assert_the_guard_passes(tmp_path, body: str) -> None:
    proc = _pytest(_copy_of_the_guard(tmp_path, body))
    assert proc.returncode == 0 and "REPOSITORY CHANGED" not in proc.stdout, proc.stdout + proc.stderr
