"""``FolderDataModule``: an ImageFolder-style tree (``root/<class>/<image>``), train and val directories.

The tree is listed by ``walk_image_files`` (symlinks followed, no directory entered twice: a link loop can
neither repeat images nor relabel them). Unreadable files are skipped without a full pre-scan: the map-style
dataset returns a ``Skipped`` record for an image that cannot be decoded (or is a decompression bomb, or has an
extreme aspect ratio: ``tokenizer.images``), and ``SkipCorruptCollate`` drops those items from the batch (the batch
gets smaller, the number of batches per epoch does not change, so DDP ranks stay in step). Skips are counted, each
file once however many epochs meet it, in a shared-memory tally visible from the main process
(``FolderDataModule.num_skipped``, also sent to the trainer's loggers as ``data/skipped_images``) and each file is
logged once as a warning with the path, the reason and the running count. Two cases are errors instead of NaN losses: a
tree in which no file decodes (``setup`` probes for one readable image, before the first step) and a batch
in which every item was unreadable.

Class indices follow sorted class-folder names (same rule as ``data.convert_shards`` and torchvision's
ImageFolder), so a folder tree and the shards made from it give the same labels. Under DDP Lightning adds a
``DistributedSampler`` (equal number of batches per rank, padded with repeats like any map-style dataset).

The loaders yield uint8 images from persistent workers; ``on_after_batch_transfer`` converts them to float32 in
[0, 1] on the device (``data/loading.py``), so LightningModules receive ``(images float32, labels int64)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch

from data.datamodule import ImageDataModule
from data.loading import PREFETCH_FACTOR, check_one_batch
from data.skips import SkipCounter, Skipped
from data.transforms import train_transform
from tokenizer.images import IMAGE_EXTENSIONS, eval_transform, read_image, read_image_or_reason, walk_image_files

log = logging.getLogger(__name__)

# How many files check_readable tries before it calls a tree unreadable (a healthy tree stops at the first).
PROBE_LIMIT = 1000



def scan_image_folder(
    root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], list[tuple[str, int]]]:
    """Deterministic listing of an ImageFolder tree.

    Returns ``(classes, items)``: ``classes`` are the sorted names of the non-hidden sub-directories of
    ``root``; ``items`` are ``(relative_path, class_index)`` sorted by relative path: the image files below
    each class folder (``walk_image_files``: links followed, no directory twice, so a symlink loop neither
    repeats nor relabels images; files directly in ``root`` belong to no class and are left out).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"not a directory: {root}")
    classes = sorted(
        e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True) and not e.name.startswith(".")
    )
    if not classes:
        raise ValueError(f"{root}: no class sub-directories found (expected root/<class>/<image>)")
    index = {c: i for i, c in enumerate(classes)}
    items = [(rel, index[rel.split("/", 1)[0]]) for rel in walk_image_files(root, extensions)
             if "/" in rel and rel.split("/", 1)[0] in index]  # fmt: skip
    return classes, items


class ImageFolderDataset(torch.utils.data.Dataset):
    """Map-style dataset over ``scan_image_folder``: ``(image, label)``, or a ``Skipped`` record (path, reason)
    when the file is skipped (``tokenizer.images.read_image_or_reason``: unreadable, a decompression bomb, an
    extreme aspect ratio; counted once per file and logged by a ``SkipCounter`` sharing ``skipped_counter``)."""

    def __init__(self, root: str, transform: Callable | None = None, skipped_counter=None):
        self.root = root
        self.classes, self.items = scan_image_folder(root)
        self.transform = transform
        self.skips = SkipCounter(skipped_counter)  # a data.skips.SkipTally shared with the workers

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        rel, label = self.items[index]
        path = os.path.join(self.root, rel)
        img, why = read_image_or_reason(path)
        if img is None:
            self.skips(path, why)
            return Skipped(path, why)
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    def check_readable(self, max_tries: int = PROBE_LIMIT) -> None:
        """Raise before training when no image can be read: try the items in order until one decodes (the
        first, for a healthy tree). Without this, a tree of corrupt files trains on empty batches (NaN loss)."""
        if not self.items:
            raise ValueError(f"{self.root}: no image files below the class folders {self.classes}")
        for rel, _ in self.items[:max_tries]:
            if read_image(os.path.join(self.root, rel)) is not None:
                return
        tried = min(max_tries, len(self.items))
        raise ValueError(
            f"{self.root}: none of the {'first ' if tried < len(self.items) else ''}{tried} of {len(self.items)} "
            f"image files decodes (e.g. {os.path.join(self.root, self.items[0][0])}); check the files (corrupt "
            "downloads, wrong format) or point train_dir/val_dir at the right folder"
        )


