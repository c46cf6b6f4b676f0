"""DataModules: DDP-style rank splitting (simulated ranks), equal batch counts, corrupt-image skipping."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import torch
from _data_helpers import make_awkward_tree, make_plain_tree

from data.convert_shards import convert
from data.folder import FolderDataModule
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
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
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
            for images, labels in dm.val_dataloader():
                assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
                assert labels.dtype == torch.int64
                n += len(images)
        assert n == 9
        assert dm.num_skipped == 1
    assert any("corrupt.jpg" in r.getMessage() for r in caplog.records)  # logged in-process (0 workers)


def test_lightning_fit_uses_exact_epoch_length(uneven_shards, tmp_path):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)
            self.seen = {"train": 0, "val": 0}

        def training_step(self, batch, _):
            self.seen["train"] += 1
            return self.lin(batch[0].mean((2, 3))).mean()

        def validation_step(self, batch, _):
            self.seen["val"] += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = WebDatasetDataModule(
        uneven_shards["pattern"], uneven_shards["pattern"], image_size=16, batch_size=4, num_workers=0
    )
    model = Tiny()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    assert model.seen == {"train": 2 * (23 // 4), "val": 2 * 6}
