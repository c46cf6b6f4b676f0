"""DataModules: DDP-style rank splitting (simulated ranks), equal batch counts, corrupt-image skipping, uint8
batches out of the workers and float32 in [0, 1] after ``on_after_batch_transfer``, persistent workers per epoch."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import torch
from _data_helpers import make_awkward_tree, make_plain_tree
from _small_training import TinyModule, quiet_trainer

from data.convert_shards import convert
from data.folder import FolderDataModule
from data.tar_shards import expand_shards
from data.webdataset import WebDatasetDataModule


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """23 images -> 6 shards of 4,4,4,4,4,3 samples (uneven)."""
    root = tmp_path_factory.mktemp("wds")
    make_plain_tree(str(root / "src"), n_per_class=8, classes=("a", "b", "c"))
    os.remove(root / "src" / "c" / "c007.jpg")
    meta = convert(str(root / "src"), str(root / "out"), "train", shard_size=4, quiet=True)
    assert [s["count"] for s in meta["shards"]] == [4, 4, 4, 4, 4, 3]
    return meta


def _dm(meta, rank, world, **kw):
    kw = {"image_size": 16, "batch_size": 3, "num_workers": 0, "shuffle_buffer": 5, **kw}
    return WebDatasetDataModule(
        meta["pattern"], meta["pattern"], return_keys=True, rank=rank, world_size=world, **kw
    )


def _epoch(loader):
    batches = list(loader)
    for images, labels, keys in batches:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)  # uint8 across the process boundary
        assert labels.dtype == torch.int64 and len(keys) == len(labels) == len(images)
    return batches, [k for b in batches for k in b[2]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_ranks_disjoint_equal_batches(uneven_shards, num_workers):
    meta = uneven_shards
    world = 2
    per_rank = []
    for rank in range(world):
        loader = _dm(meta, rank, world, num_workers=num_workers).train_dataloader()
        batches, keys = _epoch(loader)
        assert len(batches) == len(loader) == 23 // (world * 3)  # 3 batches on every rank
        assert all(len(b[0]) == 3 for b in batches)
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]  # disjoint shards -> disjoint keys


def test_train_epochs_reshuffle_and_epoch_length(uneven_shards):
    loader = _dm(uneven_shards, 0, 1, epoch_length=40).train_dataloader()
    assert len(loader) == 40 // 3
    e0, e1 = _epoch(loader)[1], _epoch(loader)[1]
    assert len(e0) == len(e1) == 39 and e0 != e1
    # the stream itself ends at the epoch's batches (a worker decodes nothing past the end of its share)
    assert len(list(loader.dataset)) == 40 // 3


def test_too_few_shards_for_split(uneven_shards):
    # 6 shards < 2 ranks x 4 workers
    with pytest.raises(ValueError, match="cannot be split disjointly"):
        _dm(uneven_shards, 0, 2, num_workers=4, shard_mode="split").train_dataloader()
    counts = []
    for rank in range(2):  # auto -> resampled: still the same number of batches per rank
        dm = _dm(uneven_shards, rank, 2, num_workers=4, shard_mode="auto")
        assert dm.resolve_shard_mode(6, 2) == "resampled"
        counts.append(len(dm.train_dataloader()))
    assert counts[0] == counts[1] == 3
    batches, _ = _epoch(_dm(uneven_shards, 1, 2, num_workers=0, shard_mode="resampled").train_dataloader())
    assert len(batches) == 3


@pytest.mark.parametrize("world", [2, 3])
def test_val_disjoint_complete_equal(uneven_shards, world):
    keys, nbatches = [], []
    for rank in range(world):
        loader = _dm(uneven_shards, rank, world, num_workers=2 if rank == 0 else 0).val_dataloader()
        batches, k = _epoch(loader)
        nbatches.append(len(batches))
        assert len(batches) == len(loader)
        assert len(k) == -(-23 // world)  # padded to ceil(N / world) samples
        keys.append(set(k))
    assert len(set(nbatches)) == 1
    assert sum(map(len, keys)) == 23 and len(set().union(*keys)) == 23  # disjoint and complete
    again = [k for b in _dm(uneven_shards, 0, world).val_dataloader() for k in b[2]]
    assert set(again) == keys[0]  # deterministic


def test_default_batch_contract_and_corrupt_skipped(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_awkward_tree(src)
    meta = convert(src, out, "train", shard_size=100, quiet=True)
    # inject a shard holding an undecodable sample (the converter would have rejected it)
    with tarfile.open(os.path.join(out, "train-000001.tar"), "w") as tar:
        for name, data in (("zz_bad.jpg", b"\xff\xd8\xff not a jpeg"), ("zz_bad.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pattern = os.path.join(out, "train-{000000..000001}.tar")
    dm = WebDatasetDataModule(
        pattern,
        pattern,
        batch_size=4,
        image_size=16,
        num_workers=0,
        epoch_length=8,
        shuffle_buffer=1,
        shard_mode="resampled",
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    for batch in batches:  # default contract: (images, labels), never a short training batch
        assert len(batch) == 2 and batch[0].shape == (4, 3, 16, 16) and batch[1].dtype == torch.int64
        assert batch[0].dtype == torch.uint8
    assert meta["num_samples"] == 9
    val = list(dm.val_dataloader())
    assert [len(b[0]) for b in val] == [4, 4, 2]  # 10 listed samples, 1 undecodable -> padded back to 10
    assert dm.num_skipped >= 1


def test_folder_datamodule_skips_corrupt(tmp_path, caplog):
    src = str(tmp_path / "src")
    make_awkward_tree(src)
    for num_workers in (1, 0):  # 1 worker: the skip counter is shared with the worker process
        dm = FolderDataModule(src, src, image_size=16, batch_size=4, num_workers=num_workers, drop_last=False)
        dm.setup("fit")
        assert dm.classes == ["cat", "dog"]
        n = 0
        with caplog.at_level("WARNING"):
            for batch in dm.val_dataloader():
                assert batch[0].shape[1:] == (3, 16, 16) and batch[0].dtype == torch.uint8
                images, labels = dm.on_after_batch_transfer(batch, 0)
                assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
                assert labels.dtype == torch.int64
                n += len(images)
        assert n == 9
        assert dm.num_skipped == 1
    assert any("corrupt.jpg" in r.getMessage() for r in caplog.records)  # logged in-process (0 workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_fit_uses_exact_epoch_length(uneven_shards, tmp_path, num_workers):
    class Checked(TinyModule):
        """Checks every batch it gets and records the keys of each epoch."""

        def __init__(self):
            super().__init__()
            self.seen = {"train": 0, "val": 0}
            self.keys: dict[int, list[str]] = {}

        def _check(self, images):  # the DataModule's on_after_batch_transfer ran: float32 in [0, 1]
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
            assert 0 <= images.min() and images.max() <= 1 and images.max() > 0

        def training_step(self, batch, batch_idx):
            self._check(batch[0])
            self.seen["train"] += 1
            self.keys.setdefault(self.current_epoch, []).extend(batch[2])
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, _):
            self._check(batch[0])
            self.seen["val"] += 1

    dm = WebDatasetDataModule(
        uneven_shards["pattern"], uneven_shards["pattern"], image_size=16, batch_size=4, num_workers=num_workers,
        return_keys=True,
    )
    model = Checked()
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    assert model.seen == {"train": 2 * (23 // 4), "val": 2 * 6}
    # epoch 1 is a new (seed, epoch) stream even when the same workers serve both epochs
    assert len(model.keys[0]) == len(model.keys[1]) == 4 * (23 // 4) and model.keys[0] != model.keys[1]
    loader = trainer.train_dataloader
    assert loader.persistent_workers == (num_workers > 0)
    assert not loader.pin_memory  # CPU trainer: nothing to pin for, even on a machine with a GPU


# ---------------------------------------------------------------- uint8 across the process boundary, float on device
def _float_batches(dm, loader, n=None):
    """The batches of `loader` as the LightningModule gets them (after the DataModule's on_after_batch_transfer)."""
    out = []
    for i, batch in enumerate(loader):
        if n is not None and i >= n:
            break
        assert batch[0].dtype == torch.uint8  # what crossed the worker -> main process boundary
        out.append(dm.on_after_batch_transfer(batch, 0))
    return out


def test_folder_workers_send_uint8_equal_to_float_pipeline(tmp_path):
    from torch.utils.data import DataLoader

    from data.folder import ImageFolderDataset, SkipCorruptCollate
    from data.transforms import train_transform

    src = str(tmp_path / "src")
    make_plain_tree(src, n_per_class=6, size=(40, 28))
    dm = FolderDataModule(src, image_size=16, batch_size=4, num_workers=2)
    dm.setup("fit")
    torch.manual_seed(7)
    got = _float_batches(dm, dm.train_dataloader())
    # the float pipeline as it was: same files, transform, sampler and worker seeding, float32 out of the workers
    reference = DataLoader(ImageFolderDataset(src, train_transform(16)), batch_size=4, shuffle=True, num_workers=2,
                           collate_fn=SkipCorruptCollate(16, torch.float32), drop_last=True)
    torch.manual_seed(7)
    expected = list(reference)
    assert len(got) == len(expected) == 18 // 4
    for (images, labels), (ref_images, ref_labels) in zip(got, expected):
        assert images.dtype == ref_images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
        # same crops; PIL resizes the 8-bit image to 8 bit in both pipelines, so not even rounding differs
        assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)


