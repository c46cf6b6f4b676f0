"""Evaluation images, split over processes by global index: batches of (index int64 [B], uint8 [B, 3, S, S]).

Every image has a global index 0..N-1 in a fixed order; process ``rank`` of ``world_size`` takes the indices
``i % world_size == rank`` and nothing else (no padding, no repeats), so gathering (index, metrics) rows from
all processes and sorting by index gives each image exactly once.

- ``sample``: the embedded held-out crops of :mod:`data.sample` (already ``image_size``), quantised to uint8.
- ``folder``: every image file below ``root`` (any layout, ImageFolder included), sorted by relative path.
- ``webdataset``: tar shards in the order of the pattern; index = shard offset + position in the shard
  (sample counts from the converter's ``*-meta.json``, else from the tar headers).

``folder``/``webdataset`` images go through the eval transform (resize the shorter side to ``image_size``,
bicubic antialiased, then center crop) and are quantised to uint8. ``max_images`` keeps the first N indices.
Unreadable images (and the damaged tail of a truncated shard) are skipped: the worker passes a
``data.skips.Skipped`` record along with the batch, and the loader records it, in the main process, in its
``skips`` counter (``loader.skips.report()``: the total and the first 100 paths, for the report); N counts
the images actually evaluated. Folders are listed by ``data.folder.walk_image_files`` (symlink loops safe).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from tokenizer.metrics import to_uint8

SOURCES = ("sample", "folder", "webdataset")


def _collate(items):
    """[(index, uint8 image) | Skipped] -> (index int64 [B], uint8 [B, 3, S, S], [Skipped])."""
    from data.skips import Skipped

    skipped = [it for it in items if isinstance(it, Skipped)]
    items = [it for it in items if it is not None and not isinstance(it, Skipped)]
    if not items:
        return torch.empty(0, dtype=torch.long), torch.empty(0, 3, 0, 0, dtype=torch.uint8), skipped
    return torch.tensor([i for i, _ in items], dtype=torch.long), torch.stack([x for _, x in items]), skipped


class SourceLoader(DataLoader):
    """DataLoader of ``(index, images)`` batches that records the ``Skipped`` records travelling with them in
    ``self.skips`` (a ``data.skips.SkipCounter`` of this process), so their paths reach the report."""

    def __init__(self, *args, **kwargs):
        from data.skips import SkipCounter

        super().__init__(*args, **kwargs)
        self.skips = SkipCounter()

    def __iter__(self):
        for index, images, skipped in super().__iter__():
            self.skips.record(skipped)
            yield index, images


class _IndexedImages(Dataset):
    """Map-style: position p -> (global index, uint8 image) or a Skipped record (unreadable)."""

    def __init__(self, indices: list[int], load):
        self.indices, self.load = indices, load

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, p: int):
        i = self.indices[p]
        image = self.load(i)
        return image if not isinstance(image, torch.Tensor) else (i, image)


class _FolderLoad:
    def __init__(self, root: str, files: list[str], image_size: int):
        from tokenizer.images import eval_transform

        self.root, self.files, self.transform = root, files, eval_transform(image_size)

    def __call__(self, i: int):
        from data.skips import Skipped
        from tokenizer.images import read_image

        path = os.path.join(self.root, self.files[i])
        img = read_image(path)
        if img is None:
            return Skipped(path, "unreadable image")  # logged and counted by the loader, in the main process
        return to_uint8(self.transform(img))


class _ShardImages(IterableDataset):
    """This rank's samples of the shards, as (global index, uint8 image); workers split the shards."""

    def __init__(self, shards: list[str], offsets: list[int], total: int, rank: int, world: int,
                 image_size: int):
        self.shards, self.offsets, self.total = shards, offsets, total
        self.rank, self.world, self.image_size = rank, world, image_size

    def __iter__(self) -> Iterator:
        from data.skips import Skipped
        from data.tar_shards import iter_shard, sample_image
        from tokenizer.images import eval_transform

        transform = eval_transform(self.image_size)
        pending: list[Skipped] = []  # what the shard reader skipped (a damaged tail), sent on with the batch

        def skips(path: str, reason: str) -> None:
            if self.rank == 0:  # every rank reads every shard: report a damaged shard once
                pending.append(Skipped(path, reason))

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in range(wid, len(self.shards), nw):
            if self.offsets[j] >= self.total:
                continue
            for k, sample in enumerate(iter_shard(self.shards[j], skips)):
                i = self.offsets[j] + k
                if i >= self.total:
                    break
                if i % self.world != self.rank:
                    continue
                img, why = sample_image(sample)
                if img is None:
                    yield Skipped(f"{self.shards[j]}:{sample.get('__key__', '?')}", why)
                    continue
                yield i, to_uint8(transform(img))
            yield from pending
            pending.clear()


def make_source(source: str, image_size: int, *, rank: int = 0, world_size: int = 1, batch_size: int = 32,
                max_images: int | None = None, num_workers: int = 0, root: str | None = None,
                shards: str | None = None, val_crops_per_scale: int = 4) -> tuple[DataLoader, int, str]:
    """(loader over this rank's images, number of global indices, description of the source). The loader is a
    ``SourceLoader``: after the loop, ``loader.skips.report()`` gives what this rank skipped."""
    if source == "sample":
        from data.sample import VAL_IMAGES, SampleImagesDataModule

        crops = SampleImagesDataModule(image_size=image_size, val_crops_per_scale=val_crops_per_scale)
        images = to_uint8(crops.val_batch(max_images))
        total = len(images)
        dataset = _IndexedImages(list(range(rank, total, world_size)), images.__getitem__)
        num_workers = 0  # already in memory
        what = (f"embedded held-out crops of {', '.join(VAL_IMAGES)} (data.sample, {val_crops_per_scale} "
                f"crops per scale x 3 scales per photo), {image_size}px")
    elif source == "folder":
        if not root:
            raise ValueError("--source folder needs --root DIR")
        from tokenizer.images import walk_image_files

        files = walk_image_files(root)[:max_images]
        if not files:
            raise ValueError(f"{root}: no image files found (extensions: tokenizer.images.IMAGE_EXTENSIONS)")
        total = len(files)
        dataset = _IndexedImages(list(range(rank, total, world_size)), _FolderLoad(root, files, image_size))
        what = f"image files below {root} (sorted), resize shorter side + center crop to {image_size}px"
    elif source == "webdataset":
        if not shards:
            raise ValueError("--source webdataset needs --shards PATTERN")
        from data.tar_shards import expand_shards, shard_sample_counts

        urls = expand_shards(shards)
        if not urls:
            raise ValueError(f"no shards in {shards!r}")
        counts = shard_sample_counts(urls)
        offsets = [0, *itertools.accumulate(counts)][:-1]
        total = sum(counts) if max_images is None else min(max_images, sum(counts))
        dataset = _ShardImages(urls, offsets, total, rank, world_size, image_size)
        num_workers = min(num_workers, len(urls))
        what = (f"webdataset shards {shards} ({len(urls)} shards), resize shorter side + center crop to "
                f"{image_size}px")
    else:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    loader = SourceLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    return loader, total, what
