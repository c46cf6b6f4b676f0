"""The small tokenizer of the tests and the harness the tests train with: quiet Trainers, a loss recorder, batches
made in advance for the sync audit, and the least model a Trainer can fit, for tests of what the data side hands a
model."""

from __future__ import annotations

import os
import random
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from data.photos import PhotosDataModule
from tokenizer import OneDTokenizer

# The one small tokenizer of the tests: 32 px, 8 tokens, one block each side. Big enough to exercise every code
# path, small enough for CPU. A test that needs something else says so as a delta: {**SMALL, "codebook_size": 1024}.
SMALL = dict(image_size=32, patch_size=8, max_tokens=8, enc_width=32, enc_depth=1, enc_heads=2,
             dec_width=32, dec_depth=1, dec_heads=2, codebook_size=64)


def as_flag(overrides: dict) -> str:
    """The overrides as the YAML mapping that `--model.init_args.overrides` takes on the train.py command line."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in overrides.items()) + "}"


# What a test Trainer leaves out: a test reads what it checks from the module, a callback or a logger it asks for.
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
# The same as train.py flags, checkpoints kept: the runs launched through the CLI are there to write and resume them.
QUIET_FLAGS = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false"]  # fmt: skip


def tiny_fit_args(run, steps: int, *extra: str) -> list[str]:
    """`train.py` arguments: fit the tiny config at SMALL size and 32 px, quietly, into `run`, with a checkpoint
    every 2 steps in run/ckpt; `extra` flags are appended."""
    return [
        "fit", "--config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "configs", "tokenizer", "tiny.yaml"),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "1000000", *QUIET_FLAGS,
        "--trainer.default_root_dir", str(run),
        "--trainer.callbacks.init_args.dirpath", os.path.join(run, "ckpt"),
        "--trainer.callbacks.init_args.every_n_train_steps", "2",
        "--model.init_args.overrides", as_flag(SMALL), "--model.init_args.warmup_steps", "2",
        "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4", *extra,
    ]  # fmt: skip


def demo_run_command(root, steps: int, seed: int = 0) -> list[str]:
    """`python train.py fit` on the demo config at SMALL size, run from the repository, with its TensorBoard
    logger: the run directory is root/demo (config.yaml, events, tokenizer/) and checkpoints go to root/demo/ckpt
    every 2 steps."""
    return [sys.executable, "train.py", "fit", "--config", "configs/tokenizer/tiny.yaml",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "1000000",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.callbacks.init_args.dirpath", os.path.join(root, "demo", "ckpt"),
            "--trainer.callbacks.init_args.every_n_train_steps", "2",
            "--model.init_args.overrides", as_flag(SMALL), "--model.init_args.warmup_steps", "2",
            "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
            "--seed_everything", str(seed)]  # fmt: skip


def quiet_trainer(**settings) -> pl.Trainer:
    """A CPU Trainer with QUIET's settings, plus or overriding `settings` (a logger, max_steps, callbacks...)."""
    return pl.Trainer(**{"accelerator": "cpu", **QUIET, **settings})


def trainer(steps: int, precision: str, callbacks=(), log_every: int = 4) -> pl.Trainer:
    return quiet_trainer(max_steps=steps, precision=precision, limit_val_batches=0, log_every_n_steps=log_every,
                         callbacks=list(callbacks))


def fresh_start(model: OneDTokenizer):
    """A function that puts the codebook (EMA-updated by every training forward) and the random draws back where
    they are now, so that two training passes compute the same function."""
    state = {k: v.clone() for k, v in model.quantizer.state_dict().items()}

    def restart():
        model.quantizer.load_state_dict(state)
        random.seed(0)
        torch.manual_seed(0)

    return restart


def data(batch_size: int = 4) -> PhotosDataModule:
    return PhotosDataModule(image_size=32, batch_size=batch_size, train_crops_per_epoch=1000)


def fixed_batches(batches: int, batch_size: int = 4, image_size: int = 32) -> DataLoader:
    """`batches` batches of (random images [B, 3, S, S], labels [B]) made before the fit, for the sync audit
    (tokenizer/training/sync_audit.py): handing them out runs no operator it looks for, where PhotosDataModule's
    crops (drawn in this process with num_workers=0) read random numbers with int(tensor)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batches * batch_size, 3, image_size, image_size, generator=g)
    return DataLoader(TensorDataset(images, torch.zeros(batches * batch_size, dtype=torch.long)), batch_size=batch_size)


class LossRecorder(pl.Callback):
    """The loss of every training batch, as floats (`losses`), from what training_step returned (Lightning hands
    callbacks {"loss": ...} under automatic optimization, the tensor itself under manual optimization)."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


class TinyModule(pl.LightningModule):
    """The least a Trainer can fit on batches whose first item is images [B, 3, H, W]: a linear map of each image's
    mean colour, trained by SGD. Records the size of every training batch it gets (`batch_sizes`)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.batch_sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        self.batch_sizes.append(len(batch[0]))
        return self.lin(batch[0].mean((2, 3))).mean()  # on an empty batch: NaN

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
