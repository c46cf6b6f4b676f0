"""Data-side faults and bad input (issue 13), each reproduced with real files: symlink loops, a truncated shard
without meta.json, a non-UTF-8 file name, damaged token shards, a data set of corrupt images, and skipped
records counted from the readers to meta.json, the reconstruction report and the training logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import traceback

import numpy as np
import pytest
import torch
from _data_helpers import make_awkward_tree, make_plain_tree
from _small_training import TinyModule, quiet_trainer
from _weights_probe import needs_lpips

from data.skips import SkipCounter
from data.tokens import TokenShardError, TokenShardWriter, load_token_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(code: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """Python code in a fresh process, killed after `timeout` s (a walk without end must fail, not hang)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    try:
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish in {timeout} s (a directory walk without end?)")


# ------------------------------------------------------------------------------------------ 1. symlink loops
def test_symlink_loops_list_each_image_once_with_its_own_label(tmp_path):
    """cat_b/loop -> .. (back to the root), two `.` links in cat_a (a walk that follows links without a visited
    set branches without end), and cat_a/peek -> ../cat_b (must not relabel cat_b's photos as cat_a)."""
    root = tmp_path / "tree"
    make_plain_tree(str(root), 3, classes=("cat_a", "cat_b"))
    os.symlink("..", root / "cat_b" / "loop")
    os.symlink(".", root / "cat_a" / "here")
    os.symlink(".", root / "cat_a" / "again")
    os.symlink("../cat_b", root / "cat_a" / "peek")
    # in a child process: the old walk (os.walk(followlinks=True), no visited set) never ends on this tree
    code = f"""
import json
from data.folder import scan_image_folder
from eval.sources import make_source
classes, items = scan_image_folder({str(root)!r})  # training, data.convert_shards, extraction
_, total, _ = make_source("folder", 16, root={str(root)!r})  # evaluation
print(json.dumps({{"classes": classes, "items": items, "eval": total}}))
"""
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    files = [f"cat_a/cat_a{i:03d}.jpg" for i in range(3)] + [f"cat_b/cat_b{i:03d}.jpg" for i in range(3)]
    assert got["classes"] == ["cat_a", "cat_b"]
    assert got["items"] == [[f, 0 if f.startswith("cat_a/") else 1] for f in files]  # exact: 6 items, own labels
    assert got["eval"] == 6

    from tokenizer.images import walk_image_files

    assert walk_image_files(str(root)) == files


def test_one_directory_behind_two_different_links_is_listed_once_under_the_first_path(tmp_path):
    """Two *different* symlinks to one directory (issue 22): its files are listed once, under the path that
    reaches it first in the breadth-first walk (shallowest, then sorted), whatever order the links sort in.
    A visited set keyed on the link instead of the directory it resolves to lists them twice, once per label."""
    outside = tmp_path / "outside"  # the shared directories live outside the tree: only links reach them
    make_plain_tree(str(outside), 2, classes=("pets", "birds", "dogs"))
    make_plain_tree(str(outside / "pets"), 1, classes=("puppies",))  # a real sub-directory of a shared one
    root = tmp_path / "tree"
    make_plain_tree(str(root), 1, classes=("cat_a", "cat_b"))
    os.symlink("../../outside/pets", root / "cat_a" / "pets")  # same depth: cat_a/pets sorts first and claims
    os.symlink("../../outside/pets", root / "cat_b" / "pets")
    os.makedirs(root / "cat_a" / "deep")
    os.symlink("../../../outside/birds", root / "cat_a" / "deep" / "birds")  # sorts first, but one level deeper
    os.symlink("../../outside/birds", root / "cat_b" / "birds")  # shallower: claims birds for cat_b
    os.symlink("../outside/dogs", root / "dog")  # two class folders that are links to one directory
    os.symlink("../outside/dogs", root / "hound")

    from data.folder import scan_image_folder
    from eval.sources import make_source
    from tokenizer.images import walk_image_files

    files = ["cat_a/cat_a000.jpg", "cat_a/pets/pets000.jpg", "cat_a/pets/pets001.jpg",
             "cat_a/pets/puppies/puppies000.jpg", "cat_b/birds/birds000.jpg", "cat_b/birds/birds001.jpg",
             "cat_b/cat_b000.jpg", "dog/dogs000.jpg", "dog/dogs001.jpg"]  # fmt: skip
    assert walk_image_files(str(root)) == files
    classes, items = scan_image_folder(str(root))
    assert classes == ["cat_a", "cat_b", "dog", "hound"]  # hound is a class folder; its images are dog's
    assert items == [(f, classes.index(f.split("/")[0])) for f in files]
    _, total, _ = make_source("folder", 16, root=str(root))  # evaluation lists the same 9 images
    assert total == len(files)


