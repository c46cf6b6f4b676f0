"""``WebDatasetDataModule``: tar shards (webdataset format) -> ``(images, labels)`` batches, DDP-safe.

Shards are given as a brace pattern (``/data/shards/train-{000000..001281}.tar``), several patterns joined
with ``::``, or a list. Samples are ``{__key__, jpg|png|webp|..., cls}`` as written by
``data.convert_shards``; any image extension is decoded by ``data.transforms.decode_image`` (any mode ->
RGB). Corrupt/truncated images and unreadable tar members are skipped, counted
(``WebDatasetDataModule.num_skipped``, shared by all workers) and logged as warnings; they never crash.

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
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.loading import PREFETCH_FACTOR, float_image_batch, loader_kwargs
from data.transforms import decode_image, eval_transform, train_transform

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "img", "image")
SHARD_MODES = ("auto", "split", "resampled")


def sample_image(sample: dict) -> tuple[object | None, str]:
    """A webdataset sample's first image member (IMAGE_KEYS order) decoded to an RGB PIL image, as (image, "");
    or (None, why) when there is no image member or it does not decode."""
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        return None, "no image member"
    img = decode_image(data)
    return (img, "") if img is not None else (None, "undecodable image")


def sample_label(sample: dict) -> int:
    """The sample's integer class from its `cls` member, or -1 when it has none or it is not an integer."""
    try:
        return int(sample["cls"]) if "cls" in sample else -1
    except (ValueError, TypeError):
        return -1


# ----------------------------------------------------------------------------------------------- shards
def expand_shards(shards: str | list[str]) -> list[str]:
    """Brace pattern(s) (joined with ``::``) or a list -> list of shard URLs/paths."""
    import braceexpand

    if isinstance(shards, str):
        out: list[str] = []
        for part in shards.split("::"):
            out.extend(braceexpand.braceexpand(os.path.expanduser(part)))
        return out
    out = []
    for s in shards:
        out.extend(expand_shards(s))
    return out


def _count_tar(path: str) -> int:
    keys = set()
    with tarfile.open(path) as tar:
        for m in tar:
            match = re.match(r"^((?:.*/|)[^.]+)[.]", m.name) if m.isreg() else None
            if match and not m.name.startswith("__"):
                keys.add(match.group(1))
    return len(keys)


