"""Images that cost more than their bytes (issue 25), with real files: PNGs of a few hundred bytes and an extreme
aspect ratio go through the transforms in bounded memory (peak RSS of a subprocess) and are refused as a named skip
by every reader; a decompression bomb has its own reason; a corrupt file is one skip however many epochs meet it.
Ordinary images keep torchvision's crops pixel for pixel, and the same RNG draws."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from _data_helpers import make_odd_images, make_plain_tree
from PIL import Image

from data.photos import load_photo
from data.skips import Skipped
from tokenizer.images import decode_error, eval_transform, read_image_or_reason
from tokenizer.square_crop import ShorterSideCrop, box_crop, resized_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")

# Applies both transforms at 64 and 256 px to the PNGs named in argv, every output checked (flat colour in, the same
# colour out); prints the peak RSS after the imports and at the end, in KiB. The data limit (what was mapped after
# the imports + 1 GiB) turns a transform that resizes the whole image (4.4 GB for 200000x1 at 64 px, ~52 GB at 256)
# into a MemoryError in this process instead of an out-of-memory kill of the machine.
CHILD = """
import resource, sys
import torch
from PIL import Image
from data.transforms import train_transform
from tokenizer.images import eval_transform
transforms = [(make(size, uint8=True), size) for make in (train_transform, eval_transform) for size in (64, 256)]
images = []
for path in sys.argv[1:]:
    with Image.open(path) as img:
        images.append(img.convert("RGB"))
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mapped = int(open("/proc/self/status").read().split("VmData:")[1].split()[0]) << 10
resource.setrlimit(resource.RLIMIT_DATA, (mapped + (1 << 30), resource.getrlimit(resource.RLIMIT_DATA)[1]))
colour = torch.tensor([200, 40, 40], dtype=torch.uint8)[:, None, None]
for img in images:
    for transform, size in transforms:
        out = transform(img)
        assert out.shape == (3, size, size) and torch.equal(out, colour.expand(3, size, size)), img.size
print(baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> dict[str, str]:
    return make_odd_images(str(tmp_path_factory.mktemp("odd")))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, RLIMIT_DATA, ru_maxrss in KiB: Linux")
def test_thin_pngs_go_through_the_transforms_in_bounded_memory(odd):
    """200000x1 and 20000x1 (and a 4000x300 panorama) at 64 and 256 px, training and evaluation crops, in one fresh
    process: its peak RSS stays within 2x what the imports alone cost (measured: +7 MB; before, 4.4 GB for
    200000x1 at 64 px and 5.9 GB for 20000x1 at 256 px, scripts/bench_image_memory.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    paths = [odd["thin"], odd["thin_short"], odd["wide"]]
    proc = subprocess.run([sys.executable, "-c", CHILD, *paths], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    baseline, peak = map(int, proc.stdout.split())
    assert peak < 2 * baseline, f"peak RSS {peak >> 10} MB, the imports alone {baseline >> 10} MB"


def _old_transform(size: int, random: bool):
    """The transforms as they were: torchvision's Resize of the whole image, then the crop."""
    from torchvision import transforms as T

    resize = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    if random:
        return T.Compose([resize, T.RandomCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])
    return T.Compose([resize, T.CenterCrop(size), T.PILToTensor()])


@pytest.mark.parametrize("width,height", [(64, 64), (65, 64), (37, 300), (300, 37), (640, 480), (4800, 300),
                                          (50, 800), (512, 512)])  # fmt: skip
def test_ordinary_images_keep_torchvisions_crops_and_draws(width, height):
    """Up to 16:1 (both limits included), the crops are the old ones pixel for pixel (noise, the hardest case for
    any resampling shortcut), and a seeded run draws the same positions and flips and leaves the RNG where the
    old transform left it."""
    from data.transforms import train_transform

    img = Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8))
    for size in (16, 64):
        assert torch.equal(eval_transform(size, uint8=True)(img), _old_transform(size, random=False)(img))
        runs = []
        for transform in (train_transform(size, uint8=True), _old_transform(size, random=True)):
            torch.manual_seed(0)
            runs.append(([transform(img) for _ in range(8)], torch.rand(1)))
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0])) and runs[0][1] == runs[1][1]


def test_random_crops_of_a_thin_image_draw_every_position_as_torchvision_does():
    """The random square of a 200000x1 image at 64 px is drawn over the 12,800,000x64 resized image's positions
    with torchvision's own draws (its get_params, on a zero-byte view of that size)."""
    from torchvision import transforms as T

    new_w, new_h = resized_size(200000, 1, 64)
    assert (new_w, new_h) == (12800000, 64)
    view = torch.empty(1, 1, 1).expand(1, new_h, new_w)
    torch.manual_seed(3)
    ours = [ShorterSideCrop(64, random=True).position(new_w, new_h) for _ in range(20)]
    torch.manual_seed(3)
    theirs = [T.RandomCrop.get_params(view, (64, 64))[:2] for _ in range(20)]
    assert ours == theirs and len({left for _, left in ours}) == 20


@pytest.mark.parametrize("width,height", [(2000, 20), (20, 2000)])
def test_beyond_16_to_1_the_box_crop_is_the_whole_resize_within_two_levels(width, height):
    """Past 16:1 only the square's source box is resampled; on a photograph it is the whole resize + crop within 2 of
    255 (measured on a scikit-image photograph squeezed to 2000x20 and 20x2000)."""
    photo = (load_photo("astronaut").permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(photo).resize((width, height), Image.Resampling.BICUBIC)
    size = 16
    new_w, new_h = resized_size(width, height, size)
    whole = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC)).astype(int)
    for i in range(11):
        top, left = (new_h - size) * i // 10, (new_w - size) * i // 10
        crop = np.asarray(box_crop(img, size, top, left)).astype(int)
        assert np.abs(crop - whole[top : top + size, left : left + size]).max() <= 2, (top, left)


