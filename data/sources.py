"""Image sources for evaluation, token extraction and gFID: listed items, one split rule, one batch type.

A source knows its items in a fixed order: item ``i`` (its global index) has a ``key(i)`` (unique and stable
across runs: what token shards store and resumes skip), a ``label(i)`` (-1: none) and ``load(i)``, which
gives the image as uint8 [3, S, S] (the eval transform at ``image_size``: shorter side resized, center crop)
or a ``data.skips.Skipped`` record when it cannot be read.

- ``FolderImages``: an ImageFolder tree (``labelled``: ``data.folder.scan_image_folder``, label = sorted class
  folder) or image files in any layout (``tokenizer.images.walk_image_files``, label -1); key = relative path.
- ``PhotoCrops``: deterministic random crops of the embedded training photographs; crop ``i`` is a pure
  function of ``(seed, i)``; label = photo index.
- ``HeldOutCrops``: the fixed held-out crops of ``data.photos`` (what validation sees); label = photo index.
- ``TarShards``: webdataset tar shards (``data.tar_shards``); label = ``cls``, key = ``__key__``. They are
  streamed, not listed: the global index is shard offset + position (offsets need the sample counts).

The split rule (``split_for_process``): item ``j`` goes to process ``j % num_processes``: disjoint, complete,
no padding, so gathered per-image rows count each image once. For shards the items are whole shards when
there are at least as many shards as processes (each process reads only its own), else records by global
index (every process reads every shard and keeps its records; a damaged shard is reported by process 0).

``ImageLoader(process_dataset(source, rank, world))`` gives one process's ``Batch``es (uint8 images; consumers
convert with ``data.transforms.to_float_images`` where they need float). Unreadable items travel from DataLoader
workers to the main process as ``Skipped`` records and are recorded in ``loader.skips`` (a ``SkipCounter``).
"""

from __future__ import annotations

import itertools
import os
import zlib
from collections.abc import Container, Iterator, Sequence
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from data.skips import SkipCounter, Skipped
from tokenizer.images import eval_transform, read_image_or_reason
from tokenizer.metrics import to_uint8


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 [B, 3, S, S]
    labels: torch.Tensor  # int64 [B], -1 where the source has no label
    keys: list[str]  # [B]
    index: torch.Tensor  # int64 [B] global index in the source's order; -1 when unknown (TarShards)


