"""Repo-local data pipelines (not installed; run scripts from the repo root).

Modules (imported explicitly, nothing heavy is imported here):

- ``data.transforms``: robust PIL decoding to RGB and the train/eval transforms.
- ``data.folder``: ``FolderDataModule`` over an ImageFolder-style tree.
- ``data.webdataset``: ``WebDatasetDataModule`` over webdataset tar shards (DDP-safe).
- ``data.convert_shards``: ImageFolder tree -> webdataset shards (``python -m data.convert_shards``).

Batch contract for every DataModule: ``(images, labels)`` with images float32 [B,3,H,W] in [0,1] and
labels int64 [B] (-1 where unknown).
"""
