"""The embedded default data source: photographs that ship inside the scikit-image wheel (nothing downloaded).

Train and validation come from *different* photographs, so validation measures generalisation, not memory:
- train: random crops (random scale, random position, horizontal flip, optional per-channel colour jitter) from
  the TRAIN_IMAGES;
- val: fixed crops (evenly spaced positions at three scales, scale-major) from the held-out VAL_IMAGES.
`stereo_motorcycle` is a near-identical left/right pair: both halves are in train, never split across sets.

Batches follow the project's contract: (images float32 [B, 3, S, S] in [0, 1], labels int64 [B]); the label is
the index of the source photograph in ALL_IMAGES (usable as a class for the generator demo). The loaders themselves
yield uint8 images (the crops are made in float and rounded once, at the end) and the DataModule's
`on_after_batch_transfer` makes them float on the device (see data/loading.py); `val_batch()` returns float.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data.datamodule import ImageDataModule
from data.loading import check_one_batch, loader_kwargs
from data.transforms import to_float_images
from tokenizer.metrics import to_uint8

TRAIN_IMAGES = (
    "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "motorcycle_left", "motorcycle_right", "camera", "coins", "moon", "brick", "grass", "gravel", "cell",
)  # fmt: skip
VAL_IMAGES = ("chelsea", "coffee")
VAL_SCALES = (1.0, 2.0, 3.0)  # held-out crop scales: 1 = the whole photo's shorter side, 2 and 3 closer views
ALL_IMAGES = TRAIN_IMAGES + VAL_IMAGES


def load_photo(name: str) -> torch.Tensor:
    """A scikit-image photograph as float32 [3, H, W] in [0, 1] (grayscale replicated to RGB)."""
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        array = left if name.endswith("left") else right
    else:
        array = getattr(skimage.data, name)()
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    image = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float() / 255.0
    return image


def resize_shorter_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] -> [3, H', W'] with min(H', W') == size (antialiased bilinear)."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    return F.interpolate(image[None], size=new, mode="bilinear", antialias=True, align_corners=False)[0]


class RandomCrops(Dataset):
    """`length` random crops from a pyramid of the source photos (scales precomputed once).

    color_jitter s > 0: each crop's channels get an independent gain in [1-s, 1+s] and offset in [-s/2, s/2]
    (then clipped to [0, 1]). Half the photos are grayscale and the held-out ones are colour; without it a small
    model sees too few colours to reconstruct unseen ones.

    Items are (crop float32 [3, S, S] in [0, 1], label), or with uint8=True (crop uint8 [3, S, S], label): the
    same float crop (pyramid resized in float, jitter in float) rounded once at the end, so the two differ by at
    most 0.5/255 for the same random draws.
    """

    def __init__(self, photos: list[torch.Tensor], labels: list[int], image_size: int, length: int,
                 scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0), color_jitter: float = 0.0,
                 uint8: bool = False):
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        self.image_size, self.length, self.labels = image_size, length, labels
        self.color_jitter, self.uint8 = color_jitter, uint8
        # pyramid[i][j]: photo i with its shorter side at scales[j] * image_size (never upsampled past source)
        self.pyramid = [
            [resize_shorter_side(p, min(int(s * image_size), min(p.shape[-2:]))) for s in scales] for p in photos
        ]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        photo = int(torch.randint(len(self.pyramid), ()))
        levels = self.pyramid[photo]
        image = levels[int(torch.randint(len(levels), ()))]
        h, w = image.shape[-2:]
        top = int(torch.randint(h - self.image_size + 1, ()))
        left = int(torch.randint(w - self.image_size + 1, ()))
        crop = image[:, top : top + self.image_size, left : left + self.image_size]
        if torch.rand(()) < 0.5:
            crop = crop.flip(-1)
        if self.color_jitter > 0:
            s = self.color_jitter
            gain = 1 + s * (2 * torch.rand(3, 1, 1) - 1)  # [3, 1, 1]
            offset = s * (torch.rand(3, 1, 1) - 0.5)
            crop = (crop * gain + offset).clamp(0, 1)
        return (to_uint8(crop) if self.uint8 else crop.contiguous()), self.labels[photo]


def fixed_crops(photo: torch.Tensor, image_size: int, per_scale: int, scales=(1.0, 2.0, 3.0)) -> list[torch.Tensor]:
    """Deterministic crops: at each scale, `per_scale` crops evenly spaced along the photo's long side
    (and centred on the short side)."""
    crops = []
    for s in scales:
        image = resize_shorter_side(photo, min(int(s * image_size), min(photo.shape[-2:])))
        h, w = image.shape[-2:]
        spread = [i / max(per_scale - 1, 1) for i in range(per_scale)]  # 0 .. 1 along the long side
        if h > w:
            rows, cols = [round(f * (h - image_size)) for f in spread], [(w - image_size) // 2] * per_scale
        else:
            rows, cols = [(h - image_size) // 2] * per_scale, [round(f * (w - image_size)) for f in spread]
        for top, left in zip(rows, cols):
            crops.append(image[:, top : top + image_size, left : left + image_size].contiguous())
    return crops


class FixedCrops(Dataset):
    """Precomputed (crop, label) pairs, returned as given (the DataModule stores uint8 crops)."""

    def __init__(self, crops: list[torch.Tensor], labels: list[int]):
        self.crops, self.labels = crops, labels

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int):
        return self.crops[index], self.labels[index]


class PhotosDataModule(ImageDataModule):
    """Random training crops and fixed held-out crops of scikit-image's bundled photographs.

    Both loaders yield (images uint8 [B, 3, S, S], labels int64 [B]); `on_after_batch_transfer` hands the model
    float32 in [0, 1]. pin_memory: pin batches when they go to a CUDA device (see data/loading.py).
    """

    def __init__(self, image_size: int = 64, batch_size: int = 32, num_workers: int = 0,
                 train_crops_per_epoch: int = 4096, val_crops_per_scale: int = 4, color_jitter: float = 0.0,
                 pin_memory: bool = True):
        super().__init__(image_size, batch_size, num_workers, pin_memory=pin_memory)
        self.color_jitter = color_jitter
        self.train_crops_per_epoch = train_crops_per_epoch
        self.val_crops_per_scale = val_crops_per_scale
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            photos = [load_photo(n) for n in TRAIN_IMAGES]
            self.train_set = RandomCrops(photos, list(range(len(TRAIN_IMAGES))), self.image_size,
                                         self.train_crops_per_epoch, color_jitter=self.color_jitter, uint8=True)
        if self.val_set is None:
            crops, labels = [], []
            photos = [load_photo(name) for name in VAL_IMAGES]
            # scale-major order: the first crops (those the report's reconstruction grid shows) are every photo
            # seen whole (scale 1: its shorter side is the crop size), then the closer views
            for scale in VAL_SCALES:
                for i, photo in enumerate(photos):
                    c = fixed_crops(photo, self.image_size, self.val_crops_per_scale, scales=(scale,))
                    # rounded to uint8 like the training crops (and like the JPEG pixels of the real datasets)
                    crops += [to_uint8(x) for x in c]
                    labels += [len(TRAIN_IMAGES) + i] * len(c)
            self.val_set = FixedCrops(crops, labels)

    def train_dataloader(self) -> DataLoader:
        check_one_batch(self, len(self.train_set), "photos: train_crops_per_epoch random crops",
                        "raise train_crops_per_epoch")
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, drop_last=True,
                          **self.loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        # in-memory crops: workers would only add IPC
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False,
                          **loader_kwargs(0, pin_memory=self.pin_memory, trainer=self.trainer))

    def val_batch(self, max_images: int | None = None) -> torch.Tensor:
        """All (or the first `max_images`) held-out crops as one float32 tensor [N, 3, S, S] in [0, 1] (exactly
        what validation steps receive)."""
        self.setup()
        n = len(self.val_set) if max_images is None else min(max_images, len(self.val_set))
        return to_float_images(torch.stack([self.val_set[i][0] for i in range(n)]))
