"""Checkpoints that survive kills, and resumes that refuse the wrong checkpoint or the wrong config.

- `AtomicCheckpointIO`: Lightning's checkpoint writer with the temp file beside the checkpoint instead of in
  `$TMPDIR` (`tokenizer/atomic.py` says why), and the temp files of killed writers removed on the next save.
- `read_checkpoint` / `newest_loadable`: a checkpoint that cannot be read is named, with the reason, and
  `--ckpt_path last` falls back to the newest checkpoint that does load instead of failing on a 0-byte file.
- `ArchitectureGuard`: a LightningModule mixin that records `architecture()` in every checkpoint and refuses to
  restore one whose architecture differs, listing the fields. Shapes alone do not catch every change: 4 -> 8
  heads keeps every weight's shape and silently computes another function.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tokenizer.atomic import is_partial, remove_stale_partials, torch_save

ARCHITECTURE_KEY = "architecture"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or made by another architecture."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `path` through a temp file in its own directory, then renames (atomic on every filesystem)."""

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[str] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        directory = os.path.dirname(os.path.abspath(path))
        if directory not in self._cleaned:  # once per directory and run: leftovers of a killed earlier run
            remove_stale_partials(directory)
            self._cleaned.add(directory)
        torch_save(checkpoint, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint (memory-mapped, so cheap even for big files) or raise CheckpointError naming
    the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write was interrupted")
    try:
        # weights_only=False: Lightning checkpoints hold callback and hyperparameter objects, and resuming loads
        # them the same way; these are the run's own files.
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # zipfile, pickle, EOF and runtime errors all mean "not a whole checkpoint"
        raise CheckpointError(f"checkpoint {path} ({size} bytes) cannot be read, it is truncated or not a "
                              f"checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict / global_step)")
    return ckpt


def checkpoint_files(directories: list[str | os.PathLike], pattern: str = "*.ckpt") -> list[Path]:
    """Files matching `pattern` in `directories` (not recursive, no temp files), newest first; a `last*.ckpt`
    wins ties. `save_last="link"` makes last.ckpt a link to a periodic checkpoint: each file counts once."""
    found: dict[Path, Path] = {}
    for d in directories:
        for p in sorted(Path(d).glob(pattern)) if Path(d).is_dir() else ():
            if not is_partial(p.name) and p.is_file():
                found.setdefault(p.resolve(), p)
    return sorted(found.values(), key=lambda p: (p.stat().st_mtime, p.name.startswith("last")), reverse=True)


def newest_loadable(candidates: list[Path]) -> tuple[Path | None, list[str]]:
    """The first of `candidates` (newest first, see checkpoint_files) that loads, and one line per candidate
    before it that did not."""
    rejected = []
    for path in candidates:
        try:
            read_checkpoint(path)
        except CheckpointError as e:
            rejected.append(str(e))
            continue
        return path, rejected
    return None, rejected


def architecture_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per differing field: `name: checkpoint X, config Y`."""
    return [f"{k}: checkpoint {saved.get(k, '<absent>')!r}, config {current.get(k, '<absent>')!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k, "<absent>") != current.get(k, "<absent>")]


def check_architecture(checkpoint: dict[str, Any], current: dict[str, Any], source: str = "the checkpoint") -> None:
    """Raise CheckpointError when `checkpoint` records an architecture different from `current`."""
    saved = checkpoint.get(ARCHITECTURE_KEY)
    if saved is None:
        return  # written before architectures were recorded: the state-dict load still checks the shapes
    diff = architecture_diff(saved, current)
    if diff:
        raise CheckpointError(
            f"{source} was trained with another architecture than the config asks for; resume with the run's own "
            "config (its config.yaml) or start a new run. Differing fields:\n  " + "\n  ".join(diff))


class ArchitectureGuard:
    """Mixin for LightningModules (list it before LightningModule): subclasses define `architecture()`, a flat
    dict of everything that defines the computed function."""

    def architecture(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must define architecture()")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[ARCHITECTURE_KEY] = self.architecture()
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this before loading the state dict, so the mismatch is named before any shape error.
        check_architecture(checkpoint, self.architecture())
        super().on_load_checkpoint(checkpoint)


__all__ = ["AtomicCheckpointIO", "CheckpointError", "read_checkpoint", "checkpoint_files", "newest_loadable",
           "architecture_diff", "check_architecture", "ArchitectureGuard", "ARCHITECTURE_KEY"]
