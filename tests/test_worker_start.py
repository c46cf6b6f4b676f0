"""How DataLoader workers start (data/worker_context.py): by fork only where the interpreter forks a multi-threaded
process safely, and never stuck in PyOS_AfterFork_Child (gh-112275, issue 24's finding 10) the way they start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.worker_context import fork_is_safe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("version", "safe"), [
    ((3, 10, 13), False), ((3, 11, 7), False), ((3, 11, 8), True), ((3, 11, 11), True), ((3, 12, 0), True),
    ((3, 13, 1), True),
])  # fmt: skip
def test_fork_is_safe_from_the_interpreter_with_the_fix(version, safe):
    assert fork_is_safe(version) is safe


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="native threads through libc's pthread_create")
def test_workers_started_the_projects_way_are_never_stuck_while_native_threads_enter_python():
    """1000 children started by the project's method while two native threads enter and leave Python in a loop
    (scripts/check_fork_safety.py): none stuck. On this project's 3.11.7 a plain fork sticks 1 to 6 in 2000."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_fork_safety.py"), "--children", "1000",
                           "--project-method-only"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (row,) = result["rows"]
    assert row["method"] == result["worker_start_method"] and row["children"] == 1000
    assert row["stuck"] == 0, result
