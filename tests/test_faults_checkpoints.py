"""Faults around checkpoints and resume, injected for real: 0-byte and truncated checkpoints, kill -9 during a
checkpoint write with $TMPDIR on another directory tree, a resume with a config of another architecture."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _small_training import QUIET_FLAGS, SMALL, as_flag

from tokenizer.atomic import atomic_open, is_partial, remove_stale_partials
from tokenizer.checkpoints import CheckpointError, checkpoint_files, newest_loadable, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL_FLAG = as_flag(SMALL)  # --model.init_args.overrides


def cli_args(run: Path, steps: int, overrides: str = SMALL_FLAG, every: int = 2) -> list[str]:
    return [
        "fit", "--config", str(REPO / "configs/tokenizer/tiny.yaml"),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "1000000",
        *QUIET_FLAGS,
        "--trainer.default_root_dir", str(run),  # without a logger, config.yaml goes here
        "--trainer.callbacks.init_args.dirpath", str(run / "ckpt"),
        "--trainer.callbacks.init_args.every_n_train_steps", str(every),
        "--model.init_args.overrides", overrides, "--model.init_args.warmup_steps", "2",
        "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
    ]  # fmt: skip


@pytest.fixture
def trained_run(tmp_path, one_thread):
    """A run of 4 steps with checkpoints at steps 2 and 4 (step=2.ckpt, step=4.ckpt, last.ckpt)."""
    import train

    run = tmp_path / "run"
    train.main(cli_args(run, 4))
    return run


pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_last_skips_an_empty_last_ckpt(trained_run, capfd):
    import train

    ckpt = trained_run / "ckpt"
    newest_good = max((p for p in ckpt.glob("*.ckpt") if p.name != "last.ckpt"), key=lambda p: p.stat().st_mtime)
    (ckpt / "last.ckpt").write_bytes(b"")  # what a kill during a cross-filesystem copy left behind
    cli = train.main(cli_args(trained_run, 6) + ["--ckpt_path", "last"])
    err = capfd.readouterr().err
    assert "last.ckpt is empty (0 bytes)" in err and f"resume: from {newest_good}" in err
    assert cli.trainer.global_step == 6  # continued from step 4, not restarted
    assert read_checkpoint(ckpt / "last.ckpt")["global_step"] == 6


def test_resume_last_takes_a_newer_slurm_requeue_checkpoint(trained_run, capfd):
    import shutil

    import train

    ckpt = trained_run / "ckpt"
    step2 = next(p for p in ckpt.glob("*.ckpt") if read_checkpoint(p)["global_step"] == 2)
    hpc = trained_run / "hpc_ckpt_1.ckpt"  # where Lightning's SIGUSR1 handler saves (default_root_dir)
    shutil.copy(step2, hpc)  # newest by mtime: Lightning's own `last` would ignore it
    cli = train.main(cli_args(trained_run, 6) + ["--ckpt_path", "last"])
    assert f"resume: from {hpc}" in capfd.readouterr().err
    assert cli.trainer.global_step == 6
    # resumed from an older state, Lightning writes last-v1.ckpt beside last.ckpt; the next `last` finds it
    assert read_checkpoint(newest_loadable(checkpoint_files([ckpt]))[0])["global_step"] == 6


def test_explicit_unreadable_checkpoint_is_named_with_working_alternatives(trained_run):
    import train

    ckpt = trained_run / "ckpt"
    empty, truncated = ckpt / "empty.ckpt", ckpt / "truncated.ckpt"
    empty.write_bytes(b"")
    data = (ckpt / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"empty\.ckpt is empty \(0 bytes\).*Checkpoints that load: .*last"):
        train.main(cli_args(trained_run, 6) + ["--ckpt_path", str(empty)])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt \(\d+ bytes\) cannot be read"):
        train.main(cli_args(trained_run, 6) + ["--ckpt_path", str(truncated)])


def test_failed_resume_with_another_architecture_keeps_config_yaml(trained_run):
    import train

    config = trained_run / "config.yaml"
    before = config.read_text()
    ckpts = {p.name: p.read_bytes() for p in (trained_run / "ckpt").glob("*.ckpt")}
    # K 8 -> 16 changes shapes; heads 2 -> 4 keeps every shape and would silently compute another function
    for change, field in (("max_tokens: 8", "max_tokens: checkpoint 8, config 16"),
                          ("enc_heads: 2", "enc_heads: checkpoint 2, config 4")):
        other = SMALL_FLAG.replace(change, change[:-1] + str(int(change[-1]) * 2))
        with pytest.raises(CheckpointError, match=field):
            train.main(cli_args(trained_run, 6, overrides=other) + ["--ckpt_path", "last"])
        assert config.read_text() == before, "a failed resume rewrote the run's config.yaml"
    assert {p.name: p.read_bytes() for p in (trained_run / "ckpt").glob("*.ckpt")} == ckpts


def test_successful_resume_with_a_changed_config_keeps_the_previous_version(trained_run):
    import train

    before = (trained_run / "config.yaml").read_text()
    train.main(cli_args(trained_run, 6) + ["--ckpt_path", "last"])  # max_steps 4 -> 6: same architecture
    assert (trained_run / "config.1.yaml").read_text() == before
    assert "max_steps: 6" in (trained_run / "config.yaml").read_text()


def test_atomic_open_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["meta.json"], "the temp file of a failed write must not survive"
    (tmp_path / "foreign.tmp").write_text("not ours")
    (tmp_path / ".meta.json.partial-x.tmp").write_text("ours")
    assert [Path(p).name for p in remove_stale_partials(tmp_path)] == [".meta.json.partial-x.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["foreign.tmp", "meta.json"]


def _other_tree_tmpdir(tmp_path: Path) -> Path:
    """A $TMPDIR on another filesystem when there is one (/dev/shm is tmpfs on Linux), as on clusters where the
    old writer copied across filesystems; otherwise another directory tree."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        d = shm / f"onedtok-test-{os.getpid()}-{time.monotonic_ns()}"
    else:
        d = tmp_path / "elsewhere" / "tmp"
    d.mkdir(parents=True)
    return d


