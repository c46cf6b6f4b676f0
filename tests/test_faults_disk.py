"""A full disk, injected for real (RLIMIT_FSIZE: the kernel refuses to grow a file, EFBIG, see _disk_full.py): every
command ends with one line naming the file, "disk full (no space left)" and that the previous file is intact, and
leaves that file and no temp file behind. A checkpoint write used to end in `RuntimeError: ... unexpected pos` and
a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from _disk_full import run_with_file_size_limit

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
DISK_FULL = "disk full (no space left)"


# A write that a command makes through tokenizer.atomic, as each kind of writer makes it: JSON text, torch.save (the
# checkpoint writer: RuntimeError "unexpected pos" with the OSError hidden as its context), safetensors (the export:
# a Rust error that carries the errno in its message only).
WRITES = {
    "json": "atomic.write_json(path, {'values': list(range(20000))})",
    "torch_save": "atomic.torch_save({'w': torch.zeros(20000)}, path)",
    "safetensors": "from safetensors.torch import save_file\n"
                   "with atomic.atomic_path(path) as tmp: save_file({'w': torch.zeros(20000)}, tmp)",
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(WRITES))
def test_a_write_on_a_full_disk_names_the_file_and_keeps_the_previous_one(kind, tmp_path):
    path = tmp_path / "out" / "file.bin"
    path.parent.mkdir()
    path.write_bytes(b"the previous version")
    child = "import sys, torch\nfrom tokenizer import atomic\npath = sys.argv[1]\n" + WRITES[kind]
    proc = run_with_file_size_limit([sys.executable, "-c", child, str(path)], 4096, cwd=REPO, env=ENV, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    raised = proc.stderr.strip().splitlines()[-1]  # the exception, as the traceback's last line names it
    assert raised.startswith(f"tokenizer.atomic.DiskFull: {path}: {DISK_FULL} while writing it "), raised
    assert "[EFBIG: File too large]; the previous file.bin is intact" in raised
    assert path.read_bytes() == b"the previous version"
    assert os.listdir(path.parent) == ["file.bin"]  # the temp file of the failed write is gone
