"""Shared directories, with real processes: one writer per run directory and per token-set directory (a second is
refused at once, naming the holder; a dead holder's lock is taken over), and files readable as the umask allows."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _data_helpers import make_plain_tree
from _small_training import demo_run_command

from data.extract_tokens import main as extract
from data.sources import PhotoCrops
from data.tokens import load_token_records, shard_paths
from tokenizer.checkpoints import read_checkpoint
from tokenizer.directory_lock import LOCK_NAME, DirectoryInUse, lock_directory

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def extract_cmd(tok_dir: str, out: Path, crops: int, shard_size: int) -> list[str]:
    return [sys.executable, "-m", "data.extract_tokens", "--tokenizer", tok_dir, "--out", str(out), "--source",
            "photos", "--num-crops", str(crops), "--batch-size", "8", "--shard-size", str(shard_size), "--cpu",
            "--no-progress"]


def launch(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def stop_when(ready, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """SIGSTOP `proc` as soon as `ready()`: it holds its directory, mid-work, without racing the next process."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the first writer exited early with code {proc.returncode}"
        assert time.time() < deadline, f"the first writer was not ready within {timeout}s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)
    assert proc.poll() is None, "the first writer finished before it could be stopped: give it more work"


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def refusal(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, f"the second writer was not refused (exit {proc.returncode})"
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_two_concurrent_trainings_second_refused_then_resume_after_kill(tmp_path):
    """Before: both finished with status 0 into one run directory (step=N-v1.ckpt beside step=N.ckpt, the second
    run's config.yaml). Now the second is refused at once, naming the first, and writes nothing; once the first is
    killed with SIGKILL, its stale lock is taken over by a `--ckpt_path last` resume."""
    run = tmp_path / "demo"
    first = subprocess.Popen(demo_run_command(tmp_path, 100000, seed=1), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        stop_when(lambda: (run / "ckpt" / "last.ckpt").is_file(), first)
        before = listing(tmp_path)
        second = launch(demo_run_command(tmp_path, 4, seed=2))
        line = refusal(second)
        assert line.startswith(f"train.py: error: run directory {run.resolve()} is in use by pid {first.pid} on host "
                               f"{socket.gethostname()} (started ")  # fmt: skip
        assert "--trainer.logger.init_args.name" in line and "train.py fit" in line
        assert listing(tmp_path) == before  # nothing written, nothing removed
    finally:
        first.kill()  # SIGKILL, stopped or not: no teardown, the lock file keeps its record
        first.wait()
    assert f'"pid": {first.pid}' in (run / LOCK_NAME).read_text()
    step = read_checkpoint(run / "ckpt" / "last.ckpt")["global_step"]
    resumed = launch([*demo_run_command(tmp_path, step + 2, seed=1), "--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_checkpoint(run / "ckpt" / "last.ckpt")["global_step"] == step + 2
    assert not list(run.rglob("*-v1.ckpt")) and "seed_everything: 1" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_two_concurrent_extractions_second_refused_then_rerun_with_another_shard_size(tok_dir, tmp_path):
    """Before: two extractions with different --shard-size wrote shards of the same names with different records;
    both failed on duplicate keys, and so did every rerun. Now the second is refused at once; after the first is
    killed mid-way, a rerun with another --shard-size resumes: every crop exactly once."""
    out, n = tmp_path / "tokens", 1000
    first = subprocess.Popen(extract_cmd(tok_dir, out, n, 10), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        stop_when(lambda: bool(shard_paths(str(out))), first)
        before = listing(out)
        second = launch(extract_cmd(tok_dir, out, n, 7))
        line = refusal(second)
        assert line.startswith(f"data.extract_tokens: token-set directory {out.resolve()} is in use by pid "
                               f"{first.pid} on host {socket.gethostname()} (started ")  # fmt: skip
        assert line.endswith("wait for it to finish, or extract into another --out directory")
        assert listing(out) == before
    finally:
        first.kill()
        first.wait()
    rerun = launch(extract_cmd(tok_dir, out, n, 7))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    keys = load_token_records(str(out)).keys.tolist()
    crops = PhotoCrops(64, n, 0)
    assert sorted(keys) == [crops.key(i) for i in range(n)]  # each once, none lost


def test_a_wedged_token_set_is_refused_up_front_naming_the_shards_to_delete(tok_dir, tmp_path):
    """What two concurrent extractions left (shard names written by both, last writer wins, keys in two shards):
    a rerun used to encode everything, then fail on duplicate keys naming one shard, every time. Now it stops
    before any work, naming every shard to delete; doing that and rerunning completes."""
    def run(out: Path, shard_size: int):
        return extract(["--tokenizer", tok_dir, "--out", str(out), "--num-crops", "30", "--shard-size",
                        str(shard_size), "--batch-size", "8", "--cpu", "--no-progress"])  # fmt: skip

    wedged, other = tmp_path / "tokens", tmp_path / "other"
    run(wedged, 7)  # 5 shards: 000000..000004
    run(other, 10)  # 3 shards: 000000..000002, overwriting the first three as the race did
    for path in shard_paths(str(other)):
        shutil.copy(path, wedged / os.path.basename(path))
    with pytest.raises(SystemExit) as err:
        run(wedged, 7)
    message = str(err.value)
    assert "duplicate key(s)" in message and "re-run the same `python -m data.extract_tokens" in message
    named = message.split("holding them (")[1].split(")")[0].split()
    assert named and all((wedged / name).is_file() for name in named)
    for name in named:
        (wedged / name).unlink()
    assert run(wedged, 7)["num_records"] == 30
    crops = PhotoCrops(64, 30, 0)
    assert sorted(load_token_records(str(wedged)).keys.tolist()) == [crops.key(i) for i in range(30)]


HOLDER = """
import os, sys, time
from tokenizer.directory_lock import lock_directory
lock_directory(sys.argv[1], "run directory")
child = os.fork()  # a DataLoader worker: outlives a killed parent by seconds
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_lock_of_a_killed_holder_is_taken_over_while_its_forked_child_lives(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, env=ENV, text=True,
                              stdout=subprocess.PIPE)  # fmt: skip
    child = int(holder.stdout.readline())
    try:
        named = re.escape(f"run directory {os.path.realpath(tmp_path)} is in use by pid {holder.pid} on host ")
        with pytest.raises(DirectoryInUse, match=named):
            lock_directory(tmp_path, "run directory")
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # still alive, holding its copy of the descriptor
        with lock_directory(tmp_path, "run directory"):
            pass
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def convert_cmd(src: Path, out: Path, split: str) -> list[str]:
    return [sys.executable, "-m", "data.convert_shards", "--src", str(src), "--out", str(out), "--split", split,
            "--shard-size", "4", "--quiet"]


def test_a_second_conversion_of_a_split_is_refused_while_another_split_converts(tmp_path):
    """Two real `data.convert_shards` of one split into one --out would write shards of the same names over each
    other: the second is refused at once, naming the first; another split converts beside it; once the first is
    killed, a rerun completes the split."""
    src, out = tmp_path / "src", tmp_path / "shards"
    make_plain_tree(str(src), 40)  # 120 images, 30 shards: the first conversion is stopped well before its end
    first = subprocess.Popen(convert_cmd(src, out, "train"), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        stop_when(lambda: (out / ".train-state" / "plan.json").exists(), first)
        before = listing(out)
        second = launch(convert_cmd(src, out, "train"))
        line = refusal(second)
        assert line.startswith("data.convert_shards: error: the 'train' split's state directory"), line
        assert f"pid {first.pid} on host {socket.gethostname()}" in line and "another --out" in line, line
        assert listing(out) == before  # the refused run wrote nothing
        val = launch(convert_cmd(src, out, "val"))  # another split: its own lock
        assert val.returncode == 0, val.stderr
    finally:
        first.kill()
        first.wait()
    rerun = launch(convert_cmd(src, out, "train"))  # the dead holder's lock is taken over
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / "train-meta.json").read_text())["num_samples"] == 120
    assert json.loads((out / "val-meta.json").read_text())["num_samples"] == 120
