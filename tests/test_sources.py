"""data.sources: the one split-across-processes rule (disjoint, complete, no padding) for every source, the one
batch type, skipped records reaching the main process's counter, and the uint8 images the consumers convert."""

from __future__ import annotations

import pytest
import torch
from _data_helpers import make_awkward_tree, make_plain_tree

from data.skips import Skipped
from data.sources import (
    Batch,
    FolderImages,
    HeldOutCrops,
    ImageLoader,
    PhotoCrops,
    TarShards,
    collate,
    process_dataset,
    split_for_process,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_split_for_process_is_disjoint_and_complete():
    for n_items in (0, 1, 5, 7, 16):
        for world in (1, 2, 3, 8):
            parts = [split_for_process(list(range(n_items)), r, world) for r in range(world)]
            flat = sorted(i for p in parts for i in p)
            assert flat == list(range(n_items))  # complete, nothing twice: no padding
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert all(i % world == r for r in range(world) for i in parts[r])  # the rule itself
    with pytest.raises(ValueError, match="process_index must be in 0..1, got 2"):
        split_for_process([1, 2], 2, 2)


def _all_processes(source, world: int, batch_size: int = 2, skip_keys=()) -> tuple[list[list[int]], list, int]:
    """Per process: the global indices it got; all batches; the skips recorded over all processes."""
    indices, batches, skipped = [], [], 0
    for rank in range(world):
        loader = ImageLoader(process_dataset(source, rank, world, skip_keys), batch_size)
        mine = list(loader)
        indices.append([i for b in mine for i in b.index.tolist()])
        batches += mine
        skipped += loader.skips.count
    return indices, batches, skipped


def test_folder_split_no_padding_and_skips_counted(tmp_path):
    """An ImageFolder with a truncated JPEG, split over 1..4 processes (uneven): each readable image exactly
    once, at the process its index names; the unreadable one counted once, whichever process had it."""
    special = make_awkward_tree(str(tmp_path / "tree"))
    source = FolderImages(str(tmp_path / "tree"), 16)
    corrupt = next(i for i in range(len(source)) if source.key(i) == special["corrupt"])
    readable = [i for i in range(len(source)) if i != corrupt]
    for world in (1, 2, 3, 4):
        indices, batches, skipped = _all_processes(source, world)
        assert sorted(i for part in indices for i in part) == readable and skipped == 1, world
        assert all(i % world == r for r, part in enumerate(indices) for i in part)
    b = batches[0]
    assert isinstance(b, Batch) and b.images.dtype == torch.uint8 and b.images.shape[1:] == (3, 16, 16)
    assert b.labels.dtype == b.index.dtype == torch.long
    assert b.keys == [source.key(i) for i in b.index.tolist()]
    assert b.labels.tolist() == [source.label(i) for i in b.index.tolist()]
    assert source.classes == ["cat", "dog"] and set(b.labels.tolist()) <= {0, 1}
    any_layout = FolderImages(str(tmp_path / "tree"), 16, labelled=False)
    assert len(any_layout) == len(source) and {any_layout.label(i) for i in range(len(any_layout))} == {-1}


def test_resume_splits_what_remains(tmp_path):
    """Finished keys are left out before the split, so the remaining images stay evenly spread."""
    source = PhotoCrops(16, 9, seed=2)
    done = {source.key(i) for i in (0, 1, 2, 3, 4)}
    indices, batches, _ = _all_processes(source, 2, skip_keys=done)
    assert sorted(indices[0] + indices[1]) == [5, 6, 7, 8] and len(indices[0]) == len(indices[1]) == 2
    assert not done & {k for b in batches for k in b.keys}


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_shards_split_whole_or_by_record(tmp_path, world):
    """3 shards (4/4/1 records): whole shards for <= 3 processes, records by global index for more; either
    way every record once, its index the shard offset + position; with counts unknown the same keys."""
    from data.convert_shards import convert
    from data.tar_shards import expand_shards, shard_sample_counts

    make_plain_tree(str(tmp_path / "tree"), n_per_class=3)  # 9 images, 3 classes
    meta = convert(str(tmp_path / "tree"), str(tmp_path / "wds"), "val", shard_size=4, shuffle=False, quiet=True)
    urls = expand_shards(meta["pattern"])
    shards = TarShards(urls, 16, shard_sample_counts(urls))
    indices, batches, _ = _all_processes(shards, world)
    assert sorted(i for part in indices for i in part) == list(range(9))
    if world > len(urls):
        assert all(i % world == r for r, part in enumerate(indices) for i in part)
    keys = sorted(k for b in batches for k in b.keys)
    _, unknown, _ = _all_processes(TarShards(urls, 16), world)
    assert sorted(k for b in unknown for k in b.keys) == keys and len(set(keys)) == 9
    limited = TarShards(urls, 16, shard_sample_counts(urls), limit=5)
    indices, _, _ = _all_processes(limited, world)
    assert len(limited) == 5 and sorted(i for part in indices for i in part) == list(range(5))


def test_photo_crops_are_a_function_of_seed_and_index():
    a, b = PhotoCrops(16, 6, seed=4), PhotoCrops(16, 6, seed=4)
    assert all(torch.equal(a.load(i), b.load(i)) and a.label(i) == b.label(i) for i in range(6))
    crop, label, key = a[3]
    assert crop.dtype == torch.float32 and label == a.label(3) and key == "crop-4-0000003"
    assert torch.equal(a.load(3), (crop * 255).round().to(torch.uint8))  # uint8: the float crop rounded once
    assert not torch.equal(a.load(0), PhotoCrops(16, 6, seed=5).load(0))


def test_held_out_crops_are_the_validation_crops():
    from data.photos import PhotosDataModule
    from tokenizer.metrics import to_uint8

    crops = HeldOutCrops(32, per_scale=2, limit=5)
    want = to_uint8(PhotosDataModule(image_size=32, val_crops_per_scale=2).val_batch(5))
    assert len(crops) == 5 and torch.equal(torch.stack([crops.load(i) for i in range(5)]), want)


def test_collate_passes_skipped_records_on():
    img = torch.zeros(3, 4, 4, dtype=torch.uint8)
    batch, skipped = collate([(7, img, 2, "a"), Skipped("x.jpg", "unreadable image"), (9, img, -1, "b")])
    assert batch.index.tolist() == [7, 9] and batch.labels.tolist() == [2, -1] and batch.keys == ["a", "b"]
    assert skipped == [Skipped("x.jpg", "unreadable image")]
    assert collate([Skipped("y.jpg", "why")]) == (None, [Skipped("y.jpg", "why")])
