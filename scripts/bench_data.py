"""Data pipeline throughput (images/s decoded + augmented) per DataLoader worker count.

Builds a temporary ImageFolder tree of JPEGs cut from the scikit-image photographs, converts it to
webdataset shards, then runs two epochs of the training loaders of ``WebDatasetDataModule`` and
``FolderDataModule`` at ``--image-size`` for each worker count and prints a table: images/s over epoch 1 (first
batch excluded), the dtype and bytes of one image batch as the loader yields it (with workers: what crossed the
worker -> main process boundary), and the seconds from ``iter()`` to the first batch of epoch 2 (worker
restart cost; near zero with persistent workers).

    PYTHONPATH=. python scripts/bench_data.py --workers 0 1 2 --images 512
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def skimage_photos() -> dict[str, np.ndarray]:
    from skimage import data

    photos = {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "hubble": data.hubble_deep_field(),
        "ihc": data.immunohistochemistry(),
        "retina": data.retina(),
        "motorcycle": data.stereo_motorcycle()[0],
        "camera": data.camera(),  # gray
    }
    return {k: v for k, v in photos.items() if v is not None}


def make_tree(root: str, n_images: int, seed: int = 0) -> None:
    """Random crops (40-100% of the shorter side), resized to ImageNet-like sizes (shorter side 256-500)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = skimage_photos()
    names = sorted(photos)
    for name in names:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(n_images):
        name = names[i % len(names)]
        img = photos[name]
        h, w = img.shape[:2]
        s = int(min(h, w) * rng.uniform(0.4, 1.0))
        ch, cw = s, min(w, int(s * rng.uniform(1.0, 1.5)))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(img[y : y + ch, x : x + cw])
        short = int(rng.integers(256, 501))
        crop = crop.resize((max(1, round(cw * short / ch)), short), Image.BICUBIC)
        crop.save(os.path.join(root, name, f"{name}_{i:05d}.jpg"), quality=90)


def time_epoch(loader) -> dict:
    """One full epoch: rate (images/s, first batch excluded), images counted, first-batch latency, batch layout."""
    n, start, t0, info = 0, time.perf_counter(), None, {}
    for batch in loader:
        images = batch[0]
        if t0 is None:  # exclude worker start-up and the first batch from the rate
            t0 = time.perf_counter()
            info = {"first_s": t0 - start, "dtype": str(images.dtype).replace("torch.", ""),
                    "bytes": images.element_size() * images.nelement(), "shape": tuple(images.shape)}
            continue
        n += len(images)
    return {**info, "rate": n / max(time.perf_counter() - t0, 1e-9), "n": n}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512, help="images in the temporary tree")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--measure", type=int, default=None, help="images per webdataset epoch (default: --images)")
    p.add_argument("--keep", default=None, help="build the tree/shards here and keep them")
    a = p.parse_args(argv)

    import torch

    from data.convert_shards import convert
    from data.folder import FolderDataModule
    from data.webdataset import WebDatasetDataModule

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory() if a.keep is None else None
    root = a.keep or tmp.name
    src, out = os.path.join(root, "tree"), os.path.join(root, "shards")
    t0 = time.perf_counter()
    if not os.path.isdir(src):
        make_tree(src, a.images)
    meta = convert(src, out, "train", shard_size=a.shard_size, quiet=True)
    print(
        f"tree + shards: {meta['num_samples']} JPEGs, {meta['num_shards']} shards "
        f"({time.perf_counter() - t0:.1f}s), image_size {a.image_size}, batch {a.batch_size}, "
        f"torch threads 1, {os.cpu_count()} CPUs"
    )
    measure = a.measure or a.images
    rows = []
    for nw in a.workers:
        wds_dm = WebDatasetDataModule(
            meta["pattern"],
            image_size=a.image_size,
            batch_size=a.batch_size,
            num_workers=nw,
            epoch_length=measure,
            shuffle_buffer=100,
            shard_mode="resampled",
            pin_memory=False,  # no GPU is fed here: measure the workers and the process boundary only
        )
        folder_dm = FolderDataModule(
            src, image_size=a.image_size, batch_size=a.batch_size, num_workers=nw, pin_memory=False
        )
        folder_dm.setup("fit")
        loaders = {"webdataset": wds_dm.train_dataloader(), "folder": folder_dm.train_dataloader()}
        for kind, loader in loaders.items():
            first, second = time_epoch(loader), time_epoch(loader)
            rows.append((kind, nw, first, second))
            print(
                f"  {kind:<10} workers={nw}: {first['rate']:7.1f} img/s ({first['n']} images), "
                f"{first['dtype']} {first['shape']} = {first['bytes']} bytes/batch, "
                f"epoch 2 first batch after {second['first_s']:.3f}s",
                flush=True,
            )
            del loader
    print()
    print("| pipeline   | workers | images/s | batch dtype | bytes/batch | epoch-2 first batch (s) |")
    print("|------------|--------:|---------:|-------------|------------:|------------------------:|")
    for kind, nw, first, second in rows:
        print(
            f"| {kind:<10} | {nw:>7} | {first['rate']:8.1f} | {first['dtype']:<11} | {first['bytes']:>11} "
            f"| {second['first_s']:>23.3f} |"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
