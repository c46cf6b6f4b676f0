"""Lightning checkpoints, read without Lightning: named errors, the newest checkpoint that loads, and the tokenizer
inside one.

A checkpoint that cannot be read is named with the reason (empty after an interrupted write, truncated, not a
checkpoint), and `--ckpt_path last` (tokenizer/training/cli.py) falls back to the newest checkpoint that does load
instead of failing on a 0-byte file. Evaluation and export rebuild the tokenizer from a TokenizerModule
checkpoint with `tokenizer_from_checkpoint`, without importing Lightning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .atomic import is_partial
from .model import OneDTokenizer


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or made by another architecture."""


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
    return newest_first([p for d in directories if Path(d).is_dir() for p in sorted(Path(d).glob(pattern))
                         if not is_partial(p.name) and p.is_file()])


def newest_first(paths: list[Path]) -> list[Path]:
    """`paths` once each (by the file they resolve to), newest first by mtime; a `last*.ckpt` wins ties."""
    found: dict[Path, Path] = {}
    for p in paths:
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


def tokenizer_from_checkpoint(path: str | Path, use_ema: bool = True) -> OneDTokenizer:
    """Rebuild the tokenizer (EMA weights when present) from a Lightning checkpoint of TokenizerModule."""
    ckpt = read_checkpoint(path)  # names the file when it is empty, truncated or not a checkpoint
    hp = ckpt.get("hyper_parameters") or {}
    if "preset" not in hp:
        raise CheckpointError(f"{path} is not a TokenizerModule checkpoint (no tokenizer preset in its "
                              "hyper_parameters)")
    model = OneDTokenizer.from_preset(hp["preset"], **(hp.get("overrides") or {}))
    prefix = "ema_tokenizer." if use_ema and any(k.startswith("ema_tokenizer.") for k in ckpt["state_dict"]) \
        else "tokenizer."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict_strict(state, source=path)
    return model.eval()


__all__ = ["CheckpointError", "read_checkpoint", "checkpoint_files", "newest_first", "newest_loadable",
           "tokenizer_from_checkpoint"]