class SkipCorruptCollate:
    """Collate that drops unreadable items (``Skipped`` records, or ``None``); returns ``(images [B,3,H,W],
    labels int64 [B])`` with B the readable ones, images in the transform's dtype. A batch in which *every*
    item was unreadable is an error naming the files (an empty batch would give a NaN loss); ``dtype`` and
    ``image_size`` are kept for callers that still pass them."""

    def __init__(self, image_size: int, dtype: torch.dtype = torch.uint8):
        self.image_size = image_size
        self.dtype = dtype

    def __call__(self, batch):
        good = [b for b in batch if b is not None and not isinstance(b, Skipped)]
        if not good:
            paths = [b.path for b in batch if isinstance(b, Skipped)]
            raise RuntimeError(
                f"every image of this batch of {len(batch)} is unreadable ({', '.join(paths[:5])}"
                f"{', ...' if len(paths) > 5 else ''}); remove or replace the corrupt files "
                "(python -m data.convert_shards lists every unreadable file in <split>-skipped.json)"
            )
        images = torch.stack([b[0] for b in good])
        labels = torch.as_tensor([int(b[1]) for b in good], dtype=torch.long)
        return images, labels


class FolderDataModule(ImageDataModule):
    """ImageFolder-style train/val directories -> ``(images, labels)`` batches (uint8 out of the loaders, float32
    in [0, 1] after ``on_after_batch_transfer``).

    Args:
        train_dir: root of the training tree (``train_dir/<class>/<image>``).
        val_dir: root of the validation tree (same class folder names), or None for no validation.
        image_size: output resolution (shorter side resized, then random/center crop).
        batch_size: per-device batch size.
        num_workers: DataLoader workers.
        drop_last: drop the last incomplete training batch.
        pin_memory: pin batches when they go to a CUDA device (the Trainer's, else when CUDA is available).
        prefetch_factor: batches in flight per worker.
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        image_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 4,
        drop_last: bool = True,
        pin_memory: bool = True,
        prefetch_factor: int = PREFETCH_FACTOR,
    ):
        super().__init__(image_size, batch_size, num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)
        self.train_dir, self.val_dir, self.drop_last = train_dir, val_dir, drop_last
        self.train_set: ImageFolderDataset | None = None
        self.val_set: ImageFolderDataset | None = None

    @property
    def classes(self) -> list[str]:
        if self.train_set is None:
            self.setup("fit")
        return self.train_set.classes

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            train_set = ImageFolderDataset(self.train_dir, train_transform(self.image_size, uint8=True),
                                           self.skip_counter())
            train_set.check_readable()  # before the first step: a tree of corrupt files is an error, not NaN
            self.train_set = train_set
        if self.val_dir is not None and self.val_set is None:
            self.val_set = ImageFolderDataset(self.val_dir, eval_transform(self.image_size, uint8=True),
                                              self.skip_counter())
            self.val_set.check_readable()
            if self.val_set.classes != self.train_set.classes:
                log.warning("val classes differ from train classes; labels follow each tree's sorted folders")

    def _loader(self, dataset, shuffle: bool, drop_last: bool):
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=SkipCorruptCollate(self.image_size),
            drop_last=drop_last,
            **self.loader_kwargs(),
        )

    def train_dataloader(self):
        self.setup("fit")
        if self.drop_last:
            check_one_batch(self, len(self.train_set), f"folder {self.train_dir}: image files",
                            "add images, or set drop_last false")
        return self._loader(self.train_set, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self):
        self.setup("validate")
        if self.val_set is None:
            return []
        return self._loader(self.val_set, shuffle=False, drop_last=False)
