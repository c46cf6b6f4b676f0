"""Stopping a training run whose loss or gradient norm has become NaN or inf, without a host sync per step.

A non-finite loss makes NaN gradients, and the next optimizer step writes NaN into every weight. Nothing fails
after that: the run ends with status 0, exports a NaN model, `onedtok encode` gives all-zero ids, `decode` black
images, and the report a PSNR. `DivergenceGuard` (a LightningModule mixin, used by the tokenizer and the generator
stages) stops such a run with `TrainingDiverged`:

- every step ORs "this loss / gradient norm is not finite" into one boolean device tensor (`watch_finite`): a few
  tiny kernels, no read on the host, nothing added to the loss;
- the flag is read only where the host reads the device anyway: on logging steps (the caller's `check_finite`),
  before a checkpoint is written (a checkpoint of diverged weights is never saved) and when training ends (before
  the export). So a run stops at most `log_every_n_steps` batches after it diverged, and the error names that range.

Under DDP the gradients are all-reduced before their norm is taken, so a NaN on one rank trips every rank's flag
at the same step, and all ranks stop together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CheckpointError, checkpoint_files, read_checkpoint
from ..persistence import non_finite_tensors


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf: the weights are lost from that step on."""


class DivergenceGuard:
    """Mixin for LightningModules (list it before LightningModule). Call `watch_finite(loss, grad_norm, ...)` every
    step and `check_finite(step)` on logging steps; checkpoint saves and the end of training check by themselves."""

    _nonfinite: torch.Tensor | None = None  # bool [] on the training device: any watched value was NaN/inf
    _finite_through: int = 0  # the last optimizer step known to be finite (read on the host)

    def watch_finite(self, *values: torch.Tensor) -> None:
        """OR "some value is NaN/inf" into the device flag. No host sync: the flag is only read in check_finite."""
        for value in values:
            bad = ~torch.isfinite(value.detach()).all()  # [] bool, on the value's device
            # a 0-dim CPU value (e.g. the zero grad norm of a step without gradients) combines with a CUDA flag
            self._nonfinite = bad if self._nonfinite is None else torch.logical_or(self._nonfinite, bad)

    def check_finite(self, step: int) -> None:
        """Read the flag (a host sync: call it only where the host reads the device anyway) and raise
        TrainingDiverged if it is set. `step`: the last optimizer step whose values were watched."""
        if self._nonfinite is None or not bool(self._nonfinite):
            self._finite_through = max(self._finite_through, int(step))
            return
        raise TrainingDiverged(divergence_message(self, self._finite_through + 1, int(step)))

    # ---- Lightning hooks ------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._nonfinite, self._finite_through = None, int(self.global_step)  # a resume starts from a clean flag
        super().on_train_start()

    def on_train_end(self) -> None:
        self.check_finite(self.global_step)  # the steps since the last logging step; before any export
        super().on_train_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # raised before Lightning writes the file: a checkpoint of diverged weights would be `--ckpt_path last`
        self.check_finite(self.global_step)
        super().on_save_checkpoint(checkpoint)


def divergence_message(module, first: int, last: int) -> str:
    """What went wrong, where, the newest checkpoint to go back to, and what to change."""
    every = getattr(module.trainer, "log_every_n_steps", None)
    where = f"at optimizer step {last}" if first >= last else f"between optimizer steps {first} and {last}"
    lines = [f"training diverged: the loss or the gradient norm became NaN/inf {where} (checked every "
             f"log_every_n_steps={every} steps and before each checkpoint, to keep the steps free of host syncs). "
             "The run stops here: nothing is exported and no checkpoint of the diverged weights is written."]
    dirs = [cb.dirpath for cb in getattr(module.trainer, "checkpoint_callbacks", []) if getattr(cb, "dirpath", None)]
    found = last_finite_checkpoint(dirs)
    if found is not None:
        path, step = found
        lines.append(f"Last finite checkpoint: {path} (optimizer step {step}); continue from it with "
                     f"--ckpt_path {path} after one of the changes below.")
    else:
        where_ckpt = ", ".join(map(str, dirs)) or "(no checkpoint directory)"
        lines.append(f"No finite checkpoint of this run in {where_ckpt}: start again after one of the changes below.")
    hp = getattr(module, "hparams", {})
    tries = []
    if "lr" in hp:
        tries.append(f"a lower learning rate (lr is {hp['lr']:g})")
    if "warmup_steps" in hp:
        tries.append(f"a longer warmup (warmup_steps is {hp['warmup_steps']})")
    if "grad_clip" in hp:
        tries.append(f"gradient clipping by norm (grad_clip is {hp['grad_clip']})")
    precision = str(getattr(module.trainer, "precision", ""))
    tries.append(f"fp32 (--trainer.precision 32-true) if it runs in bf16 (precision is {precision})")
    lines.append("Try: " + "; ".join(tries) + ".")
    return "\n".join(lines)


def last_finite_checkpoint(directories: list[str | Path]) -> tuple[Path, int] | None:
    """The newest checkpoint in `directories` that loads and whose weights are all finite, with its step."""
    for path in checkpoint_files(directories):
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError:
            continue
        if not non_finite_tensors(ckpt["state_dict"]):
            return path, int(ckpt["global_step"])
    return None


__all__ = ["TrainingDiverged", "DivergenceGuard", "divergence_message", "last_finite_checkpoint"]