def split_for_process(items: Sequence, process_index: int, num_processes: int) -> list:
    """Item j goes to process j % num_processes: disjoint, complete, sizes differ by at most one."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in 0..{num_processes - 1}, got {process_index}")
    return list(items[process_index::num_processes])


# ---- listed sources: len(), key(i), label(i), load(i) -> uint8 [3, S, S] | Skipped ----------------------
class Listed:
    """A source whose (key, label) pairs are listed up front in ``self.items``."""

    items: list[tuple[str, int]]
    max_workers: int | None = None  # None: as many DataLoader workers as asked for

    def __len__(self) -> int:
        return len(self.items)

    def key(self, i: int) -> str:
        return self.items[i][0]

    def label(self, i: int) -> int:
        return self.items[i][1]


class FolderImages(Listed):
    def __init__(self, root: str, image_size: int, labelled: bool = True, limit: int | None = None):
        from data.folder import scan_image_folder
        from tokenizer.images import walk_image_files

        if labelled:
            self.classes, items = scan_image_folder(root)
        else:
            self.classes, items = [], [(rel, -1) for rel in walk_image_files(root)]
        self.root, self.items = root, items[:limit]
        if not self.items:
            raise ValueError(f"{root}: no image files found (extensions: tokenizer.images.IMAGE_EXTENSIONS)"
                             + (" below the class folders" if labelled else ""))
        self.transform = eval_transform(image_size, uint8=True)
        self.description = (f"{'ImageFolder' if labelled else 'image files below'} {root} (sorted), resize "
                            f"shorter side + center crop to {image_size}px")

    def load(self, i: int) -> torch.Tensor | Skipped:
        path = os.path.join(self.root, self.items[i][0])
        img, why = read_image_or_reason(path)
        return Skipped(path, why) if img is None else self.transform(img)


class PhotoCrops:
    """Random crops (random scale, random position) of the embedded training photographs, crop i a pure
    function of (seed, i): any process computes any crop, and a rerun the same crops for the same keys."""

    max_workers: int | None = None

    def __init__(self, image_size: int, num_crops: int, seed: int = 0):
        from data.photos import TRAIN_IMAGES, RandomCrops, load_photo

        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        photos = [load_photo(n) for n in TRAIN_IMAGES]
        # the training crops' pyramid (photo x scale), so both crop paths draw from the same resized photos
        self.pyramid = RandomCrops(photos, list(range(len(photos))), image_size, num_crops).pyramid
        self.classes, self.image_size, self.num_crops, self.seed = list(TRAIN_IMAGES), image_size, num_crops, seed
        self.description = f"{num_crops} embedded training-photo crops at {image_size}px (seed {seed})"

    def __len__(self) -> int:
        return self.num_crops

    def key(self, i: int) -> str:
        return f"crop-{self.seed}-{i:07d}"

    def _draws(self, i: int) -> tuple[torch.Generator, int]:
        g = torch.Generator().manual_seed(zlib.crc32(f"crop:{self.seed}:{i}".encode()))
        return g, int(torch.randint(len(self.pyramid), (), generator=g))  # the first draw: the photo

    def label(self, i: int) -> int:
        return self._draws(i)[1]

    def crop(self, i: int) -> torch.Tensor:
        """float32 [3, S, S] in [0, 1], before rounding to uint8 (e.g. to train on the photographs)."""
        g, photo = self._draws(i)
        image = self.pyramid[photo][int(torch.randint(len(self.pyramid[photo]), (), generator=g))]
        h, w = image.shape[-2:]
        s = self.image_size
        top = int(torch.randint(h - s + 1, (), generator=g))
        left = int(torch.randint(w - s + 1, (), generator=g))
        return image[:, top : top + s, left : left + s].clamp(0, 1)  # antialiased resizing overshoots a bit

    def load(self, i: int) -> torch.Tensor:
        return to_uint8(self.crop(i))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        """(float crop [3, S, S], photo index, key)."""
        return self.crop(i), self.label(i), self.key(i)


class HeldOutCrops(Listed):
    """The fixed held-out crops of ``data.photos`` (evenly spaced, 3 scales, scale-major), first ``limit``."""

    max_workers: int | None = 0  # already in memory: workers would only add IPC

    def __init__(self, image_size: int, per_scale: int = 4, limit: int | None = None):
        from data.photos import VAL_IMAGES, PhotosDataModule

        module = PhotosDataModule(image_size=image_size, val_crops_per_scale=per_scale)
        module.setup()
        self.crops = module.val_set  # (uint8 [3, S, S], label)
        self.items = [(f"heldout-{i:05d}", int(self.crops[i][1])) for i in range(len(self.crops))][:limit]
        self.description = (f"embedded held-out crops of {', '.join(VAL_IMAGES)} (data.photos, {per_scale} "
                            f"crops per scale x 3 scales per photo), {image_size}px")

    def load(self, i: int) -> torch.Tensor:
        return self.crops[i][0]


class ListedImages(Dataset):
    """Positions p of one process's share -> (index, uint8 image, label, key), or a Skipped record."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices, self.max_workers = source, indices, source.max_workers

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, p: int):
        i = self.indices[p]
        image = self.source.load(i)
        return image if isinstance(image, Skipped) else (i, image, self.source.label(i), self.source.key(i))


# ---- tar shards -----------------------------------------------------------------------------------------
class TarShards:
    """Shards ``urls`` in order. ``counts`` (samples per shard, ``data.tar_shards.shard_sample_counts``) give
    global indices and allow ``limit`` (the first N indices); without them (remote shards, no meta.json) the
    index is -1 when shards are split whole, and a records split reads in one worker (a running position)."""

    def __init__(self, urls: list[str], image_size: int, counts: list[int] | None = None,
                 limit: int | None = None, description: str = ""):
        if not urls:
            raise ValueError(f"no shards given ({description or 'empty list'}): check the pattern")
        if limit is not None and counts is None:
            raise ValueError("TarShards: limit needs the sample counts (data.tar_shards.shard_sample_counts)")
        self.urls, self.image_size, self.counts = urls, image_size, counts
        self.offsets = None if counts is None else [0, *itertools.accumulate(counts)][:-1]
        self.total = None if counts is None else min(sum(counts), limit if limit is not None else sum(counts))
        self.description = description or f"{len(urls)} tar shards"

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("TarShards without sample counts has no length")
        return self.total


