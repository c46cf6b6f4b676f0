"""Run under torchrun (one process per rank, gloo on CPU): a short DDP fit of the tiny tokenizer with StopOnSignal
checking less often than the fit has batches, audited over whole steps (StepSyncAudit); writes this rank's
{batch: {operator: count}} of the steps that synced although they were not logging steps to OUT_DIR/rank{R}.pt.

    python -m torch.distributed.run --nproc_per_node 2 -m _ddp_step_syncs OUT_DIR    (PYTHONPATH: repo and tests/)
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
from _small_training import QUIET, SMALL, fixed_batches

from tokenizer.training import TokenizerModule
from tokenizer.training.preemption import StopOnSignal
from tokenizer.training.sync_audit import StepSyncAudit

STEPS = 6

if __name__ == "__main__":
    torch.set_num_threads(1)
    pl.seed_everything(0)
    module = TokenizerModule(preset="tiny", overrides=SMALL, warmup_steps=1, fused_optimizer=True)  # as on CUDA
    audit = StepSyncAudit(start=3)  # batches 0-2: optimizer state (first steps of both optimizers) and the like
    trainer = pl.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy="ddp", max_steps=2 * STEPS,
                         limit_val_batches=0, log_every_n_steps=1000, callbacks=[audit, StopOnSignal(100)],
                         **QUIET)  # fmt: skip
    trainer.fit(module, train_dataloaders=fixed_batches(2 * STEPS))  # split over 2 ranks: STEPS batches each
    torch.save({"quiet": audit.quiet_syncs(), "sites": audit.sites, "audited": len(audit.rows)},
               os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