# ------------------------------------------------------------------------------ 4. truncated shard, no meta
@pytest.fixture()
def truncated_shards(tmp_path):
    """Two real shards of 6 samples from data.convert_shards, the second cut off in the middle of a member and
    the converter's meta.json removed (a copy that died)."""
    from data.convert_shards import convert

    make_plain_tree(str(tmp_path / "src"), 4, classes=("a", "b", "c"), size=(40, 48))
    out = str(tmp_path / "shards")
    convert(str(tmp_path / "src"), out, "train", shard_size=6, shuffle=False, quiet=True)
    os.remove(os.path.join(out, "train-meta.json"))
    damaged = os.path.join(out, "train-000001.tar")
    with tarfile.open(damaged) as tar:  # cut 100 bytes into the data of the 4th image member
        member = [m for m in tar if m.name.endswith(".jpg")][3]
    os.truncate(damaged, member.offset_data + 100)
    return os.path.join(out, "train-{000000..000001}.tar"), damaged


def test_truncated_shard_without_meta_is_skipped_and_named(truncated_shards, caplog):
    from data.tar_shards import expand_shards, shard_sample_counts

    pattern, damaged = truncated_shards
    urls = expand_shards(pattern)
    with caplog.at_level("WARNING"):
        counts = shard_sample_counts(urls)  # the old reader: tarfile.ReadError, naming no shard
    from data.tar_shards import iter_shard

    assert counts == [6, 3]  # the damaged shard: its 3 complete samples before the cut
    assert any(damaged in r.getMessage() for r in caplog.records)
    skips = SkipCounter()
    samples = list(iter_shard(damaged, skips))
    assert [s["__key__"] for s in samples] == ["b_b002", "b_b003", "c_c000"]  # all complete before the cut
    assert all("jpg" in s and "cls" in s for s in samples)
    assert skips.total == 1 and skips.listed[0]["path"] == damaged and "damaged" in skips.listed[0]["reason"]


def test_truncated_shard_trains_and_evaluates(truncated_shards, caplog):
    from data.webdataset import WebDatasetDataModule
    from eval.sources import make_source

    pattern, damaged = truncated_shards
    dm = WebDatasetDataModule(pattern, pattern, image_size=16, batch_size=3, num_workers=0, shard_mode="resampled",
                              shuffle_buffer=1)  # fmt: skip
    with caplog.at_level("WARNING"):
        train = list(dm.train_dataloader())  # 9 samples / 3 per batch
        val = list(dm.val_dataloader())
    assert len(train) == 3 and all(b[0].shape == (3, 3, 16, 16) for b in train)
    assert sum(len(b[0]) for b in val) == 9 and dm.num_skipped >= 1
    assert any(damaged in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)

    loader, total, _ = make_source("webdataset", 16, shards=pattern, batch_size=4)
    index = torch.cat([i for i, _ in loader])
    assert total == 9 and sorted(index.tolist()) == list(range(9))
    report = loader.skips.report()
    assert report["count"] == 1 and report["paths"][0]["path"] == damaged


# ------------------------------------------------------------------------------------- 5. non-UTF-8 names
def test_non_utf8_file_name_through_extraction_and_generator_training(tok_dir, tmp_path):
    from data.extract_tokens import main as extract_main
    from data.tokens import TokenDataModule, split_by_key
    from tokenizer.generator.lightning import GeneratorModule

    src = tmp_path / "src"
    make_plain_tree(str(src), 4, classes=("a", "b"), size=(64, 64))
    good = (src / "a" / "a000.jpg").read_bytes()
    with open(os.path.join(os.fsencode(src), b"a", b"caf\xff.jpg"), "wb") as f:  # byte 0xff: not UTF-8
        f.write(good)
    out = str(tmp_path / "tokens")
    extract_main(["--tokenizer", tok_dir, "--out", out, "--source", "folder", "--root", str(src),
                  "--batch-size", "4", "--cpu", "--no-progress"])  # fmt: skip
    ids, labels, keys, _, meta = load_token_records(out)
    assert len(keys) == 9 and "a/caf\udcff.jpg" in keys.tolist()  # stored surrogate-escaped
    split_by_key(keys, 0.3)  # the old split_by_key: UnicodeEncodeError

    dm = TokenDataModule(out, batch_size=4, val_fraction=0.3)
    module = GeneratorModule(overrides=dict(vocab_size=meta["codebook_size"], max_tokens=meta["num_tokens"],
                                            num_classes=2, dim=32, depth=1, heads=2),
                             warmup_steps=1, num_val_samples=0)  # fmt: skip
    trainer = quiet_trainer(max_steps=2, devices=1, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2


# ------------------------------------------------------------------------------------ 6. damaged token shards
def _token_shards(root: str, codebook_size: int = 100) -> list[str]:
    rng = np.random.default_rng(0)
    with TokenShardWriter(root, num_tokens=8, codebook_size=codebook_size, shard_size=10) as w:
        w.write(rng.integers(0, codebook_size, (20, 8)), np.zeros(20, np.int64), [f"k{i}" for i in range(20)])
    return sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".npz"))