class ShardRecords(IterableDataset):
    """One process's records of a ``TarShards`` (the split rule above), as ListedImages items; the DataLoader
    workers of a process share its shards out (shard w goes to worker w % num_workers)."""

    def __init__(self, shards: TarShards, process_index: int, num_processes: int, skip_keys: Container = ()):
        self.shards, self.rank, self.world, self.skip_keys = shards, process_index, num_processes, skip_keys
        self.whole = len(shards.urls) >= num_processes
        every = list(enumerate(shards.urls))
        self.mine = split_for_process(every, process_index, num_processes) if self.whole else every
        # records split without offsets: positions are a running count, which needs one reader of every shard
        self.max_workers = len(self.mine) if shards.offsets is not None or self.whole else 0

    def __iter__(self) -> Iterator:
        from data.tar_shards import iter_shard, sample_image, sample_label

        transform = eval_transform(self.shards.image_size, uint8=True)
        offsets, total = self.shards.offsets, self.shards.total
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        pending: list[Skipped] = []  # a damaged shard (reader-level skips), sent on after the shard's records

        def shard_skipped(path: str, reason: str) -> None:
            if self.whole or self.rank == 0:  # a shard every process reads is reported once
                pending.append(Skipped(path, reason))

        running = 0  # global position when offsets are unknown (records split: every shard read in order)
        for w, (j, url) in enumerate(self.mine):
            if w % nw != wid:
                continue
            for k, sample in enumerate(iter_shard(url, shard_skipped)):
                pos, running = (offsets[j] + k if offsets is not None else running), running + 1
                if total is not None and pos >= total:
                    break
                if not self.whole and pos % self.world != self.rank:
                    continue
                key = sample["__key__"]
                if key in self.skip_keys:
                    continue
                img, why = sample_image(sample)
                if img is None:
                    yield Skipped(f"{url}:{key}", why)
                    continue
                index = pos if offsets is not None or not self.whole else -1
                yield index, transform(img), sample_label(sample), key
            yield from pending
            pending.clear()


# ---- one process's batches ------------------------------------------------------------------------------
def collate(items: list) -> tuple[Batch | None, list[Skipped]]:
    """[(index, uint8 image, label, key) | Skipped] -> (Batch, or None when all were skipped; [Skipped])."""
    skipped = [it for it in items if isinstance(it, Skipped)]
    items = [it for it in items if not isinstance(it, Skipped)]
    if not items:
        return None, skipped
    index, images, labels, keys = zip(*items, strict=True)
    return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys),
                 torch.tensor(index, dtype=torch.long)), skipped  # fmt: skip


class ImageLoader(DataLoader):
    """DataLoader of non-empty ``Batch``es that records the ``Skipped`` records travelling with them in
    ``self.skips`` (this process's ``SkipCounter``: logged with their path, counted, listed for reports)."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int = 0, skips: SkipCounter | None = None):
        if dataset.max_workers is not None:  # in-memory items, or shards fewer than workers
            num_workers = min(num_workers, dataset.max_workers)
        super().__init__(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
        self.skips = SkipCounter() if skips is None else skips

    def __iter__(self) -> Iterator[Batch]:
        for batch, skipped in super().__iter__():
            self.skips.record(skipped)
            if batch is not None:
                yield batch


def remaining(source, skip_keys: Container) -> list[int]:
    """Global indices of a listed source whose key is not in ``skip_keys`` (a resume's finished keys)."""
    return [i for i in range(len(source)) if source.key(i) not in skip_keys]


def process_dataset(source, process_index: int = 0, num_processes: int = 1, skip_keys: Container = ()) -> Dataset:
    """This process's share of ``source`` (the split rule above) for an ``ImageLoader``, leaving out items whose
    key is in ``skip_keys``; a listed source splits what remains, so a resume with another process count is even."""
    if isinstance(source, TarShards):
        return ShardRecords(source, process_index, num_processes, skip_keys)
    return ListedImages(source, split_for_process(remaining(source, skip_keys), process_index, num_processes))


__all__ = ["Batch", "FolderImages", "HeldOutCrops", "ImageLoader", "ListedImages", "PhotoCrops", "ShardRecords",
           "TarShards", "collate", "process_dataset", "remaining", "split_for_process"]
