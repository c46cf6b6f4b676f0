"""Exporting a trained tokenizer: where the weights go when training ends, and the provenance stored with them."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ..persistence import non_finite_tensors
from .divergence import TrainingDiverged

log = logging.getLogger(__name__)


def export_tokenizer(module: pl.LightningModule) -> Path | None:
    """save_pretrained of the module's evaluation weights (EMA when on) to `export_dir`, else <run dir>/tokenizer,
    else (no logger, so no run directory) nowhere; returns the directory on global rank 0 when it wrote one (None
    elsewhere). Every rank must call it (see below). Weights that hold NaN/inf are refused (TrainingDiverged)."""
    trainer = module.trainer
    # `trainer.log_dir` is a collective under DDP (broadcast from rank 0): every rank must evaluate it, or rank 0
    # waits in the broadcast while the others exit.
    log_dir = trainer.log_dir
    if not trainer.is_global_zero:
        return None
    has_run_dir = bool(trainer.loggers) and bool(log_dir)
    if not module.hparams.export_dir and not has_run_dir:
        # Without a logger there is no run directory (log_dir is then default_root_dir, by default the working
        # directory). Any path guessed from it would overwrite whatever model is there: a benchmark or a test run
        # from the repository root replaced checkpoints/tokenizer. Library use keeps the model in memory.
        log.info("no run directory (the Trainer has no logger) and no export_dir: the tokenizer is not exported; "
                 "it is module.eval_tokenizer")
        return None
    directory = Path(module.hparams.export_dir or Path(log_dir) / "tokenizer")
    # The divergence check reads the loss and gradient norm; this reads the weights themselves (an EMA copy, a
    # codebook buffer): a model with NaN/inf encodes every image to the same ids, with no error anywhere after.
    bad = non_finite_tensors(module.eval_tokenizer.state_dict())
    if bad:
        raise TrainingDiverged(f"not exporting to {directory}: the trained tokenizer's weight {bad[0]!r} (and "
                               f"{len(bad) - 1} more tensor(s)) hold(s) NaN/inf; the training diverged. Lower lr, "
                               "lengthen warmup_steps or train in fp32, from a checkpoint saved before it diverged")
    module.eval_tokenizer.save_pretrained(directory, provenance(module))
    return directory


def provenance(module: pl.LightningModule) -> dict[str, Any]:
    """How the exported weights were made, saved beside them (config.json) for `onedtok info`."""
    hp = {k: v for k, v in module.hparams.items() if k not in ("preset", "overrides")}
    return {
        "trained_by": f"{type(module).__module__}.{type(module).__name__}",
        "preset": module.hparams.preset,
        "weights": "EMA" if getattr(module, "ema_tokenizer", None) is not None else "raw",
        "optimizer_steps": int(module.global_step),
        "batches": int(getattr(module, "generator_steps", module.global_step)),
        "world_size": int(module.trainer.world_size),
        "precision": str(module.trainer.precision),
        "objective_and_optimizer": json.loads(json.dumps(hp, default=str)),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


__all__ = ["export_tokenizer", "provenance"]
