"""Resume after a hard kill (SIGKILL mid-run, no clean shutdown): same step count, optimizer state and EMA."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _small_training import QUIET_FLAGS, SMALL, as_flag, quiet_trainer

from data.photos import PhotosDataModule
from tokenizer.training import TokenizerModule

REPO = Path(__file__).resolve().parents[1]
SMALL_FLAG = as_flag(SMALL)  # --model.init_args.overrides


class Probe(pl.Callback):
    """Captures the state training resumes from, before the first resumed step."""

    def on_train_start(self, trainer, module):
        self.global_step = trainer.global_step
        self.optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers]  # live tensors
        self.ema = {k: v.clone() for k, v in module.ema_tokenizer.state_dict().items()}
        self.lecam = module.lecam.real_ema.clone()


def wait_for_checkpoint(path: Path, min_step: int, proc: subprocess.Popen, timeout: float = 400.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with code {proc.returncode}")
        if path.is_file():
            step = torch.load(path, map_location="cpu", weights_only=True)["global_step"]
            if step >= min_step:
                return
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout}s")


@pytest.mark.slow
def test_resume_after_sigkill_restores_step_optimizer_and_ema(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "ckpt" / "last.ckpt"
    args = [
        sys.executable, "train.py", "fit", "--config", "configs/tokenizer/tiny.yaml",
        "--trainer.max_steps", "100000", "--trainer.val_check_interval", "1000000",
        *QUIET_FLAGS,
        "--trainer.default_root_dir", str(run),  # without a logger, config.yaml goes here (not into the repo)
        "--trainer.callbacks.init_args.dirpath", str(run / "ckpt"),
        "--trainer.callbacks.init_args.every_n_train_steps", "2",
        "--model.init_args.overrides", SMALL_FLAG, "--model.init_args.ema_decay", "0.9",
        "--model.init_args.gan_weight", "0.1", "--model.init_args.gan_start", "1",
        "--model.init_args.lecam_weight", "0.01", "--model.init_args.warmup_steps", "2",
        "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_checkpoint(ckpt, min_step=6, proc=proc)
    finally:
        proc.kill()  # SIGKILL: no teardown, no final checkpoint
        proc.wait()
    assert proc.returncode == -9

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    step = saved["global_step"]
    assert step >= 6 and step % 2 == 0, "two optimizer steps (G and D) per batch"

    hp = saved["hyper_parameters"]
    module = TokenizerModule(**{k: v for k, v in hp.items() if not k.startswith("_")})
    probe = Probe()
    trainer = quiet_trainer(max_steps=step + 4, default_root_dir=str(tmp_path / "resumed"), limit_val_batches=0,
                            callbacks=[probe])
    trainer.fit(module, datamodule=PhotosDataModule(image_size=32, batch_size=4), ckpt_path=ckpt)

    assert probe.global_step == step
    assert trainer.global_step == step + 4 and module.generator_steps == (step + 4) // 2
    for resumed, stored in zip(probe.optimizer_states, saved["optimizer_states"]):
        assert resumed["state"].keys() == stored["state"].keys()
        for key, values in stored["state"].items():
            assert torch.equal(resumed["state"][key]["exp_avg"], values["exp_avg"])
            assert torch.equal(resumed["state"][key]["step"], values["step"])
    for name, value in probe.ema.items():
        assert torch.equal(value, saved["state_dict"][f"ema_tokenizer.{name}"]), name
    assert torch.equal(probe.lecam, saved["state_dict"]["lecam.real_ema"])
