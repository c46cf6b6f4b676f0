"""What `train.py` prints while it trains: values the host read on logging steps, and nothing read in between.

On a terminal: Lightning's tqdm bar, its postfix the loss and the validation metrics as the last logging step read
them. Anywhere else (a SLURM log, a pipe, `make demo > log`) a bar is redrawn into the file once per step, so
instead: one plain line per `every_n_steps` (a multiple of `trainer.log_every_n_steps`), on global rank 0 only:

    step 200/800 (25%)  loss 0.04321  val/recon 0.03987  46.2 img/s  ETA 2m10s
    step 400/800 (50%)  validation  val/recon 0.03512

GPU path: no metric is logged with `prog_bar=True` during training. Lightning converts every progress-bar value
in its result cache with `.item()` after every batch, logging step or not, with or without a bar (its logger
connector's `on_batch_end`): one host sync per step for the whole run. This callback reads `train/loss` itself,
on logging steps only, where the host has just waited for the device anyway (`check_finite`), so a read there
waits for nothing more. step counts optimizer steps (what `max_steps` counts: two per batch with a discriminator);
img/s counts the images of every rank (a generator "image" is one token sequence).
"""

from __future__ import annotations

import sys
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import get_standard_metrics

LOSS_KEY = "train/loss"  # what both stages (TokenizerModule, GeneratorModule) log on logging steps


class StepProgress(TQDMProgressBar):
    """The progress display of train.py (tokenizer/training/cli.py adds it when the progress bar is on).
    `plain`: lines instead of a bar (default: when stdout is not a terminal). `every_n_steps`: batches between two
    lines (default and minimum: `log_every_n_steps`; rounded up to a multiple of it)."""

    def __init__(self, every_n_steps: int | None = None, plain: bool | None = None):
        super().__init__()
        self.plain = not sys.stdout.isatty() if plain is None else plain
        self.every_n_steps = every_n_steps
        self.shown: dict[str, float] = {}  # host values: the loss of the last logging step, validation metrics
        self._logging = False
        self._mark: tuple[float, int, int] | None = None  # (time, global_step, images) at the last line
        self._images = 0  # images trained since the fit started, all ranks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.plain:
            self.disable()  # tqdm bars off; LightningModule.print falls back to print()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        return {**get_standard_metrics(trainer), **self.shown}  # host values only: the bar reads no tensor

    # ---- training ------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._mark, self._images = (time.perf_counter(), trainer.global_step, 0), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        logging_step = getattr(pl_module, "is_logging_step", None)  # both stages define it (before their steps)
        self._logging = bool(logging_step()) if logging_step is not None else False
        self._images += batch_size(batch) * trainer.world_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._logging and trainer.is_global_zero:
            self.read_logged_values(trainer)
            if self.plain and self._line_due(trainer):
                print(self.line(trainer), flush=True)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # the bar (off when plain)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn != "fit" or trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = {k: v for k, v in trainer.progress_bar_metrics.items() if isinstance(v, (int, float))}
        self.shown.update(values)  # already on the host: Lightning read them when the validation ended
        if self.plain and values:
            print(f"{self.step_text(trainer)}  validation  " + "  ".join(f"{k} {v:.4g}" for k, v in values.items()),
                  flush=True)  # fmt: skip

    def read_logged_values(self, trainer: pl.Trainer) -> None:
        """On a logging step: the step's loss (a device read, where the step has already waited for the device)."""
        loss = trainer.callback_metrics.get(LOSS_KEY)
        if isinstance(loss, torch.Tensor):
            self.shown["loss"] = float(loss)

    def _line_due(self, trainer: pl.Trainer) -> bool:
        every = max(1, trainer.log_every_n_steps)
        every = every * -(-(self.every_n_steps or every) // every)  # rounded up to a multiple of it
        return getattr(trainer.lightning_module, "generator_steps", trainer.global_step) % every == 0

    def line(self, trainer: pl.Trainer) -> str:
        """The plain line for now, and the mark the next line's rates start from."""
        now, step = time.perf_counter(), trainer.global_step
        last_time, last_step, last_images = self._mark
        elapsed = max(now - last_time, 1e-9)
        self._mark = (now, step, self._images)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        parts = [self.step_text(trainer)]
        parts += [f"{name} {value:.4g}" for name, value in self.shown.items()]
        parts.append(f"{(self._images - last_images) / elapsed:.1f} img/s")
        if total and step > last_step:
            parts.append(f"ETA {duration((total - step) * elapsed / (step - last_step))}")
        return "  ".join(parts)

    @staticmethod
    def step_text(trainer: pl.Trainer) -> str:
        """'step 200/800 (25%)', or 'step 200' when max_steps does not bound the run."""
        step, total = trainer.global_step, trainer.max_steps
        return f"step {step}/{total} ({100 * step / total:.0f}%)" if total and total > 0 else f"step {step}"


def batch_size(batch) -> int:
    """Samples in a batch: the leading size of its first tensor (images [B, 3, H, W], or ids [B, K])."""
    while isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, dict) and batch:
        return batch_size(next(iter(batch.values())))
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() else 0


def duration(seconds: float) -> str:
    """3d04h, 2h05m, 4m10s, 12s."""
    s = int(round(seconds))
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s % 60:02d}s" if m else f"{s}s"


__all__ = ["StepProgress", "batch_size", "duration", "LOSS_KEY"]
