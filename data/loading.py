"""How image batches travel from DataLoader workers to the model, shared by the image DataModules.

- Workers build **uint8** batches ``[B, 3, H, W]``: a quarter of the bytes of float32 through the worker ->
  main process queue (shared memory), the pinned staging buffer and the host -> device copy.
- The DataModule's ``on_after_batch_transfer`` (Lightning calls it after moving the batch to the device and
  before the LightningModule sees it) turns them into float32 in [0, 1] with ``float_image_batch``, so the
  LightningModules keep their float contract and the conversion runs on the GPU. Note that Lightning uses the
  DataModule's ``on_after_batch_transfer`` *instead of* a LightningModule's own one when both define it.
- Workers are **persistent** (no fork + dataset copy + warm-up every epoch; per-epoch state must therefore reach
  them through shared memory, see ``data.webdataset``), memory is **pinned** when the batches go to a CUDA
  device, and each worker keeps ``prefetch_factor`` batches in flight.
- Unreadable images are skipped and counted (``data.skips``); ``log_skipped`` sends a DataModule's running count
  to the trainer's loggers.
- A training set too small for one full batch is an error (``check_one_batch``): the loaders drop the incomplete
  last batch, and Lightning, given no batch at all, used to stop before the first step and exit 0 with no output.
- Workers leave SIGTERM and SIGUSR1 to the training process (``data.worker_signals``): SLURM signals them too, and
  a worker that died of one would end the batch stream before the training process has saved its checkpoint.
- Workers start by fork where the interpreter forks safely and from a forkserver where it can deadlock
  (``data.worker_context``: CPython before 3.11.8, gh-112275), with the stop signals handled as above either way.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from data.transforms import to_float_images
from data.worker_context import worker_context
from data.worker_signals import ignore_stop_signals

# Batches in flight per worker. The PyTorch default (2) leaves a GPU step waiting whenever one slow JPEG batch
# lands on a worker; 4 absorbs that jitter, and in uint8 costs 4 x 6.3 MB per worker at B=32, 256 px.
PREFETCH_FACTOR = 4


def wants_pinned_memory(trainer=None) -> bool:
    """Pin host memory when batches will be copied to a CUDA device: the attached Trainer's device when there
    is one (a CPU run on a GPU machine pins nothing), else whether CUDA is available."""
    if trainer is not None:
        return trainer.strategy.root_device.type == "cuda"
    return torch.cuda.is_available()


def worker_process_kwargs() -> dict:
    """The DataLoader arguments that say how workers start and what they do with the stop signals (see the module
    docstring): the workers' context (data.worker_context), and the worker_init_fn that leaves SIGTERM / SIGUSR1
    to this (the training) process."""
    return {"worker_init_fn": functools.partial(ignore_stop_signals, training_pid=os.getpid()),
            "multiprocessing_context": worker_context()}


def loader_kwargs(
    num_workers: int,
    *,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    prefetch_factor: int = PREFETCH_FACTOR,
    trainer=None,
) -> dict:
    """DataLoader keyword arguments: ``num_workers``, ``pin_memory`` (if asked for and useful, see
    ``wants_pinned_memory``), and with workers ``persistent_workers``, ``prefetch_factor`` and how they start
    (``worker_process_kwargs``)."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
    kwargs = dict(num_workers=num_workers, pin_memory=pin_memory and wants_pinned_memory(trainer))
    if num_workers > 0:  # DataLoader rejects both options without workers
        kwargs.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                      **worker_process_kwargs())
    return kwargs


def check_one_batch(datamodule, num_items: int, what: str, fix: str) -> None:
    """Refuse a training set that gives no batch: fewer than `datamodule.batch_size` items per process, with the
    incomplete batch dropped. `what`: the items and where they come from; `fix`: what to change besides the batch
    size. The share per process is the DistributedSampler's (ceil(N / world size)); the world size is that of the
    attached Trainer (1 without one)."""
    trainer = getattr(datamodule, "trainer", None)
    world = int(trainer.world_size) if trainer is not None else 1
    per_process = math.ceil(num_items / world)
    batch_size = datamodule.batch_size
    if per_process >= batch_size:
        return
    share = f" ({per_process} per process of {world})" if world > 1 else ""
    raise ValueError(f"{what}: {num_items} for training{share}, fewer than one batch of batch_size {batch_size}; the "
                     f"incomplete batch is dropped, so training would run no step. Lower batch_size to at most "
                     f"{max(per_process, 1)}, or {fix}")


def float_image_batch(batch):
    """``(images uint8 [B, 3, H, W], labels, ...)`` -> the same batch with images float32 [B, 3, H, W] in [0, 1]
    (labels, keys and the tuple/list type untouched): the DataModules' ``on_after_batch_transfer``."""
    if not isinstance(batch, (tuple, list)) or not batch:
        raise TypeError(f"expected a batch (images, labels, ...), got {type(batch).__name__}")
    return type(batch)([to_float_images(batch[0]), *batch[1:]])


def log_skipped(datamodule) -> None:
    """Send a DataModule's running ``num_skipped`` to its trainer's loggers as ``data/skipped_images`` when it
    has grown since the last call (called from ``on_after_batch_transfer``: once per batch, in the main
    process, where the workers' shared counter is readable). Each rank counts its own workers; loggers write on
    rank 0 only."""
    n = int(datamodule.num_skipped)
    if n == getattr(datamodule, "_skipped_logged", 0):
        return
    datamodule._skipped_logged = n
    trainer = getattr(datamodule, "trainer", None)
    for logger in getattr(trainer, "loggers", None) or []:
        logger.log_metrics({"data/skipped_images": float(n)}, step=int(trainer.global_step))
