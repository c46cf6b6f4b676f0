"""Exporting a trained tokenizer: where the weights go when training ends, and the provenance stored with them."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


def export_tokenizer(module: pl.LightningModule) -> Path | None:
    """save_pretrained of the module's evaluation weights (EMA when on) to `export_dir`, else <run dir>/tokenizer;
    returns the directory on global rank 0 (None elsewhere). Every rank must call it (see below)."""
    trainer = module.trainer
    # `trainer.log_dir` is a collective under DDP (broadcast from rank 0): every rank must evaluate it, or rank 0
    # waits in the broadcast while the others exit.
    log_dir = trainer.log_dir
    if not trainer.is_global_zero:
        return None
    # without a logger there is no run directory (and log_dir is default_root_dir itself): fall back to
    # <root>/checkpoints/tokenizer, never to <root>/tokenizer, which from the repository root is this package's
    # own source directory.
    has_run_dir = trainer.loggers and log_dir
    base = Path(log_dir) if has_run_dir else Path(trainer.default_root_dir) / "checkpoints"
    directory = Path(module.hparams.export_dir or base / "tokenizer")
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
