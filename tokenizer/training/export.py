"""Exporting a trained tokenizer: where the weights go when training ends, the provenance stored with them, and the
same export from a checkpoint.

The export is the module's evaluation weights (the EMA copy when the run keeps one), written with save_pretrained.
Three ways lead to it, all with the same weights file:
- the end of training (`TokenizerModule.on_train_end`);
- `--ckpt_path last` on a run that has already finished: Lightning trains nothing then (max_steps reached), and the
  module exports again if the export is missing or incomplete (`export_problem`: it does not load, or holds other
  weights than the checkpoint's; say the disk filled up while it was written at the end of the run);
- `onedtok export CKPT --out DIR` (`export_checkpoint`), from any TokenizerModule checkpoint.
Weights that hold NaN/inf are never exported.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoints import read_checkpoint, tokenizer_from_checkpoint
from ..model import OneDTokenizer
from ..persistence import non_finite_tensors, read_provenance
from .divergence import TrainingDiverged

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)


def export_tokenizer(module: pl.LightningModule, only_if_incomplete: bool = False) -> Path | None:
    """save_pretrained of the module's evaluation weights (EMA when on) to `export_dir`, else <run dir>/tokenizer,
    else (no logger, so no run directory) nowhere; returns the directory on global rank 0 when it wrote one (None
    elsewhere). `only_if_incomplete`: write only when `export_problem` finds one, and say so on stderr. Every rank
    must call it (see below). Weights that hold NaN/inf are refused (TrainingDiverged)."""
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
    step = int(module.global_step)
    if only_if_incomplete:
        problem = export_problem(directory, module.eval_tokenizer)
        if problem is None:
            print(f"export: {directory} holds the weights of optimizer step {step}; nothing to export",
                  file=sys.stderr)
            return None
        print(f"export: {directory} {problem}; exporting the weights of optimizer step {step} again",
              file=sys.stderr)
    refuse_non_finite(module.eval_tokenizer, directory)
    module.eval_tokenizer.save_pretrained(directory, provenance(module))
    return directory


def refuse_non_finite(tokenizer: OneDTokenizer, directory: Path) -> None:
    """Raise TrainingDiverged when a weight holds NaN/inf. The divergence check reads the loss and the gradient norm;
    this reads the weights themselves (an EMA copy, a codebook buffer): a model with NaN/inf encodes every image to
    the same ids, with no error anywhere after."""
    bad = non_finite_tensors(tokenizer.state_dict())
    if bad:
        raise TrainingDiverged(f"not exporting to {directory}: the trained tokenizer's weight {bad[0]!r} (and "
                               f"{len(bad) - 1} more tensor(s)) hold(s) NaN/inf; the training diverged. Lower lr, "
                               "lengthen warmup_steps or train in fp32, from a checkpoint saved before it diverged")


def export_problem(directory: Path, tokenizer: OneDTokenizer) -> str | None:
    """What keeps `directory` from being the export of `tokenizer`, as a phrase ("does not exist", "does not load
    (...)", "holds other weights (...)"); None when it is one. Loading checks what from_pretrained checks (both
    files, the format, that both come from one save, every key and shape, finite values)."""
    if not directory.exists():
        return "does not exist"
    try:
        saved = OneDTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        return f"does not load ({e})"
    own = tokenizer.state_dict()
    if saved.config != tokenizer.config or any(not torch.equal(t, own[k].detach().cpu())
                                               for k, t in saved.state_dict().items()):
        step = read_provenance(directory).get("optimizer_steps", "unknown")
        return f"holds other weights (exported at optimizer step {step})"
    return None


def export_checkpoint(checkpoint: str | Path, directory: str | Path) -> Path:
    """Export a TokenizerModule checkpoint to `directory` as the end of its training would have: the EMA weights
    when the run kept them (else the raw ones), with the provenance the checkpoint records. Refuses NaN/inf weights
    (ValueError from the strict load, naming the tensor)."""
    ckpt = read_checkpoint(checkpoint)
    tokenizer = tokenizer_from_checkpoint(checkpoint)  # EMA when present: what eval_tokenizer is in training
    hp = dict(ckpt.get("hyper_parameters") or {})
    ema = any(k.startswith("ema_tokenizer.") for k in ckpt["state_dict"])
    steps = int(ckpt["global_step"])
    per_batch = 2 if float(hp.get("gan_weight") or 0) > 0 else 1  # TokenizerModule.optimizers_per_batch
    record = {**_trained(hp, "EMA" if ema else "raw", steps, steps // per_batch), "exported_from": str(checkpoint)}
    return tokenizer.save_pretrained(directory, record)


def provenance(module: pl.LightningModule) -> dict[str, Any]:
    """How the exported weights were made, saved beside them (config.json) for `onedtok info`."""
    weights = "EMA" if getattr(module, "ema_tokenizer", None) is not None else "raw"
    record = _trained(module.hparams, weights, int(module.global_step),
                      int(getattr(module, "generator_steps", module.global_step)))
    return {"trained_by": f"{type(module).__module__}.{type(module).__name__}", **record,
            "world_size": int(module.trainer.world_size), "precision": str(module.trainer.precision)}


def _trained(hparams, weights: str, optimizer_steps: int, batches: int) -> dict[str, Any]:
    hp = {k: v for k, v in hparams.items() if k not in ("preset", "overrides")}
    return {
        "preset": hparams.get("preset"),
        "weights": weights,
        "optimizer_steps": optimizer_steps,
        "batches": batches,
        "objective_and_optimizer": json.loads(json.dumps(hp, default=str)),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


__all__ = ["export_tokenizer", "export_checkpoint", "export_problem", "refuse_non_finite", "provenance"]