def test_webdataset_workers_send_uint8_equal_to_float_pipeline(uneven_shards):
    from data.shard_stream import EpochLoader, ShardStream
    from data.transforms import train_transform

    dm = _dm(uneven_shards, 1, 2, num_workers=2)
    torch.manual_seed(3)
    got = _float_batches(dm, dm.train_dataloader())
    stream = ShardStream(expand_shards(uneven_shards["pattern"]), train=True, transform=train_transform(16),
                         batch_size=3, rank=1, world_size=2, shuffle_buffer=5, return_keys=True)
    torch.manual_seed(3)
    expected = list(EpochLoader(stream, 23 // (2 * 3), num_workers=2))
    assert len(got) == len(expected) == 3
    for (images, labels, keys), (ref_images, ref_labels, ref_keys) in zip(got, expected):
        assert keys == ref_keys and torch.equal(labels, ref_labels)  # keys and labels pass through untouched
        assert images.dtype == torch.float32 and torch.equal(images, ref_images)


def test_sample_workers_send_uint8_within_rounding_of_float_pipeline():
    from torch.utils.data import DataLoader

    from data.photos import TRAIN_IMAGES, PhotosDataModule, RandomCrops, load_photo

    dm = PhotosDataModule(image_size=16, batch_size=8, num_workers=2, train_crops_per_epoch=32,
                                val_crops_per_scale=2, color_jitter=0.3)
    dm.setup()
    torch.manual_seed(11)
    got = _float_batches(dm, dm.train_dataloader())
    float_crops = RandomCrops([load_photo(n) for n in TRAIN_IMAGES], list(range(len(TRAIN_IMAGES))), 16, 32,
                              color_jitter=0.3)
    torch.manual_seed(11)
    expected = list(DataLoader(float_crops, batch_size=8, num_workers=2, drop_last=True))
    assert len(got) == len(expected) == 4
    for (images, labels), (ref_images, ref_labels) in zip(got, expected):
        assert images.dtype == torch.float32 and torch.equal(labels, ref_labels)
        # the same crop, jittered in float, rounded once to the nearest of 256 levels
        assert (images - ref_images).abs().max() <= 0.5 / 255 + 1e-6
    # validation: uint8 batches; after the hook exactly val_batch(), which keeps its float contract
    val = _float_batches(dm, dm.val_dataloader())
    assert torch.equal(torch.cat([b[0] for b in val]), dm.val_batch())
    assert dm.val_batch().dtype == torch.float32


def test_hook_rejects_non_uint8_images():
    dm = FolderDataModule("unused")  # the hook needs no data
    with pytest.raises(TypeError, match="expected uint8 images.*float32"):  # converting twice would be a bug
        dm.on_after_batch_transfer((torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)), 0)


# --------------------------------------------------------------------------------- persistent workers, per epoch
def _shard_of_key(meta) -> dict[str, str]:
    out = {}
    for shard in expand_shards(meta["pattern"]):
        with tarfile.open(shard) as tar:
            out.update({m.name.rsplit(".", 1)[0]: os.path.basename(shard) for m in tar if m.isreg()})
    return out


def _keys_at(meta, rank, epoch, **kw):
    """Keys of one epoch from a fresh (non-persistent) loader started at `epoch`: the reference."""
    loader = _dm(meta, rank, 2, num_workers=2, persistent_workers=False, **kw).train_dataloader()
    loader.epoch_fn = lambda: epoch
    return _epoch(loader)[1]


def test_persistent_workers_read_each_epochs_shard_permutation(uneven_shards):
    shard_of = _shard_of_key(uneven_shards)
    schedule = [0, 1, 5]  # 1 -> 5: an epoch the workers cannot infer by counting their own restarts
    per_rank = []
    for rank in range(2):
        dm = _dm(uneven_shards, rank, 2, num_workers=2)
        loader = dm.train_dataloader()
        assert loader.persistent_workers and loader.prefetch_factor == 4
        loader.epoch_fn = iter(schedule).__next__
        runs = [_epoch(loader) for _ in schedule]  # the same two worker processes serve all three epochs
        assert [len(batches) for batches, _ in runs] == [23 // (2 * 3)] * 3  # same batch count every epoch
        keys = [k for _, k in runs]
        for epoch, k in zip(schedule, keys):
            assert k == _keys_at(uneven_shards, rank, epoch)  # exactly the stream of that epoch
        shard_orders = [list(dict.fromkeys(shard_of[key] for key in k)) for k in keys]
        assert shard_orders[0] != shard_orders[1] != shard_orders[2]
        per_rank.append(keys)
    for e in range(len(schedule)):  # ranks stay disjoint in every epoch
        assert not set(per_rank[0][e]) & set(per_rank[1][e])
