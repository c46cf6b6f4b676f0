"""What train.py prints while it trains (tokenizer/training/progress.py): plain lines when stdout is a pipe or a
file, the tqdm bar on a terminal, and neither reads the device between logging steps."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import lightning.pytorch as pl
import pytest
from _small_training import SMALL, as_flag, fixed_batches, quiet_trainer

from tokenizer.training import TokenizerModule
from tokenizer.training.progress import StepProgress, duration
from tokenizer.training.sync_audit import StepSyncAudit

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^step (\d+)/12 \(\d+%\)  loss [0-9.e+-]+  (val/recon [0-9.e+-]+  )?[0-9.]+ img/s  ETA \S+$")
VALIDATION = re.compile(r"^step 8/12 \(67%\)  validation  val/recon [0-9.e+-]+$")


def train_command(run: Path) -> list[str]:
    """train.py on the demo config, shrunk: 12 steps, a logging step every 4, progress display as configured."""
    return [sys.executable, "train.py", "fit", "--config", "configs/tokenizer/tiny.yaml",
            "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "4", "--trainer.val_check_interval", "8",
            "--trainer.limit_val_batches", "1",
            "--trainer.logger", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(run), "--trainer.callbacks.init_args.dirpath", str(run / "ckpt"),
            "--model.init_args.overrides", as_flag(SMALL), "--model.init_args.export_dir", str(run / "tokenizer"),
            "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4"]  # fmt: skip


@pytest.mark.slow
def test_train_py_prints_plain_lines_into_a_pipe_and_the_bar_on_a_terminal(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    piped = subprocess.run(train_command(tmp_path / "piped"), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "\r" not in piped.stdout, "no progress-bar redraws in a log"
    lines = piped.stdout.splitlines()
    assert len(lines) == 4 and VALIDATION.match(lines[2]), lines  # the validation at step 8, when it ends
    assert [int(LINE.match(line)[1]) for line in lines[:2] + lines[3:]] == [4, 8, 12], lines
    assert "val/recon" not in lines[1] and "val/recon" in lines[3], "validation values from the validation on"

    # the same run on a terminal (a pseudo-terminal 100 columns wide): Lightning's tqdm bar, with the loss
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen(train_command(tmp_path / "terminal"), cwd=REPO, env=env, stdout=child,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # EIO: the child's side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(parent)
    assert proc.wait(timeout=600) == 0
    shown = out.decode(errors="replace")
    assert "Epoch 0" in shown and "12/12" in shown and "loss=" in shown, shown[-2000:]
    assert not any(LINE.match(line.strip()) for line in shown.splitlines())


def test_progress_lines_read_the_device_on_logging_steps_only(capsys):
    """The plain lines of a fit, under the whole-step sync audit: nothing read on the other steps. Every 8 batches
    (a multiple of log_every_n_steps 4): one line at batch 8 of 12."""
    pl.seed_everything(0)
    module = TokenizerModule(preset="tiny", overrides=SMALL, warmup_steps=1, fused_optimizer=True)
    audit = StepSyncAudit(start=2)
    progress = StepProgress(every_n_steps=6, plain=True)  # rounded up to 8
    trainer = quiet_trainer(max_steps=12, log_every_n_steps=4, enable_progress_bar=True, callbacks=[audit, progress])
    trainer.fit(module, train_dataloaders=fixed_batches(12))
    assert not audit.quiet_syncs(), audit.quiet_syncs()
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1, printed
    assert re.match(r"step 8/12 \(67%\)  loss 0\.\d+  [0-9.]+ img/s  ETA \S+$", printed[0]), printed


def test_duration():
    assert [duration(s) for s in (0.4, 12, 250, 7500, 3 * 86400 + 4 * 3600 + 59)] == ["0s", "12s", "4m10s", "2h05m",
                                                                                      "3d04h"]
