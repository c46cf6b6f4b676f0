"""A full disk, injected for real (RLIMIT_FSIZE: the kernel refuses to grow a file, EFBIG, see _disk_full.py): every
command ends with one line naming the file, "disk full (no space left)" and that the previous file is intact, and
leaves that file and no temp file behind. A checkpoint write used to end in `RuntimeError: ... unexpected pos` and
a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from _data_helpers import make_plain_tree
from _disk_full import run_with_file_size_limit
from _small_training import QUIET_FLAGS, SMALL, as_flag

from tokenizer.atomic import is_partial
from tokenizer.checkpoints import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
DISK_FULL = "disk full (no space left)"


def one_line_error(proc, prog: str) -> str:
    """The single error line a command printed last on stderr (asserting there is no traceback)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{prog}: error: "), proc.stderr[-3000:]
    return line


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


@pytest.mark.slow
def test_train_py_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_checkpoints(tmp_path):
    import train

    run = tmp_path / "run"

    def args(steps: int) -> list[str]:
        return ["fit", "--config", str(REPO / "configs/tokenizer/tiny.yaml"), "--trainer.max_steps", str(steps),
                "--trainer.val_check_interval", "1000000", *QUIET_FLAGS, "--trainer.default_root_dir", str(run),
                "--trainer.callbacks.init_args.dirpath", str(run / "ckpt"),
                "--trainer.callbacks.init_args.every_n_train_steps", "2",
                "--model.init_args.overrides", as_flag(SMALL), "--model.init_args.warmup_steps", "2",
                "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4"]  # fmt: skip

    train.main(args(2))
    last = run / "ckpt" / "last.ckpt"
    before = {p.name: p.read_bytes() for p in (run / "ckpt").iterdir()}
    # the disk has room for the run's small files (config.yaml), not for another checkpoint
    limit = last.stat().st_size // 2
    proc = run_with_file_size_limit([sys.executable, "train.py", *args(4), "--ckpt_path", "last"], limit, cwd=REPO,
                                    env=ENV, timeout=600)  # fmt: skip
    line = one_line_error(proc, "train.py")
    assert f"{run / 'ckpt'}/epoch=0-step=4.ckpt: {DISK_FULL}" in line, line
    assert "nothing was written at" in line
    assert {p.name: p.read_bytes() for p in (run / "ckpt").iterdir()} == before  # step 2 intact, nothing partial
    assert read_checkpoint(last)["global_step"] == 2


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizer import OneDTokenizer

    torch.manual_seed(0)
    return OneDTokenizer.from_preset("tiny", **SMALL).save_pretrained(tmp_path_factory.mktemp("tok") / "tokenizer")


def _commands(tokenizer_dir: Path, tmp_path: Path) -> dict[str, tuple[list[str], Path]]:
    """{prog: (command line, the output it writes)} of the commands that write files, on a small folder."""
    make_plain_tree(str(tmp_path / "images"), 3, classes=("a", "b"), size=(40, 40))
    onedtok = [sys.executable, "-c", "import sys; from tokenizer.command import main; sys.exit(main())"]
    return {
        "onedtok encode": ([*onedtok, "encode", str(tmp_path / "images"), "--tokenizer", str(tokenizer_dir),
                            "--num-tokens", "4", "--out", str(tmp_path / "t.npz"), "--quiet"], tmp_path / "t.npz"),
        "data.extract_tokens": ([sys.executable, "-m", "data.extract_tokens", "--tokenizer", str(tokenizer_dir),
                                 "--out", str(tmp_path / "tokens"), "--source", "folder", "--root",
                                 str(tmp_path / "images"), "--cpu", "--no-progress"], tmp_path / "tokens"),
        "data.convert_shards": ([sys.executable, "-m", "data.convert_shards", "--src", str(tmp_path / "images"),
                                 "--out", str(tmp_path / "shards"), "--split", "train", "--quiet"],
                                tmp_path / "shards"),
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("prog", ["onedtok encode", "data.extract_tokens", "data.convert_shards"])
def test_commands_on_a_full_disk_end_with_one_line(prog, tokenizer_dir, tmp_path):
    args, output = _commands(tokenizer_dir, tmp_path)[prog]
    proc = run_with_file_size_limit(args, 200, cwd=REPO, env=ENV, timeout=300)  # below any file they write
    line = one_line_error(proc, prog)
    assert DISK_FULL in line and str(output) in line, line
    written = list(output.rglob("*")) if output.is_dir() else [output] if output.exists() else []
    assert not [p for p in written if is_partial(p.name)], written
    assert not [p for p in written if p.is_file() and p.stat().st_size > 200], written


def test_onedtok_bad_config_value_and_unwritable_output_are_one_line(tokenizer_dir, tmp_path):
    import json
    import shutil
    import subprocess

    onedtok = [sys.executable, "-c", "import sys; from tokenizer.command import main; sys.exit(main())"]
    bad = Path(shutil.copytree(tokenizer_dir, tmp_path / "bad"))
    meta = json.loads((bad / "config.json").read_text())
    meta["config"]["patch_size"] = 0
    (bad / "config.json").write_text(json.dumps(meta))
    proc = subprocess.run([*onedtok, "info", str(bad)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert one_line_error(proc, "onedtok info").endswith("TokenizerConfig.patch_size must be >= 1, got 0")

    (tmp_path / "a_file").write_text("not a folder")
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "img.png")
    out = tmp_path / "a_file" / "t.npz"  # a folder that is a file: the system's OSError
    proc = subprocess.run([*onedtok, "encode", str(tmp_path / "img.png"), "--tokenizer", str(tokenizer_dir),
                           "--num-tokens", "2", "--out", str(out), "--quiet"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert str(tmp_path / "a_file") in one_line_error(proc, "onedtok encode")
    debug = subprocess.run([*onedtok, "info", str(bad)], cwd=REPO, env={**ENV, "ONEDTOK_DEBUG": "1"},
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # ONEDTOK_DEBUG=1: the whole traceback
