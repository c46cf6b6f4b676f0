"""Shard converter: corrupt files skipped and reported, odd modes decode to RGB, bytes preserved, resume."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch
from _data_helpers import make_awkward_tree

from data.convert_shards import convert
from data.shard_stream import ShardStream
from data.tar_shards import expand_shards
from data.transforms import to_float_images, train_transform
from tokenizer.images import decode_image, eval_transform
from tokenizer.metrics import to_uint8


@pytest.fixture()
def converted(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "shards")
    special = make_awkward_tree(src)
    meta = convert(src, out, "train", shard_size=3, quiet=True)
    return src, out, special, meta


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def test_corrupt_skipped_and_reported(converted):
    src, out, special, meta = converted
    assert meta["num_skipped"] == 1 and meta["num_samples"] == 9
    skipped = json.load(open(os.path.join(out, "train-skipped.json")))
    assert [s["path"] for s in skipped] == [special["corrupt"]]
    assert skipped[0]["reason"]
    assert json.load(open(os.path.join(out, "classes.json"))) == ["cat", "dog"]
    assert meta["pattern"] == os.path.join(out, "train-{000000..000003}.tar")
    assert len(expand_shards(meta["pattern"])) == meta["num_shards"] == 4  # 10 files / 3 per shard
    assert sum(s["count"] for s in meta["shards"]) == 9


def test_original_bytes_preserved(converted):
    src, out, special, meta = converted
    members = {}
    for shard in expand_shards(meta["pattern"]):
        members.update(_members(shard))
    images = {n: b for n, b in members.items() if not n.endswith(".cls")}
    assert len(images) == 9
    assert "dog_alpha.png" in images  # PNG kept as PNG under its own key
    assert sorted(n for n in images if n.endswith(".jpg")) == sorted(
        f"{k}.jpg"
        for k in [
            "cat_rgb0",
            "cat_rgb1",
            "cat_rgb2",
            "dog_rgb0",
            "dog_rgb1",
            "dog_rgb2",
            "cat_gray",
            "cat_cmyk",
        ]
    )
    for name, data in images.items():
        key = name.rsplit(".", 1)[0]
        cls, stem = key.split("_", 1)
        candidates = [f for f in os.listdir(os.path.join(src, cls)) if os.path.splitext(f)[0] == stem]
        assert len(candidates) == 1
        assert data == open(os.path.join(src, cls, candidates[0]), "rb").read(), name  # byte for byte
        assert members[f"{key}.cls"] == (b"0" if cls == "cat" else b"1")


def test_samples_decode_to_rgb_float(converted):
    src, out, special, meta = converted
    stream = ShardStream(
        expand_shards(meta["pattern"]),
        train=False,
        transform=eval_transform(32),
        batch_size=4,
        return_keys=True,
    )
    keys, n = [], 0
    for images, labels, batch_keys in stream:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert images.min() >= 0 and images.max() <= 1
        assert labels.dtype == torch.int64
        for k, lab in zip(batch_keys, labels.tolist()):
            assert lab == (0 if k.startswith("cat_") else 1)
        keys += batch_keys
        n += len(images)
    assert n == 9 and {"cat_gray", "cat_cmyk", "dog_alpha"} <= set(keys)
    with open(os.path.join(src, special["rgba"]), "rb") as f:  # alpha 128 composited on white
        img = decode_image(f.read())
    assert img.mode == "RGB" and min(img.getextrema(), key=lambda e: e[0])[0] >= 127


def test_uint8_transforms_are_the_float_ones_before_division(converted):
    """The DataModules' uint8 transforms give exactly the float pixels once divided by 255 (no resize quality lost):
    PIL resamples the decoded 8-bit image to 8 bit either way; checked on every odd mode of the awkward tree."""
    src, out, special, meta = converted
    for rel in ("cat/rgb0.jpg", "dog/rgb1.JPEG", special["gray"], special["cmyk"], special["rgba"]):
        with open(os.path.join(src, rel), "rb") as f:
            img = decode_image(f.read())
        for make in (eval_transform, train_transform):
            torch.manual_seed(5)
            as_uint8 = make(24, uint8=True)(img)  # [3, 24, 24]
            torch.manual_seed(5)  # same random crop and flip
            as_float = make(24)(img)
            assert as_uint8.dtype == torch.uint8 and as_uint8.shape == (3, 24, 24)
            assert torch.equal(to_float_images(as_uint8), as_float), (rel, make.__name__)
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_float_images(levels)), levels)  # lossless round trip of the 256 levels
    x = torch.tensor([-0.1, 0.0, 0.3 / 255, 0.7 / 255, 0.5, 1.0, 1.2])
    assert to_uint8(x).tolist() == [0, 0, 0, 1, 128, 255, 255]  # nearest level, clipped


def test_resume_rewrites_only_missing_shard(converted):
    src, out, special, meta = converted
    shards = expand_shards(meta["pattern"])
    before = {s: (os.stat(s).st_mtime_ns, open(s, "rb").read()) for s in shards}
    os.utime(shards[0], ns=(1, 1))  # make any rewrite of the kept shards visible
    kept_mtime = os.stat(shards[0]).st_mtime_ns
    os.remove(shards[2])
    meta2 = convert(src, out, "train", shard_size=3, quiet=True)
    assert meta2 == meta
    assert os.stat(shards[0]).st_mtime_ns == kept_mtime
    for s in (shards[1], shards[3]):
        assert os.stat(s).st_mtime_ns == before[s][0]
    for s in shards:
        assert open(s, "rb").read() == before[s][1]  # identical content, including the rewritten one
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_rerun_with_other_settings_refused(converted):
    src, out, special, meta = converted
    with pytest.raises(ValueError, match="different file list or settings"):
        convert(src, out, "train", shard_size=2, quiet=True)
    meta2 = convert(src, out, "train", shard_size=2, quiet=True, force=True)
    assert meta2["num_shards"] == 5 and meta2["num_samples"] == 9
    assert len([f for f in os.listdir(out) if f.endswith(".tar")]) == 5


def test_max_shard_bytes_and_cli(tmp_path, capsys):
    from data.convert_shards import main

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_awkward_tree(src)
    main(
        [
            "--src",
            src,
            "--out",
            out,
            "--split",
            "val",
            "--shard-size",
            "100",
            "--max-shard-bytes",
            "5k",
            "--workers",
            "2",
            "--quiet",
        ]
    )
    meta = json.load(open(os.path.join(out, "val-meta.json")))
    assert meta["num_shards"] > 1 and meta["num_samples"] == 9