def shard_sample_counts(shards: list[str]) -> list[int]:
    """Samples per shard, from ``*-meta.json`` beside the shards, else by scanning local tar headers."""
    known: dict[str, int] = {}
    for d in sorted({os.path.dirname(s) for s in shards}):
        for meta_path in sorted(glob.glob(os.path.join(d, "*-meta.json"))):
            try:
                with open(meta_path) as f:
                    meta = json.load(f)
                for entry in meta.get("shards", []):
                    known[os.path.join(d, entry["name"])] = int(entry["count"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable %s: %s", meta_path, exc)
    counts = []
    missing = [s for s in shards if s not in known]
    if missing:
        log.warning(
            "no meta.json entry for %d shard(s) (e.g. %s): counting samples from tar headers",
            len(missing),
            missing[0],
        )
    for s in shards:
        if s in known:
            counts.append(known[s])
        elif os.path.isfile(s):
            counts.append(_count_tar(s))
        else:
            raise ValueError(
                f"cannot count the samples of {s} (no meta.json, not a local file): "
                "pass epoch_length explicitly"
            )
    return counts


# ----------------------------------------------------------------------------------------- streaming
class _Skips:
    """Counts and logs skipped samples; the counter is shared across worker processes."""

    def __init__(self, counter=None):
        self.counter = counter

    def __call__(self, what: str) -> None:
        n = -1
        if self.counter is not None:
            with self.counter.get_lock():
                self.counter.value += 1
                n = self.counter.value
        log.warning("skipping %s (%d skipped so far)", what, n)

    def handler(self, exn: Exception) -> bool:  # webdataset exception handler: count, warn, continue
        self(f"unreadable tar data: {exn!r}")
        return True


def _iter_shard(url: str, skips: _Skips) -> Iterator[dict]:
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples([{"url": url}], handler=skips.handler)


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _shuffle_buffer(src: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    if size <= 1:
        yield from src
        return
    buf: list[dict] = []
    for sample in src:
        buf.append(sample)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Iterable over decoded, transformed, collated batches for one rank (see module docstring).

    ``train=True``: stream of full batches, infinite unless ``batches_per_epoch`` is set (``EpochLoader`` sets
    it): then worker ``w`` of ``nw`` yields its round-robin share ``len(range(w, batches_per_epoch, nw))``.
    ``train=False``: finite, deterministic, this rank's samples only (last batch per worker may be short).
    Images are whatever ``transform`` returns (the DataModule's: uint8 [3, S, S]), stacked to [B, 3, S, S].
    """

    def __init__(
        self,
        shards: list[str],
        *,
        train: bool,
        transform: Callable,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        sampling: str = "split",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        return_keys: bool = False,
        offsets: list[int] | None = None,
        skipped_counter=None,
        batches_per_epoch: int | None = None,
    ):
        super().__init__()
        if sampling not in ("split", "resampled"):
            raise ValueError(f"sampling must be 'split' or 'resampled', got {sampling!r}")
        self.shards = list(shards)
        self.train = train
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.sampling = sampling
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.return_keys = return_keys
        self.offsets = offsets
        self.skips = _Skips(skipped_counter)
        self.batches_per_epoch = batches_per_epoch
        # Shared memory, not a plain attribute: persistent workers hold a copy of this object made when they
        # started, and read the epoch the main process set here each time their stream restarts (module docstring).
        self._epoch = mp.RawValue("q", 0)

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` (in this process or any worker) permutes shards and seeds streams with."""
        return int(self._epoch.value)

    @epoch.setter
    def epoch(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"epoch must be >= 0, got {value}")
        self._epoch.value = int(value)

    # raw samples ----------------------------------------------------------------------------------
    def _train_raw(self, epoch: int, wid: int, nw: int) -> Iterator[dict]:
        rng = random.Random(_seed(self.seed, epoch, self.rank, wid))
        if self.sampling == "resampled":
            while True:
                yield from _iter_shard(rng.choice(self.shards), self.skips)
        perm = list(range(len(self.shards)))
        random.Random(_seed(self.seed, epoch)).shuffle(perm)  # identical on every rank
        mine = [self.shards[i] for i in perm[self.rank :: self.world_size][wid::nw]]
        if not mine:
            return
        while True:
            order = mine[:]
            rng.shuffle(order)
            n = 0
            for url in order:
                for sample in _iter_shard(url, self.skips):
                    n += 1
                    yield sample
            if n == 0:
                raise RuntimeError(f"rank {self.rank} worker {wid}: shards {mine} contain no samples")

    def _val_raw(self, wid: int, nw: int) -> Iterator[dict]:
        offsets = self.offsets if self.offsets is not None else [0] * len(self.shards)
        for j in range(wid, len(self.shards), nw):
            for k, sample in enumerate(_iter_shard(self.shards[j], self.skips)):
                index = offsets[j] + k if self.offsets is not None else j + k
                if index % self.world_size == self.rank:
                    yield sample

    # decoding / batching --------------------------------------------------------------------------
    def _decode(self, samples: Iterator[dict]) -> Iterator[tuple]:
        for sample in samples:
            key = sample.get("__key__", "?")
            img, why = sample_image(sample)
            if img is None:
                self.skips(f"{why} {key} in {sample.get('__url__', '?')}")
                continue
            yield self.transform(img), sample_label(sample), key

    def _collate(self, items: list[tuple]):
        images = torch.stack([it[0] for it in items])
        labels = torch.tensor([it[1] for it in items], dtype=torch.long)
        if self.return_keys:
            return images, labels, [it[2] for it in items]
        return images, labels

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch  # read when the stream (re)starts: at worker start-up and at each resumed epoch
        if self.train:
            rng = random.Random(_seed("buffer", self.seed, epoch, self.rank, wid))
            raw = _shuffle_buffer(self._train_raw(epoch, wid, nw), self.shuffle_buffer, rng)
        else:
            raw = self._val_raw(wid, nw)
        items = self._decode(raw)
        # Only this worker's share of the epoch (shares add up to batches_per_epoch; round-robin as the DataLoader
        # asks its workers in turn): a worker of an endless stream would keep decoding the batches prefetched past
        # the end of the epoch, and a persistent one must finish all of them before it can start the next epoch.
        share = self.batches_per_epoch if self.train else None
        remaining = math.inf if share is None else len(range(wid, share, nw))
        while remaining > 0:
            chunk = list(itertools.islice(items, self.batch_size))
            if not chunk or (self.train and len(chunk) < self.batch_size):
                return
            remaining -= 1
            yield self._collate(chunk)


class EpochLoader(DataLoader):
    """DataLoader over a training ``ShardStream`` that yields exactly ``num_batches`` batches per ``iter()``: the
    stream's workers produce their shares of them (``batches_per_epoch``), and this loader stops after
    ``num_batches`` whatever the workers do (and fails loudly if they yield fewer)."""

    def __init__(
        self,
        dataset: ShardStream,
        num_batches: int,
        epoch_fn: Callable[[], int | None] | None = None,
        **kwargs,
    ):
        super().__init__(dataset, batch_size=None, **kwargs)
        dataset.batches_per_epoch = num_batches
        self.num_batches = num_batches
        self.epoch_fn = epoch_fn
        self._iters = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        # before super().__iter__(): that call starts the workers (first epoch) or tells the persistent ones to
        # restart their streams, which then read this shared value
        self.dataset.epoch = self._iters if epoch is None else epoch
        self._iters += 1
        return self._limited(super().__iter__())

    def _limited(self, it):
        try:
            for i in range(self.num_batches):
                try:
                    yield next(it)
                except StopIteration:
                    raise RuntimeError(
                        f"training stream ended after {i} of {self.num_batches} batches; "
                        "all ranks must yield the same number of batches"
                    ) from None
        finally:
            if not self.persistent_workers and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()  # stop the infinite workers now rather than at garbage collection


class EvenLoader(DataLoader):
    """DataLoader over a finite ``ShardStream`` that re-batches in the main process and pads the stream to
    exactly ``num_samples`` samples (repeating the first ones), i.e. ``ceil(num_samples / batch_size)``
    batches on every rank."""

    def __init__(self, dataset: ShardStream, num_samples: int, batch_size: int, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.num_samples = num_samples
        self.out_batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.out_batch_size)

    def _samples(self):
        first: list = []
        n = 0
        for batch in super().__iter__():
            for i in range(len(batch[0])):
                if n >= self.num_samples:
                    break
                item = tuple(b[i] for b in batch)
                if len(first) < self.num_samples:
                    first.append(item)
                n += 1
                yield item
        if n < self.num_samples and not first:
            raise RuntimeError("validation rank produced no samples at all; cannot pad")
        for i in range(self.num_samples - n):
            yield first[i % len(first)]

    def __iter__(self):
        items = self._samples()
        while True:
            chunk = list(itertools.islice(items, self.out_batch_size))
            if not chunk:
                return
            images = torch.stack([c[0] for c in chunk])
            labels = torch.stack([torch.as_tensor(c[1]) for c in chunk]).long()
            if len(chunk[0]) > 2:
                yield images, labels, [c[2] for c in chunk]
            else:
                yield images, labels


# -------------------------------------------------------------------------------------- data module
class WebDatasetDataModule(LightningDataModule):
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
        super().__init__()
        if shard_mode not in SHARD_MODES:
            raise ValueError(f"shard_mode must be one of {SHARD_MODES}, got {shard_mode!r}")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.epoch_length = epoch_length
        self.shard_mode = shard_mode
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.return_keys = return_keys
        self.val_pad = val_pad
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.rank = rank
        self.world_size = world_size
        self._skipped = None  # multiprocessing.Value, created lazily (keeps the module picklable)

    # helpers --------------------------------------------------------------------------------------
    @property
    def num_skipped(self) -> int:
        """Samples skipped so far (corrupt images / unreadable tar data), all workers of this process."""
        return 0 if self._skipped is None else int(self._skipped.value)

    def _counter(self):
        if self._skipped is None:
            self._skipped = mp.Value("l", 0)
        return self._skipped

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

    def _loader_kwargs(self) -> dict:
        return loader_kwargs(
            self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
            trainer=self.trainer,
        )

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
        dataset = ShardStream(
            shards,
            train=True,
            transform=train_transform(self.image_size, uint8=True),
            batch_size=self.batch_size,
            rank=rank,
            world_size=world,
            sampling=mode,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            return_keys=self.return_keys,
            skipped_counter=self._counter(),
        )
        log.info(
            "train: rank %d/%d, %d shards, mode=%s, %d batches/epoch",
            rank,
            world,
            len(shards),
            mode,
            num_batches,
        )
        return EpochLoader(dataset, num_batches, epoch_fn=self._epoch, **self._loader_kwargs())

    def val_dataloader(self):
        if not self.val_shards:
            return []
        rank, world = self.dist_info()
        shards = expand_shards(self.val_shards)
        counts = shard_sample_counts(shards)
        offsets = [0, *itertools.accumulate(counts)][:-1]
        total = sum(counts)
        mine = len(range(rank, total, world))
        dataset = ShardStream(
            shards,
            train=False,
            transform=eval_transform(self.image_size, uint8=True),
            batch_size=self.batch_size,
            rank=rank,
            world_size=world,
            seed=self.seed,
            return_keys=self.return_keys,
            offsets=offsets,
            skipped_counter=self._counter(),
        )
        num_samples = math.ceil(total / world) if self.val_pad else mine
        return EvenLoader(dataset, num_samples, self.batch_size, **self._loader_kwargs())

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return float_image_batch(batch)  # uint8 -> float32 [0, 1], on the device the batch was moved to

    def teardown(self, stage: str | None = None) -> None:
        if self.num_skipped:
            log.warning(
                "WebDatasetDataModule: %d samples were skipped (corrupt or unreadable)", self.num_skipped
            )