def _odd_tree(root: str, odd: dict[str, str]) -> dict[str, str]:
    """root/odd/<the odd images, a corrupt JPEG>, root/plain/<3 JPEGs>: {name: path relative to root}."""
    make_plain_tree(root, 3, classes=("plain",), size=(40, 56))
    os.makedirs(os.path.join(root, "odd"))
    rel = {}
    for name, path in odd.items():
        rel[name] = f"odd/{os.path.basename(path)}"
        os.symlink(path, os.path.join(root, rel[name]))
    rel["corrupt"] = "odd/corrupt.jpg"
    good = open(os.path.join(root, "plain", "plain000.jpg"), "rb").read()
    with open(os.path.join(root, rel["corrupt"]), "wb") as f:
        f.write(good[: len(good) // 3])
    return rel


EXPECTED = {"thin": "extreme aspect ratio 200000x1 ", "thin_short": "extreme aspect ratio 20000x1 ",
            "bomb": "decompression bomb (", "corrupt": "unreadable image"}  # fmt: skip


def test_every_reader_skips_extreme_ratios_and_bombs_by_name(odd, tmp_path):
    """The readers of training (ImageFolderDataset), evaluation and extraction (FolderImages), shards
    (sample_image) and the converter (decode_error) give the same named reasons; the panorama is read."""
    from data.folder import ImageFolderDataset
    from data.sources import FolderImages
    from data.tar_shards import sample_image

    root = str(tmp_path / "tree")
    rel = _odd_tree(root, odd)
    train = ImageFolderDataset(root)  # no transform: what the reader returns
    listed = FolderImages(root, 16)
    for name, path in rel.items():
        full = os.path.join(root, path)
        with open(full, "rb") as f:
            data = f.read()
        item = train[train.items.index((path, train.classes.index("odd")))]  # (image, label) or Skipped
        item = item if isinstance(item, Skipped) else item[0]
        loaded = listed.load([k for k, _ in listed.items].index(path))
        reasons = [read_image_or_reason(full)[1], sample_image({"png": data})[1], getattr(item, "reason", ""),
                   getattr(loaded, "reason", ""), decode_error(data) or ""]  # fmt: skip
        if name == "wide":
            assert reasons == ["", "", "", "", ""] and item.size == (4000, 300) and loaded.shape == (3, 16, 16)
            continue
        assert isinstance(item, Skipped) and isinstance(loaded, Skipped), name
        assert all(r.startswith(EXPECTED[name]) for r in reasons), (name, reasons)


def test_convert_shards_refuses_extreme_ratios_and_bombs_by_name(odd, tmp_path):
    from data.convert_shards import convert

    src, out = str(tmp_path / "tree"), str(tmp_path / "shards")
    rel = _odd_tree(src, odd)
    meta = convert(src, out, "train", shard_size=4, quiet=True)
    skipped = {s["path"]: s["reason"] for s in json.load(open(os.path.join(out, "train-skipped.json")))}
    assert meta["num_skipped"] == 4 and meta["num_samples"] == 4  # 3 plain JPEGs + the panorama
    assert sorted(skipped) == sorted(rel[n] for n in EXPECTED)
    for name, start in EXPECTED.items():
        assert skipped[rel[name]].startswith(start), (name, skipped[rel[name]])


def _shards_with_one_corrupt_sample(tmp_path) -> str:
    """Two shards of 4 samples; the first holds one corrupt JPEG (a converter would not write it: made by hand)."""
    make_plain_tree(str(tmp_path / "src"), 4, classes=("a", "b"), size=(40, 40))
    files = sorted((tmp_path / "src").rglob("*.jpg"))
    for j in range(2):
        with tarfile.open(tmp_path / f"s-{j}.tar", "w") as tar:
            for i, path in enumerate(files[4 * j : 4 * j + 4]):
                data = path.read_bytes()
                if (j, i) == (0, 1):
                    data = data[: len(data) // 3]
                for ext, payload in (("jpg", data), ("cls", b"0")):
                    info = tarfile.TarInfo(f"s{j}{i}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, __import__("io").BytesIO(payload))
    return str(tmp_path / "s-{0..1}.tar")


@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_a_corrupt_file_is_one_skip_however_many_epochs_meet_it(source, tmp_path):
    """Two epochs (and, for shards, several passes over them per epoch) with two workers, which shuffle which worker
    meets the file: the DataModule counts it once (the old count: one per visit, '2 unreadable images')."""
    from data.folder import FolderDataModule
    from data.webdataset import WebDatasetDataModule

    if source == "folder":
        make_plain_tree(str(tmp_path / "src"), 4, classes=("a", "b"), size=(40, 40))
        good = (tmp_path / "src" / "a" / "a000.jpg").read_bytes()
        (tmp_path / "src" / "a" / "cut.jpg").write_bytes(good[: len(good) // 3])
        dm = FolderDataModule(str(tmp_path / "src"), image_size=16, batch_size=3, num_workers=2, drop_last=False)
        dm.setup("fit")
    else:
        dm = WebDatasetDataModule(_shards_with_one_corrupt_sample(tmp_path), image_size=16, batch_size=2,
                                  num_workers=2, shard_mode="split", epoch_length=16, shuffle_buffer=1)  # fmt: skip
    loader = dm.train_dataloader()
    for _ in range(2):
        assert sum(len(batch[0]) for batch in loader) > 0
    assert dm.num_skipped == 1
