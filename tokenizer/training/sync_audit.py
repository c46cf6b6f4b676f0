"""Host syncs per whole training step: from one `on_train_batch_start` to the next, Lightning's own hooks included.

    audit = StepSyncAudit(start=2)                  # from batch 2 on (batches 0-1: optimizer state, lazy LPIPS)
    trainer = pl.Trainer(..., callbacks=[audit])
    trainer.fit(module, ...)
    audit.rows          # [(batch_idx, logging, {"aten._local_scalar_dense.default": 1, ...}), ...]
    audit.sites         # {batch_idx: ["aten._local_scalar_dense.default at apply_func.py:134: ...", ...]}
    audit.quiet_syncs() # {batch_idx: found} of the steps that are not logging steps and synced: must be empty

A window that closes at `on_train_batch_end` misses everything Lightning does after the step: its logger
connector's `on_batch_end` (which converts every progress-bar value with `.item()`), the logging of metrics, the
checkpoint callbacks and the module's own `on_train_batch_end`. Here a window closes at the next batch's start,
or at the end of the epoch (what runs between epochs, a new DataLoader iterator, is not a training step).

Each window runs under `HostSyncDetector` (tokenizer/gpu.py). The next batch is fetched inside the window: data
loaded in this process (num_workers=0) shows up as well, so audit with a loader of ready-made tensors
(a TensorDataset) or with workers. A step is a logging step when the module's `is_logging_step()` says so at its
start (both stages define it); only those may read the device. A step that ends with a validation or a checkpoint
save reads it there as well (and is recorded as it is): audit with `limit_val_batches=0` and no checkpointing.
"""

from __future__ import annotations

import lightning.pytorch as pl

from ..gpu import HostSyncDetector


class StepSyncAudit(pl.Callback):
    def __init__(self, start: int = 0):
        self.start = start
        self.rows: list[tuple[int, bool, dict[str, int]]] = []
        self.sites: dict[int, list[str]] = {}
        self._open: tuple[int, bool, HostSyncDetector] | None = None

    def quiet_syncs(self) -> dict[int, dict[str, int]]:
        """The audited steps that synced although they were not logging steps."""
        return {i: found for i, logging, found in self.rows if found and not logging}

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        self._close()
        if batch_idx >= self.start:
            logging_step = getattr(module, "is_logging_step", None)
            detector = HostSyncDetector()
            self._open = (batch_idx, bool(logging_step()) if logging_step is not None else False, detector)
            detector.__enter__()

    def on_train_epoch_end(self, trainer, module) -> None:
        self._close()

    def on_train_end(self, trainer, module) -> None:
        self._close()

    def on_exception(self, trainer, module, exception) -> None:
        self._close()  # leave no detector active for whatever runs next

    def _close(self) -> None:
        if self._open is None:
            return
        batch_idx, logging, detector = self._open
        self._open = None
        detector.__exit__(None, None, None)
        self.rows.append((batch_idx, logging, dict(detector.found)))
        self.sites[batch_idx] = list(detector.hits)


__all__ = ["StepSyncAudit"]
