"""Checkpoints that survive kills, and resumes that refuse the wrong checkpoint or the wrong config.

- `AtomicCheckpointIO`: Lightning's checkpoint writer with the temp file beside the checkpoint instead of in
  `$TMPDIR` (`tokenizer/atomic.py` says why), and the temp files of killed writers removed on the next save.
- Reading checkpoints (named errors, the newest one that loads) is Lightning-free: `tokenizer/checkpoints.py`.
- `ArchitectureGuard`: a LightningModule mixin that records `architecture()` in every checkpoint and refuses to
  restore one whose architecture differs, listing the fields. Shapes alone do not catch every change: 4 -> 8
  heads keeps every weight's shape and silently computes another function.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from tokenizer.atomic import remove_stale_partials, torch_save
from tokenizer.checkpoints import CheckpointError

ARCHITECTURE_KEY = "architecture"


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


__all__ = ["AtomicCheckpointIO", "architecture_diff", "check_architecture", "ArchitectureGuard", "ARCHITECTURE_KEY"]