def _full_text(excinfo) -> str:
    """The message and every chained traceback a user would see."""
    return "".join(traceback.format_exception(excinfo.value))


@pytest.mark.parametrize("damage", ["truncated", "random_bytes"])
def test_damaged_token_shard_error_names_the_file(tmp_path, damage):
    root = str(tmp_path / "tok")
    shard = _token_shards(root)[1]
    if damage == "truncated":
        os.truncate(shard, os.path.getsize(shard) // 2)  # old: BadZipFile / EOFError, no file name
    else:
        with open(shard, "wb") as f:  # old: numpy's advice to load with allow_pickle=True
            f.write(np.random.default_rng(1).bytes(4096))
    with pytest.raises(TokenShardError) as err:
        load_token_records(root)
    text = _full_text(err)
    assert shard in str(err.value) and "re-run" in str(err.value) and "delete" in str(err.value)
    assert "allow_pickle" not in text


def test_out_of_range_token_ids_rejected_at_load(tmp_path):
    root = str(tmp_path / "tok")
    shards = _token_shards(root, codebook_size=1000)  # int16 ids in [0, 1000)
    meta = json.load(open(os.path.join(root, "meta.json")))
    meta["codebook_size"] = 100  # the shards now hold ids outside the codebook meta.json describes
    json.dump(meta, open(os.path.join(root, "meta.json"), "w"))
    with pytest.raises(TokenShardError, match=r"ids in \[\d+, \d+\], outside the codebook \[0, 100\)") as err:
        load_token_records(root)
    assert shards[0] in str(err.value)
    # negative ids, written by hand (the writer refuses them)
    root2 = str(tmp_path / "tok2")
    shard = _token_shards(root2)[0]
    with open(shard, "wb") as f:
        np.savez(f, ids=np.full((10, 8), -3, np.int16), labels=np.zeros(10, np.int64),
                 keys=np.array([f"k{i}" for i in range(10)]))  # fmt: skip
    with pytest.raises(TokenShardError, match=r"\[-3, -3\]"):
        load_token_records(root2)


# -------------------------------------------------------------------------------- 9e. nothing readable
def _corrupt_tree(root, n: int = 4) -> None:
    for cls in ("a", "b"):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(n):
            with open(os.path.join(root, cls, f"{i}.jpg"), "wb") as f:
                f.write(b"\xff\xd8\xff\xe0 not really a jpeg " + bytes([i]) * 100)


def test_all_corrupt_folder_is_an_error_before_the_first_step(tmp_path):
    from data.folder import FolderDataModule

    root = str(tmp_path / "corrupt")
    _corrupt_tree(root)
    model = TinyModule()  # on an empty batch its loss would be NaN
    dm = FolderDataModule(root, image_size=16, batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="none of the 8 of 8 image files decodes") as err:
        quiet_trainer(max_steps=2).fit(model, datamodule=dm)
    assert root in str(err.value) and model.batch_sizes == []


def test_batch_of_only_unreadable_images_is_an_error(tmp_path):
    from data.folder import ImageFolderDataset, SkipCorruptCollate
    from data.transforms import train_transform

    root = str(tmp_path / "tree")
    make_awkward_tree(root)
    ds = ImageFolderDataset(root, train_transform(16, uint8=True))
    bad = next(i for i, (rel, _) in enumerate(ds.items) if rel == "dog/corrupt.jpg")
    with pytest.raises(RuntimeError, match="every image of this batch of 2 is unreadable.*corrupt.jpg"):
        SkipCorruptCollate(16)([ds[bad], ds[bad]])  # old: empty tensors [0, 3, 16, 16], a NaN loss
    images, labels = SkipCorruptCollate(16)([ds[bad], ds[0]])
    assert images.shape == (1, 3, 16, 16) and labels.tolist() == [ds.items[0][1]]


def test_shards_without_a_readable_image_are_an_error(tmp_path):
    from data.webdataset import WebDatasetDataModule

    pattern = str(tmp_path / "bad-{0..1}.tar")
    for j in range(2):
        with tarfile.open(str(tmp_path / f"bad-{j}.tar"), "w") as tar:
            for i in range(3):
                for ext, data in (("jpg", b"\xff\xd8\xff not a jpeg"), ("cls", b"0")):
                    info = tarfile.TarInfo(f"s{j}{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, __import__("io").BytesIO(data))
    for mode in ("split", "resampled"):  # old: an endless loop of warnings (the test would hang)
        dm = WebDatasetDataModule(pattern, image_size=16, batch_size=2, num_workers=0, shard_mode=mode)
        with pytest.raises(ValueError, match="none of the 2 shard"):
            dm.train_dataloader()


# ------------------------------------------------------------------ 9a. skipped records counted end to end
def test_skip_reports_of_several_processes_add_up():
    """merge_reports (extraction's meta.json, the reconstruction report's gather_skips): the counts of unequal
    processes are added, the paths concatenated in process order and capped; the count is never the list length."""
    from data.skips import merge_reports

    counters = [SkipCounter(max_listed=2), SkipCounter(max_listed=2), SkipCounter(max_listed=2)]
    for process, n in enumerate((3, 1, 0)):  # the first process lists 2 of its 3 skips
        for i in range(n):
            counters[process](f"p{process}/{i}.jpg", "unreadable image")
    merged = merge_reports([c.report() for c in counters])
    assert merged["count"] == 4, merged  # 3 + 1 + 0
    assert [p["path"] for p in merged["paths"]] == ["p0/0.jpg", "p0/1.jpg", "p1/0.jpg"]
    capped = merge_reports([c.report() for c in counters], max_listed=1)
    assert capped == {"count": 4, "paths": [{"path": "p0/0.jpg", "reason": "unreadable image"}]}
    assert merge_reports([]) == {"count": 0, "paths": []}


def test_extraction_meta_counts_skipped_images_with_paths(tok_dir, tmp_path, caplog):
    from data.extract_tokens import main as extract_main
    from data.tokens import read_meta

    src = str(tmp_path / "src")
    special = make_awkward_tree(src)
    out = str(tmp_path / "tokens")
    with caplog.at_level("WARNING"):
        extract_main(["--tokenizer", tok_dir, "--out", out, "--source", "folder", "--root", src,
                      "--batch-size", "4", "--num-workers", "1", "--cpu", "--no-progress"])  # fmt: skip
    meta = read_meta(out)
    assert meta["num_records"] == 9 and meta["skipped"]["count"] == 1
    assert meta["skipped"]["paths"][0]["path"] == os.path.join(src, special["corrupt"])
    assert not any("-1 skipped" in r.getMessage() for r in caplog.records)
    assert any("corrupt.jpg" in r.getMessage() and "1 skipped so far" in r.getMessage() for r in caplog.records)


def test_training_logs_the_skip_count(tmp_path):
    """The small tokenizer trains one epoch on 9 readable and 3 corrupt files (one worker process, which counts
    in shared memory): the loggers get data/skipped_images = 3, the number of files skipped, not just the name."""
    import csv

    from _small_training import SMALL
    from lightning.pytorch.loggers import CSVLogger

    from data.folder import FolderDataModule
    from tokenizer.training import TokenizerModule

    src = tmp_path / "src"
    make_plain_tree(str(src), 3, classes=("a", "b", "c"), size=(40, 40))
    good = (src / "a" / "a000.jpg").read_bytes()
    corrupt = ["a/cut.jpg", "b/cut.jpg", "c/cut.jpg"]
    for rel in corrupt:  # truncated JPEGs: the header decodes, the pixels do not
        (src / rel).write_bytes(good[: len(good) // 3])
    # 12 files in batches of 4: 3 steps, and no batch can be all corrupt (that is an error, tested above)
    dm = FolderDataModule(str(src), image_size=32, batch_size=4, num_workers=1, drop_last=False)
    torch.manual_seed(0)
    module = TokenizerModule(preset="tiny", overrides=SMALL, warmup_steps=1, export_dir=str(tmp_path / "export"))
    trainer = quiet_trainer(max_epochs=1, logger=CSVLogger(str(tmp_path / "logs")), default_root_dir=str(tmp_path),
                            limit_val_batches=0, log_every_n_steps=1)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3 and dm.num_skipped == len(corrupt)
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv"), newline="") as f:
        logged = [float(row["data/skipped_images"]) for row in csv.DictReader(f) if row.get("data/skipped_images")]
    assert logged, "data/skipped_images never reached the logger"
    assert logged == sorted(logged) and logged[-1] == len(corrupt), logged  # the running count, ending at 3


@needs_lpips
def test_reconstruction_report_counts_skipped_images(tok_dir, tmp_path):
    src = str(tmp_path / "src")
    special = make_awkward_tree(src)
    out = tmp_path / "report"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "eval.reconstruction", "--tokenizer", tok_dir, "--source", "folder",
                           "--root", src, "--num-tokens", "4", "--no-fid", "--codecs", "--num-workers", "1",
                           "--cpu", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    path = os.path.join(src, special["corrupt"])
    assert meta["num_images"] == 9 and meta["skipped"] == {"count": 1, "paths": [
        {"path": path, "reason": "unreadable image"}]}
    assert f"Skipped: 1 record(s), e.g. {path} (unreadable image)" in (out / "metrics.md").read_text()
    assert not [p for p in os.listdir(out) if ".partial-" in p]  # every file renamed into place
