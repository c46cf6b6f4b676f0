"""``WebDatasetDataModule``: tar shards (webdataset format) -> ``(images, labels)`` batches, DDP-safe.

Shards are given as a brace pattern (``/data/shards/train-{000000..001281}.tar``), several patterns joined
with ``::``, or a list. Samples are ``{__key__, jpg|png|webp|..., cls}`` as written by
``data.convert_shards``; shards are read by ``data.tar_shards.iter_shard`` and any image extension is decoded
by ``tokenizer.images.decode_image`` (any mode -> RGB). Corrupt/truncated images (and decompression bombs and
extreme aspect ratios, which ``tokenizer.images`` refuses by name) and the damaged tail of a truncated shard are
skipped, counted once each however many passes meet them (``WebDatasetDataModule.num_skipped``, shared by all
workers, also sent to the trainer's loggers as ``data/skipped_images``) and logged as warnings naming the shard;
they never crash. Shards without one decodable image are an error before the first step (``check_readable_shards``).

Training: equal number of batches on every rank
-----------------------------------------------
Every (rank, worker) pair reads an *endless* stream and the DataLoader stops after exactly
``batches_per_rank = max(1, epoch_length // (world_size * batch_size))`` batches (what
``wds.with_epoch``/``with_length`` do, applied on the loader so it is exact whatever the number of
workers; each worker also stops after its round-robin share of them, so that none decodes batches past the
end of the epoch). All ranks therefore yield the same number of batches per epoch, even with uneven shard sizes or
skipped images, and DDP never waits on a rank that ran out of data. ``epoch_length`` is the number of
training samples per epoch over all ranks; by default the sample count of the listed shards read from the
converter's ``{split}-meta.json`` next to them (tar headers are scanned if there is none). Two ways of
choosing shards (``shard_mode``):

- ``"split"``: the shard list is permuted with ``(seed, epoch)`` (same permutation on all ranks), rank
  ``r`` takes ``perm[r::world_size]``, and its worker ``w`` takes every ``num_workers``-th of those.
  Ranks (and workers) read DISJOINT shards; each worker cycles through its shards (reshuffled each pass)
  with a sample shuffle buffer. With uneven shard sizes a rank whose shards are smaller repeats a few of
  its samples within the epoch instead of stopping early. Needs ``len(shards) >= world_size *
  max(1, num_workers)``; otherwise a ``ValueError`` explains the numbers.
- ``"resampled"``: every worker draws shards independently with replacement (seeded by
  ``seed, epoch, rank, worker``), as ``wds.ResampledShards``. Works with any number of shards (even 1) but
  ranks are not disjoint (statistically independent streams instead).
- ``"auto"`` (default): ``"split"`` when there are enough shards, else ``"resampled"`` with a warning.

Validation: deterministic, disjoint, equal batch counts
-------------------------------------------------------
No shuffling, eval transform. Every rank reads all validation shards (split between its workers) but
decodes only the samples whose global index ``i`` (shard offsets from the meta counts) has
``i % world_size == rank``, so ranks see disjoint samples that together cover the whole set. The loader
re-batches in the main process and pads the rank's sample stream to ``ceil(N / world_size)`` by repeating
its first samples (the same rule as ``DistributedSampler(drop_last=False)``; at most one repeat per rank
unless images were skipped), so every rank yields ``ceil(ceil(N / world_size) / batch_size)`` batches.
Padding duplicates a few samples in the metrics when ``N % world_size != 0`` (ImageNet val: 50000 images
divide evenly by 1, 2, 4, 8, 16 ranks).

Which keys a rank consumed: with ``return_keys=True`` batches are ``(images, labels, keys)`` with
``keys`` a list of ``__key__`` strings (``on_before_batch_transfer`` can strip it again); the default is
the plain ``(images, labels)`` contract. ``rank``/``world_size`` may be forced (tests, debugging);
normally they come from the attached Trainer, else ``torch.distributed``, else 0/1.

Epochs: the shard permutation and the stream seeds depend on the epoch (``trainer.current_epoch`` when
attached, otherwise a counter of the loader's ``iter()`` calls). The main process writes it into a
shared-memory counter of the ``ShardStream`` before each epoch starts; workers read it whenever their stream
(re)starts. Workers are persistent by default, i.e. started once with a copy of the dataset taken at the first
epoch, so an attribute set on the main process's copy would never reach them: the shared counter does, when the
loader resumes them for the next epoch (the epoch a worker reads is always the one the main process chose, also
after a resume from a checkpoint or when an epoch is skipped).

Batches leave the workers as uint8 images ``[B, 3, S, S]`` (a quarter of the bytes of float32 through worker IPC
and the host -> device copy); ``on_after_batch_transfer`` converts them to float32 in [0, 1] on the device
(``data/loading.py``), so LightningModules receive the float contract above.

Modules: the shard reader and counter are ``data.tar_shards``, the stream and the two loaders
``data.shard_stream``; their public names are importable from here as well.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch

from data.datamodule import ImageDataModule
from data.loading import PREFETCH_FACTOR
from data.shard_stream import EpochLoader, EvenLoader, ShardStream, check_readable_shards
from data.tar_shards import expand_shards, shard_sample_counts
from data.transforms import train_transform
from tokenizer.images import eval_transform

log = logging.getLogger(__name__)

SHARD_MODES = ("auto", "split", "resampled")


# -------------------------------------------------------------------------------------- data module
class WebDatasetDataModule(ImageDataModule):
    """Webdataset tar shards -> ``(images, labels)`` (see the module docstring for the DDP design).

    Args:
        train_shards: brace pattern / ``::``-joined patterns of the training shards.
        val_shards: same for validation, or None.
        image_size: output resolution.
        batch_size: per-device batch size.
        num_workers: DataLoader workers per rank.
        epoch_length: training samples per epoch over all ranks (default: samples in ``train_shards``).
        shard_mode: "auto", "split" or "resampled" (training shard selection).
        shuffle_buffer: per-worker sample shuffle buffer (raw bytes, before decoding).
        seed: base seed of the shard/sample shuffles.
        return_keys: batches are ``(images, labels, keys)`` instead of ``(images, labels)``.
        val_pad: pad validation so every rank has the same number of samples/batches (keep True for DDP).
        pin_memory: pin batches when they go to a CUDA device (the Trainer's, else when CUDA is available).
        persistent_workers: keep workers alive between epochs (the epoch reaches them through shared memory).
        prefetch_factor: batches in flight per worker.
        rank: force this rank (default: from the Trainer / torch.distributed).
        world_size: force the world size (default: from the Trainer / torch.distributed).
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        image_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 4,
        epoch_length: int | None = None,
        shard_mode: str = "auto",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        return_keys: bool = False,
        val_pad: bool = True,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = PREFETCH_FACTOR,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__(image_size, batch_size, num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
        if shard_mode not in SHARD_MODES:
            raise ValueError(f"shard_mode must be one of {SHARD_MODES}, got {shard_mode!r}")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.epoch_length = epoch_length
        self.shard_mode = shard_mode
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.return_keys = return_keys
        self.val_pad = val_pad
        self.rank = rank
        self.world_size = world_size

    # helpers --------------------------------------------------------------------------------------
    def dist_info(self) -> tuple[int, int]:
        """(rank, world_size): forced values, else the attached Trainer, else torch.distributed, else 0/1."""
        rank, world = self.rank, self.world_size
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            rank = trainer.global_rank if rank is None else rank
            world = trainer.world_size if world is None else world
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world = torch.distributed.get_world_size() if world is None else world
        rank, world = (0 if rank is None else rank), (1 if world is None else world)
        if not 0 <= rank < world:
            raise ValueError(f"invalid rank {rank} for world_size {world}")
        return rank, world

    def _epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else int(trainer.current_epoch)

    def resolve_shard_mode(self, num_shards: int, world_size: int) -> str:
        slots = world_size * max(1, self.num_workers)
        if self.shard_mode == "resampled":
            return "resampled"
        if num_shards >= slots:
            return "split"
        msg = (
            f"{num_shards} training shards < world_size ({world_size}) x max(1, num_workers) "
            f"({max(1, self.num_workers)}) = {slots}: shards cannot be split disjointly"
        )
        if self.shard_mode == "split":
            raise ValueError(msg + "; make more/smaller shards, use fewer workers, or shard_mode='resampled'")
        log.warning("%s; falling back to shard_mode='resampled'", msg)
        return "resampled"

    # loaders --------------------------------------------------------------------------------------
    def train_dataloader(self) -> EpochLoader:
        rank, world = self.dist_info()
        shards = expand_shards(self.train_shards)
        if not shards:
            raise ValueError(f"no training shards in {self.train_shards!r}")
        epoch_length = self.epoch_length
        if epoch_length is None:
            epoch_length = sum(shard_sample_counts(shards))
        num_batches = max(1, epoch_length // (world * self.batch_size))
        mode = self.resolve_shard_mode(len(shards), world)
        check_readable_shards(shards, f"training shards {self.train_shards!r}")  # an error now, not a hang later
        dataset = self._stream(shards, rank, world, train=True, sampling=mode, shuffle_buffer=self.shuffle_buffer)
        log.info("train: rank %d/%d, %d shards, mode=%s, %d batches/epoch", rank, world, len(shards), mode,
                 num_batches)
        return EpochLoader(dataset, num_batches, epoch_fn=self._epoch, **self.loader_kwargs())

    def _stream(self, shards: list[str], rank: int, world: int, train: bool, **mode) -> ShardStream:
        """This rank's ShardStream: random crops for training, the eval crop for validation (uint8 either way)."""
        transform = (train_transform if train else eval_transform)(self.image_size, uint8=True)
        return ShardStream(shards, train=train, transform=transform, batch_size=self.batch_size, rank=rank,
                           world_size=world, seed=self.seed, return_keys=self.return_keys,
                           skipped_counter=self.skip_counter(), **mode)

    def val_dataloader(self):
        if not self.val_shards:
            return []
        rank, world = self.dist_info()
        shards = expand_shards(self.val_shards)
        counts = shard_sample_counts(shards)
        offsets = [0, *itertools.accumulate(counts)][:-1]
        total = sum(counts)
        mine = len(range(rank, total, world))
        dataset = self._stream(shards, rank, world, train=False, offsets=offsets)
        num_samples = math.ceil(total / world) if self.val_pad else mine
        return EvenLoader(dataset, num_samples, self.batch_size, **self.loader_kwargs())
