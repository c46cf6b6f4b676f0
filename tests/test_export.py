"""The trained tokenizer's export and its recovery (issue 25, finding 7): when the disk fills up while `tokenizer/` is
written at the end of training, rerunning with `--ckpt_path last` exports it again (it used to report `max_steps
reached`, exit 0 and export nothing), and `onedtok export CKPT --out DIR` writes from a checkpoint exactly what the
end of training writes (the EMA weights when EMA is on)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _small_training import tiny_fit_args

from tokenizer import OneDTokenizer
from tokenizer.checkpoints import read_checkpoint, tokenizer_from_checkpoint
from tokenizer.command import main as onedtok
from tokenizer.persistence import read_provenance

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")


def cli_args(run: Path, steps: int, *extra: str) -> list[str]:
    """The tiny config at 32 px with EMA, a checkpoint every 2 steps in run/ckpt and the export in run/tokenizer."""
    return tiny_fit_args(run, steps, "--model.init_args.ema_decay", "0.9",
                         "--model.init_args.export_dir", str(run / "tokenizer"), *extra)


def train_with_full_disk_at_the_end(run: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """train.py in its own process; the disk fills up after the last checkpoint, while the tokenizer is exported."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    args = [sys.executable, "train.py", *cli_args(run, steps, *extra),
            "--trainer.callbacks+=_disk_full.FullDiskAtTrainEnd"]  # fmt: skip
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def loads(directory: Path) -> bool:
    try:
        OneDTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        return False
    return True


def same_weights(directory: Path, checkpoint: Path) -> bool:
    """The export in `directory` is the checkpoint's evaluation tokenizer (EMA), tensor for tensor."""
    saved, want = OneDTokenizer.from_pretrained(directory).state_dict(), tokenizer_from_checkpoint(checkpoint)
    return all(torch.equal(t, want.state_dict()[k]) for k, t in saved.items())


@pytest.mark.slow
def test_ckpt_path_last_exports_again_what_a_full_disk_kept_from_being_written(tmp_path, capfd):
    import train

    run = tmp_path / "run"
    last = run / "ckpt" / "last.ckpt"
    failed = train_with_full_disk_at_the_end(run, 2)
    assert failed.returncode != 0, failed.stderr[-3000:]
    assert read_checkpoint(last)["global_step"] == 2  # the checkpoints were written before the disk filled up
    assert not loads(run / "tokenizer")

    capfd.readouterr()
    train.main(cli_args(run, 2, "--ckpt_path", "last"))  # the documented recovery: rerun with --ckpt_path last
    err = capfd.readouterr().err
    assert loads(run / "tokenizer"), err[-3000:]
    assert f"export: {run / 'tokenizer'} does not load" in err
    assert same_weights(run / "tokenizer", last) and read_provenance(run / "tokenizer")["optimizer_steps"] == 2

    stamp = (run / "tokenizer" / "model.safetensors").stat().st_mtime_ns
    train.main(cli_args(run, 2, "--ckpt_path", "last"))  # complete: nothing is written again
    assert "holds the weights of optimizer step 2; nothing to export" in capfd.readouterr().err
    assert (run / "tokenizer" / "model.safetensors").stat().st_mtime_ns == stamp

    # resumed to step 4, the export fails again: tokenizer/ keeps the complete export of step 2, now stale
    failed = train_with_full_disk_at_the_end(run, 4, "--ckpt_path", "last")
    assert failed.returncode != 0, failed.stderr[-3000:]
    assert read_checkpoint(last)["global_step"] == 4
    assert read_provenance(run / "tokenizer")["optimizer_steps"] == 2 and not same_weights(run / "tokenizer", last)
    capfd.readouterr()
    train.main(cli_args(run, 4, "--ckpt_path", "last"))
    assert "holds other weights (exported at optimizer step 2); exporting the weights of optimizer step 4" in \
        capfd.readouterr().err
    assert same_weights(run / "tokenizer", last) and read_provenance(run / "tokenizer")["optimizer_steps"] == 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run with EMA: its exported tokenizer/ and its last.ckpt."""
    import train

    run = tmp_path_factory.mktemp("export") / "run"
    train.main(cli_args(run, 2))
    return run / "tokenizer", run / "ckpt" / "last.ckpt"


def test_export_command_writes_what_the_end_of_training_wrote(trained, tmp_path):
    exported, last = trained
    assert onedtok(["export", str(last), "--out", str(tmp_path / "again")]) == 0
    # the same weights (EMA) under the same config. Not the same file bytes: safetensors writes its metadata keys in
    # a random order (a Rust HashMap), so two saves of one model differ in their header
    again, trained_end = OneDTokenizer.from_pretrained(tmp_path / "again"), OneDTokenizer.from_pretrained(exported)
    assert again.config == trained_end.config
    assert all(torch.equal(t, trained_end.state_dict()[k]) for k, t in again.state_dict().items())
    record = read_provenance(tmp_path / "again")
    assert record["weights"] == "EMA" and record["optimizer_steps"] == 2 and record["exported_from"] == str(last)
    assert record["objective_and_optimizer"]["ema_decay"] == 0.9


def test_export_command_refuses_non_finite_weights(trained, tmp_path):
    _, last = trained
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    name = next(k for k in ckpt["state_dict"] if k.startswith("ema_tokenizer.decoder."))
    ckpt["state_dict"][name].view(-1)[0] = float("nan")  # what export must never write
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match=rf"weight '{name.removeprefix('ema_tokenizer.')}'.*NaN/inf"):
        onedtok(["export", str(tmp_path / "nan.ckpt"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
