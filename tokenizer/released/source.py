"""Reading a released checkpoint: a local snapshot folder, a single weights file, or a Hugging Face hub id.

    snapshot = read_snapshot("path/to/folder")        # model.safetensors (or pytorch_model.bin) + config.json
    snapshot = read_snapshot("yucornetto/tokenizer_titok_l32_imagenet")   # fetched with huggingface_hub

`.bin`/`.pt` files are read with `torch.load(weights_only=True)`: a pickle can run code, a weights-only load
cannot. A hub id is fetched only where the network allows it; HF_HUB_OFFLINE=1 is respected (the local cache
only), and a failed fetch says how to convert from a downloaded folder instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Snapshot:
    source: str  # what the user named: a folder, a file or a hub id
    weights_path: Path
    state: dict[str, torch.Tensor]
    config: dict | None  # the reference config.json, None when the snapshot has none
    revision: str | None = None  # the hub commit, for a hub id
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256 of every file read


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors or torch file, with an error naming the file if it cannot be read."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip all raise their own types for a truncated file
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); it is truncated or not a weights "
                         "file: download it again") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (found {type(state).__name__})")
    return state


def _fetch(hub_id: str) -> tuple[Path, str | None]:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ValueError(f"{hub_id!r} is not a local folder or file, and huggingface_hub is not installed to fetch "
                         "it: `pip install huggingface_hub`, or download the snapshot and pass its folder") from e
    try:
        folder = Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:  # offline, unknown repo, no network: all end the same way for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(e).__name__}: {e}"
        raise ValueError(f"cannot fetch {hub_id!r} from the Hugging Face hub ({why}); download it where the network "
                         "allows (huggingface-cli download ...) and pass the folder instead") from e
    return folder, folder.name if folder.parent.name == "snapshots" else None


def read_snapshot(source: str) -> Snapshot:
    """The checkpoint named by `source` (see the module docstring)."""
    path, revision = Path(source), None
    if not path.exists():
        if source.count("/") != 1 or source.startswith((".", "/")):
            raise FileNotFoundError(f"{source}: no such file or folder (nor a hub id of the form owner/name)")
        path, revision = _fetch(source)
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: holds none of {WEIGHT_FILES}; pass the snapshot folder of a released "
                                    "tokenizer, or the weights file itself")
        weights, config_path = found[0], path / "config.json"
    else:
        weights, config_path = path, path.with_name("config.json")
    config = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON ({e})") from e
    sha = {weights.name: file_sha256(weights)}
    if config is not None:
        sha[config_path.name] = file_sha256(config_path)
    return Snapshot(source, weights, read_weights(weights), config, revision, sha)


def check_convertible(state: dict[str, torch.Tensor], source: object) -> None:
    """Refuse, from the keys alone, the checkpoints that are not a discrete TiTok-style tokenizer."""
    if any("text_guidance" in k for k in state):
        raise ValueError(f"{source}: a TA-TiTok checkpoint; its decoder reads CLIP text features beside the tokens, "
                         "which this project's decoder has no input for, so it cannot be converted")
    if "latent_tokens" not in state and "decoder.conv_in.weight" in state and "quantize.embedding.weight" in state:
        raise ValueError(f"{source}: this is the MaskGIT-VQGAN (TiTok's stage-1 proxy-code model, 2D tokens), not a "
                         "1D tokenizer; convert a released TiTok or One-D-Piece tokenizer instead")
    if "latent_tokens" not in state:
        raise ValueError(f"{source}: no 'latent_tokens': not a TiTok or One-D-Piece tokenizer checkpoint")
    if "quantize.embedding.weight" not in state:
        raise ValueError(f"{source}: no codebook (quantize.embedding.weight): a VAE/KL variant with continuous "
                         "tokens, not discrete ids; only the VQ variants convert")
    logits = state.get("decoder.ffn.2.weight")
    if logits is not None and not any(k.startswith("pixel_decoder.") for k in state):
        raise ValueError(f"{source}: its decoder predicts {logits.shape[0]} MaskGIT-VQGAN proxy codes but the "
                         "checkpoint holds no pixel decoder: a stage-1 checkpoint; convert the released stage-2 "
                         "tokenizer, whose fine-tuned pixel decoder is inside it")


__all__ = ["Snapshot", "read_snapshot", "read_weights", "check_convertible", "file_sha256", "WEIGHT_FILES"]
