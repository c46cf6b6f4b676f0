"""Saving and loading a model directory: `config.json` + `model.safetensors`, atomic, strict and format-tagged.

One implementation for every model this project exports (the tokenizer and the AR generator):
- each file is written through a temp file in the directory and renamed (`tokenizer/atomic.py`);
- the weights carry the config in their own metadata, so a directory whose two files come from different saves
  (a kill between the two renames, or a hand copy) is refused instead of loading weights under the wrong config;
- loading names the file and the problem: missing file, invalid JSON, wrong format tag, no config object,
  missing / unexpected / mis-shaped weights, and weights that hold NaN or inf (a diverged training: such a model
  encodes every image to the same ids and decodes black images, with no error anywhere downstream).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_path, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_model_dir(directory: str | Path, model: nn.Module, config: dict[str, Any], format: str,
                   provenance: dict[str, Any] | None = None) -> Path:
    """Write `model`'s state dict and `config` (a JSON-able dict) to `directory`, tagged with `format`.
    `provenance` (how the weights were made: run, step, objective...) goes into config.json beside the config,
    for people and `onedtok info`; loading ignores it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config_text = json.dumps(config, sort_keys=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": format, "config": config_text})
    meta = {"format": format, "config": config}
    if provenance:
        meta["provenance"] = provenance
    write_json(directory / CONFIG_NAME, meta)
    return directory


def read_provenance(directory: str | Path) -> dict[str, Any]:
    """The `provenance` saved with the model ({} when there is none)."""
    meta = json.loads((Path(directory) / CONFIG_NAME).read_text())
    return meta.get("provenance") or {}


def weights_sha256(directory: str | Path) -> str:
    """SHA-256 of the weights file: what a token file records to name the tokenizer that made it."""
    import hashlib

    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS_NAME, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_model_config(directory: str | Path, format: str) -> dict[str, Any]:
    """The `config` object of `directory/config.json`, after checking both files exist and the format tag."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a saved model directory holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME} (written by save_pretrained)")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); save the model again with save_pretrained") from e
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != format:
        raise ValueError(f"{config_path}: format {found!r}, expected {format!r} (is this the right directory?)")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{config_path} has no 'config' object; save the model again with save_pretrained")
    return meta["config"]


def load_model_state(directory: str | Path, config: dict[str, Any],
                     map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The weights of `directory`, checked to come from the same save as `config` (read_model_config)."""
    from safetensors import SafetensorError, safe_open

    weights_path = Path(directory) / WEIGHTS_NAME
    try:
        with safe_open(str(weights_path), framework="pt", device=str(map_location)) as f:  # one open: both
            saved = (f.metadata() or {}).get("config")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path} cannot be read ({e}); it is truncated or not safetensors") from e
    if saved is not None and json.loads(saved) != json.loads(json.dumps(config)):
        raise ValueError(f"{weights_path} and {CONFIG_NAME} in {directory} come from different saves; "
                         "save the model again with save_pretrained")
    return state


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `state` that hold a NaN or an inf, in state-dict order."""
    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_weights(state: dict[str, torch.Tensor], source: object = "state dict") -> None:
    """Raise ValueError naming the first tensor of `state` that holds NaN/inf (and how many others do)."""
    bad = non_finite_tensors(state)
    if bad:
        more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
        raise ValueError(f"{source}: weight {bad[0]!r}{more} hold(s) NaN/inf values: these weights come from a "
                         "diverged training and compute nothing; retrain (lower lr, longer warmup, fp32) or export "
                         "from a checkpoint saved before the divergence")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: object = "state dict") -> None:
    """load_state_dict(strict=True) with one readable error for missing, unexpected or mis-shaped keys, and for
    weights that hold NaN/inf (check_finite_weights)."""
    check_state_matches(model, state, source)
    check_finite_weights(state, source)
    model.load_state_dict(state, strict=True)


def check_state_matches(model: nn.Module, state: dict[str, torch.Tensor], source: object = "state dict") -> None:
    """Raise ValueError when `state` has other keys or shapes than `model`'s state dict (values are not read, so
    `meta` tensors on either side work)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not match this {type(model).__name__}: missing keys {missing[:8]}, "
                         f"unexpected keys {unexpected[:8]}, shape mismatches {shapes[:8]}")


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_model_dir", "read_model_config", "load_model_state",
           "load_state_strict", "check_state_matches", "read_provenance", "weights_sha256", "non_finite_tensors",
           "check_finite_weights"]