@pytest.mark.slow
def test_kill_during_checkpoint_write_loses_nothing(tmp_path):
    """SIGKILL while a checkpoint is being written (a checkpoint every step, so a write is caught in flight):
    every *.ckpt still loads, the temp file is beside it (not in $TMPDIR), and the next run removes it."""
    run, ckpt = tmp_path / "run", tmp_path / "run" / "ckpt"
    tmpdir = _other_tree_tmpdir(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir)}
    # A wide codebook makes each checkpoint a few MB, so a write lasts long enough to be caught in flight.
    fat = SMALL_FLAG.replace("codebook_size: 64", "codebook_size: 16384")
    args = [sys.executable, "train.py", *cli_args(run, 100000, overrides=fat, every=1)]
    caught = False

    def in_flight() -> bool:  # a temp file of a checkpoint write exists, beside it or (old writer) in $TMPDIR
        return (ckpt.is_dir() and any(is_partial(n) for n in os.listdir(ckpt))) or bool(os.listdir(tmpdir))

    try:
        for _ in range(3):  # each attempt is one kill; a kill that lands between writes is tried again
            proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.time() + 240
            try:
                while time.time() < deadline and proc.poll() is None:
                    if in_flight() and any(ckpt.glob("*.ckpt")):
                        break
                    time.sleep(0.0005)
            finally:
                proc.kill()
                _, err = proc.communicate()
            assert proc.returncode == -9, err.decode()[-2000:]
            caught = in_flight()
            if caught:
                break
        assert caught, "no kill landed during a checkpoint write"
        assert os.listdir(tmpdir) == [], "the checkpoint writer must not stage files in $TMPDIR"
        steps = [read_checkpoint(p)["global_step"] for p in ckpt.glob("*.ckpt")]  # raises if any is damaged
        assert steps
        path, rejected = newest_loadable(checkpoint_files([ckpt]))
        assert rejected == [] and read_checkpoint(path)["global_step"] == max(steps)

        # the next run resumes and its first checkpoint write clears what the killed writer left behind
        resume = [sys.executable, "train.py", *cli_args(run, max(steps) + 2, overrides=fat, every=1),
                  "--ckpt_path", "last"]
        done = subprocess.run(resume, cwd=REPO, env=env, capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert not [n for n in os.listdir(ckpt) if is_partial(n)]
        assert read_checkpoint(ckpt / "last.ckpt")["global_step"] == max(steps) + 2
        assert os.listdir(tmpdir) == []
    finally:
        if tmpdir.parent == Path("/dev/shm"):
            for p in tmpdir.iterdir():
                p.unlink()
            tmpdir.rmdir()


def test_read_checkpoint_rejects_non_checkpoints(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="junk.ckpt .* cannot be read"):
        read_checkpoint(junk)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_resume_last_without_a_checkpoint_directory_in_the_config(tmp_path):
    """A ModelCheckpoint without dirpath (its directory is only known after setup, as in the multi-node smoke
    config): `--ckpt_path last` is left to Lightning's own lookup instead of being read as a file name."""
    import train

    run = tmp_path / "run"

    def args(steps: int) -> list[str]:
        a = cli_args(run, steps)
        a[a.index("--trainer.callbacks.init_args.dirpath") + 1] = "null"
        return a

    train.main(args(4))
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert train.main(args(6) + ["--ckpt_path", "last"]).trainer.global_step == 6
