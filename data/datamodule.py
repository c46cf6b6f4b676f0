"""`ImageDataModule`: what every image DataModule shares, so each one only says where its images come from.

- The loader settings (`data/loading.py`): uint8 batches from persistent workers, pinned memory for CUDA,
  `prefetch_factor` batches in flight per worker.
- `on_after_batch_transfer`: uint8 -> float32 in [0, 1] on the device, and the running skip count to the loggers.
- One skip tally per DataModule (`data.skips.SkipTally`), in shared memory, that every worker of this process adds
  to, each skipped file once however many epochs meet it (created lazily, so the DataModule stays picklable until
  it is set up); a warning at teardown gives the total.
"""

from __future__ import annotations

import logging

from lightning.pytorch import LightningDataModule

from data.loading import PREFETCH_FACTOR, float_image_batch, loader_kwargs, log_skipped
from data.skips import SkipTally

log = logging.getLogger(__name__)


class ImageDataModule(LightningDataModule):
    def __init__(self, image_size: int, batch_size: int, num_workers: int, *, pin_memory: bool = True,
                 persistent_workers: bool = True, prefetch_factor: int = PREFETCH_FACTOR):
        super().__init__()
        if image_size < 1 or batch_size < 1:
            raise ValueError(f"image_size and batch_size must be >= 1, got {image_size} and {batch_size}")
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.prefetch_factor = prefetch_factor
        self._skipped: SkipTally | None = None  # see skip_counter()

    @property
    def num_skipped(self) -> int:
        """Distinct images skipped so far, by every worker of this process (each rank counts its own)."""
        return 0 if self._skipped is None else self._skipped.total

    def skip_counter(self) -> SkipTally:
        """The shared-memory tally the datasets of this DataModule add their skips to."""
        if self._skipped is None:
            self._skipped = SkipTally()
        return self._skipped

    def loader_kwargs(self) -> dict:
        """DataLoader keyword arguments for this DataModule's workers (data/loading.py)."""
        return loader_kwargs(self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
                             prefetch_factor=self.prefetch_factor, trainer=getattr(self, "trainer", None))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        log_skipped(self)  # the running skip count reaches the trainer's loggers (data/skipped_images)
        return float_image_batch(batch)  # uint8 -> float32 [0, 1], on the device the batch was moved to

    def teardown(self, stage: str | None = None) -> None:
        if self.num_skipped:
            log.warning("%s: %d image(s) skipped (each named in a warning above)", type(self).__name__,
                        self.num_skipped)


__all__ = ["ImageDataModule"]
