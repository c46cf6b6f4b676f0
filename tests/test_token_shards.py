"""Token shard format: writer/reader round trip, resume, dtype, DataModule batches. CPU, seconds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data.tokens import (
    TokenDataModule,
    TokenShardWriter,
    finalize_meta,
    ids_dtype,
    load_token_records,
    read_meta,
    shard_paths,
    split_by_key,
)


def make_records(n: int, k: int = 8, vocab: int = 100, views: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (n, k) if views == 1 else (n, views, k)
    return rng.integers(0, vocab, shape), rng.integers(0, 10, n), [f"img_{i:05d}" for i in range(n)]


def test_ids_dtype_by_codebook_size():
    assert ids_dtype(4096) == np.int16 and ids_dtype(32767) == np.int16
    assert ids_dtype(32768) == np.int32 and ids_dtype(2**18) == np.int32


@pytest.mark.parametrize("codebook_size", [100, 65536])
def test_round_trip(tmp_path, codebook_size):
    ids, labels, keys = make_records(25, vocab=min(codebook_size, 60000))
    root = str(tmp_path / "tok")
    with TokenShardWriter(
        root,
        num_tokens=8,
        codebook_size=codebook_size,
        shard_size=10,
        num_classes=10,
        tokenizer_dir="/some/tok",
    ) as w:
        w.write(torch.from_numpy(ids[:7]), torch.from_numpy(labels[:7]), keys[:7])  # tensors
        w.write(ids[7:], labels[7:], keys[7:])  # arrays
    assert [os.path.basename(p) for p in shard_paths(root)] == [
        "tokens-000000.npz",
        "tokens-000001.npz",
        "tokens-000002.npz",
    ]
    meta = read_meta(root)
    assert meta["complete"] and meta["num_records"] == 25 and meta["num_shards"] == 3
    assert meta["dtype"] == ids_dtype(codebook_size).name and meta["tokenizer_dir"] == "/some/tok"
    rids, rlabels, rkeys, _, _ = load_token_records(root)
    assert rids.dtype == ids_dtype(codebook_size)
    np.testing.assert_array_equal(rids, ids)
    np.testing.assert_array_equal(rlabels, labels)
    assert rkeys.tolist() == keys
    assert not [f for f in os.listdir(root) if f.endswith(".tmp")]


def test_resume_keeps_finished_shards(tmp_path):
    ids, labels, keys = make_records(30)
    root = str(tmp_path / "tok")
    w = TokenShardWriter(root, num_tokens=8, codebook_size=100, shard_size=10)
    w.write(ids[:25], labels[:25], keys[:25])  # 2 shards written, 5 records buffered, then "crash"
    first = {p: os.path.getmtime(p) for p in shard_paths(root)}
    assert len(first) == 2 and not read_meta(root)["complete"]
    # a half-written shard, named as tokenizer.atomic names the temp file of a writer that was killed
    partial = os.path.join(root, ".tokens-000002.npz.partial-x1y2z3.tmp")
    open(partial, "wb").write(b"partial")

    w2 = TokenShardWriter(root, num_tokens=8, codebook_size=100, shard_size=10)
    assert w2.num_resumed == 20 and w2.is_done(keys[0]) and not w2.is_done(keys[20])
    assert not os.path.exists(partial)
    assert w2.write(ids, labels, keys) == 10  # everything again: only the 10 unfinished records are taken
    assert w2.num_skipped == 20
    meta = w2.close()
    assert meta["num_records"] == 30 and meta["complete"]
    assert {p: os.path.getmtime(p) for p in shard_paths(root)[:2]} == first  # untouched
    rids, _, rkeys, _, _ = load_token_records(root)
    order = np.argsort(rkeys)
    np.testing.assert_array_equal(rids[order], ids)
    with pytest.raises(ValueError, match="num_tokens"):
        TokenShardWriter(root, num_tokens=16, codebook_size=100)


def test_writer_rejects_bad_input(tmp_path):
    w = TokenShardWriter(str(tmp_path), num_tokens=8, codebook_size=100)
    ids, labels, keys = make_records(4)
    with pytest.raises(ValueError, match="written twice"):
        w.write(ids, labels, ["a", "b", "c", "a"])
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        w.write(ids + 100, labels, ["x", "y", "z", "w"])
    with pytest.raises(ValueError, match="expected ids"):
        w.write(ids[:, :4], labels, ["p", "q", "r", "s"])


def test_duplicate_keys_across_processes_detected(tmp_path):
    root = str(tmp_path)
    ids, labels, keys = make_records(6)
    for rank in range(2):  # two extraction processes that (wrongly) both took image 3
        sl = slice(0, 4) if rank == 0 else slice(3, 6)
        with TokenShardWriter(root, 8, 100, prefix=f"tokens-r{rank:02d}", write_meta=False) as w:
            w.write(ids[sl], labels[sl], keys[sl])
    with pytest.raises(FileNotFoundError):
        read_meta(root)  # nobody owned meta.json
    w = TokenShardWriter(root, 8, 100)  # prefix "tokens" must not claim the "tokens-r00-*" shards
    assert w.num_resumed == 0 and w.next_index == 0  # (it writes an incomplete meta.json)
    with pytest.raises(ValueError, match="duplicate"):
        finalize_meta(root)


def test_split_by_key_is_stable():
    keys = np.array([f"k{i}" for i in range(5000)])
    m = split_by_key(keys, 0.1)
    assert 400 < m.sum() < 600
    np.testing.assert_array_equal(m[::-1], split_by_key(keys[::-1], 0.1))  # independent of order
    assert not split_by_key(keys, 0.0).any()


def test_datamodule_batches(tmp_path):
    ids, labels, keys = make_records(64, k=8, views=2)
    root = str(tmp_path / "tok")
    with TokenShardWriter(root, 8, 100, shard_size=20, num_views=2, flip=True) as w:
        w.write(ids, labels, keys)
    assert json.load(open(os.path.join(root, "meta.json")))["flip"] is True
    dm = TokenDataModule(root, batch_size=8, val_fraction=0.25, num_tokens=5)
    assert dm.meta["num_tokens"] == 8 and dm.seq_len == 5
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 64 and len(dm.val_set) > 0
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 5) and x.dtype == torch.int64 and y.shape == (8,) and y.dtype == torch.int64
    vx, _ = next(iter(dm.val_dataloader()))
    by_row = {tuple(r[0, :5]) for r in ids}  # validation always reads view 0
    assert all(tuple(r.tolist()) in by_row for r in vx)
    with pytest.raises(ValueError):
        TokenDataModule(root, num_tokens=9).setup("fit")
    no_val = TokenDataModule(root, batch_size=8)
    no_val.setup("fit")
    assert no_val.val_set is None and no_val.val_dataloader() == []
