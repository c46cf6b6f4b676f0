"""Evaluation images, split over processes by global index: batches of (index int64 [B], uint8 [B, 3, S, S]).

The sources, the split rule (item ``i`` -> process ``i % world_size``, no padding, no repeats; tar shards are
split whole when there are enough of them) and the skip counting are ``data.sources``; this module names the
evaluation's three sources and gives the (index, images) pairs ``eval.recon_eval`` reads.

- ``photos``: the embedded held-out crops of :mod:`data.photos` (already ``image_size``, uint8).
- ``folder``: every image file below ``root`` (any layout, ImageFolder included), sorted by relative path.
- ``webdataset``: tar shards in the order of the pattern; index = shard offset + position in the shard
  (sample counts from the converter's ``*-meta.json``, else from the tar headers).

``max_images`` keeps the first N indices. Unreadable images are skipped and recorded in ``loader.skips``
(``loader.skips.report()``: the total and the first 100 paths, for the report); N counts the images evaluated.
"""

from __future__ import annotations

from data.sources import FolderImages, HeldOutCrops, ImageLoader, TarShards, process_dataset

SOURCES = ("photos", "folder", "webdataset")


class SourceLoader(ImageLoader):
    """``data.sources.ImageLoader`` seen as ``(index, images)`` pairs; ``skips`` as there."""

    def __iter__(self):
        for batch in super().__iter__():
            yield batch.index, batch.images


def make_source(source: str, image_size: int, *, rank: int = 0, world_size: int = 1, batch_size: int = 32,
                max_images: int | None = None, num_workers: int = 0, root: str | None = None,
                shards: str | None = None, val_crops_per_scale: int = 4) -> tuple[SourceLoader, int, str]:
    """(loader over this rank's images, number of global indices, description of the source). After the loop,
    ``loader.skips.report()`` gives what this rank skipped."""
    if source == "photos":
        images = HeldOutCrops(image_size, val_crops_per_scale, limit=max_images)
    elif source == "folder":
        if not root:
            raise ValueError("--source folder needs --root DIR")
        images = FolderImages(root, image_size, labelled=False, limit=max_images)
    elif source == "webdataset":
        if not shards:
            raise ValueError("--source webdataset needs --shards PATTERN")
        from data.tar_shards import expand_shards, shard_sample_counts

        urls = expand_shards(shards)
        images = TarShards(urls, image_size, shard_sample_counts(urls) if urls else None, max_images,
                           f"webdataset shards {shards} ({len(urls)} shards), resize shorter side + center crop "
                           f"to {image_size}px")  # fmt: skip
    else:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    loader = SourceLoader(process_dataset(images, rank, world_size), batch_size, num_workers)
    return loader, len(images), images.description
