"""The streaming side of ``data.webdataset``: ``ShardStream`` (decoded, batched samples of one rank's shards) and
the loaders that make every rank yield the same number of batches (``EpochLoader`` for training, ``EvenLoader``
for validation). The design (shard modes, epochs through shared memory, padding) is described in the
``data.webdataset`` module docstring; ``WebDatasetDataModule`` builds these objects.
"""

from __future__ import annotations

import itertools
import math
import random
import zlib
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.skips import SkipCounter
from data.tar_shards import iter_shard, sample_image, sample_label
from data.worker_context import worker_context


class _Passes:
    """Split-mode bookkeeping between a worker's raw sample stream and its decoder, which a shuffle buffer sits
    between (so the decoder cannot see where a pass over the worker's shards ends): the raw stream tags each
    sample with its pass number and, at the end of the pass, records how many samples the pass had; the decoder
    counts attempts and images per pass. A pass all of whose samples were attempted and none decoded is an error
    (its shards hold no usable image), where the old loop would have spun forever."""

    def __init__(self, shards: list[str]):
        self.shards = shards
        self.size: dict[int, int] = {}  # pass -> samples (known once the pass is over)
        self.tried: dict[int, int] = {}
        self.decoded: dict[int, int] = {}

    def attempted(self, p: int, ok: bool) -> None:
        self.tried[p] = self.tried.get(p, 0) + 1
        self.decoded[p] = self.decoded.get(p, 0) + int(ok)
        self.check()

    def ended(self, p: int, n: int) -> None:
        self.size[p] = n
        self.check()

    def check(self) -> None:
        for p in [p for p, n in self.size.items() if self.tried.get(p, 0) >= n]:
            if not self.decoded.get(p, 0):
                raise RuntimeError(
                    f"a whole pass over the shards {self.shards} gave no decodable image ({self.size[p]} "
                    "sample(s), see the warnings): re-create or remove those shards"
                )
            del self.size[p], self.tried[p], self.decoded[p]


def check_readable_shards(shards: list[str], what: str) -> None:
    """Raise before the first step when no shard holds a decodable image: read the shards in order until one
    sample decodes (the first sample, for healthy shards). Without this, shards of corrupt images would loop
    forever in training looking for a batch."""
    skips = SkipCounter()
    for url in shards:
        for sample in iter_shard(url, skips):
            if sample_image(sample)[0] is not None:
                return
            skips(f"{url}:{sample.get('__key__', '?')}", sample_image(sample)[1])
    raise ValueError(
        f"{what}: none of the {len(shards)} shard(s) holds a decodable image ({skips.total} record(s) skipped, "
        f"e.g. {skips.listed[0]['path'] if skips.listed else shards[0]}); check the shards (python -m "
        "data.convert_shards reports unreadable source files) or the pattern"
    )


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
        self.skips = SkipCounter(skipped_counter)
        self.batches_per_epoch = batches_per_epoch
        # Shared memory, not a plain attribute: persistent workers hold a copy of this object made when they
        # started, and read the epoch the main process set here each time their stream restarts (module docstring).
        self._epoch = worker_context().RawValue("q", 0)

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
    def _train_raw(self, epoch: int, wid: int, nw: int, passes: list) -> Iterator[dict]:
        rng = random.Random(_seed(self.seed, epoch, self.rank, wid))
        if self.sampling == "resampled":
            while True:
                yield from iter_shard(rng.choice(self.shards), self.skips)
        perm = list(range(len(self.shards)))
        random.Random(_seed(self.seed, epoch)).shuffle(perm)  # identical on every rank
        mine = [self.shards[i] for i in perm[self.rank :: self.world_size][wid::nw]]
        if not mine:
            return
        passes.append(_Passes(mine))  # _decode checks that each pass gives at least one image
        for p in itertools.count():
            order = mine[:]
            rng.shuffle(order)
            n = 0
            for url in order:
                for sample in iter_shard(url, self.skips):
                    n += 1
                    yield dict(sample, __pass__=p)
            if n == 0:
                raise RuntimeError(f"rank {self.rank} worker {wid}: shards {mine} contain no samples")
            passes[0].ended(p, n)

    def _val_raw(self, wid: int, nw: int) -> Iterator[dict]:
        offsets = self.offsets if self.offsets is not None else [0] * len(self.shards)
        for j in range(wid, len(self.shards), nw):
            for k, sample in enumerate(iter_shard(self.shards[j], self.skips)):
                index = offsets[j] + k if self.offsets is not None else j + k
                if index % self.world_size == self.rank:
                    yield sample

    # decoding / batching --------------------------------------------------------------------------
    def _decode(self, samples: Iterator[dict], passes: list) -> Iterator[tuple]:
        for sample in samples:
            key = sample.get("__key__", "?")
            img, why = sample_image(sample)
            if passes and "__pass__" in sample:  # split-mode training: count this attempt for its pass
                passes[0].attempted(sample["__pass__"], img is not None)
            if img is None:
                self.skips(f"{sample.get('__url__', '?')}:{key}", why)
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
            passes: list[_Passes] = []  # filled by _train_raw in split mode
            raw = _shuffle_buffer(self._train_raw(epoch, wid, nw, passes), self.shuffle_buffer, rng)
        else:
            passes, raw = [], self._val_raw(wid, nw)
        items = self._decode(raw, passes)
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
