"""`--model.init_args.init_from DIR`: start a training run from a saved tokenizer's weights (weights only).

The cheapest way to a variable-length tokenizer of paper quality is to fine-tune a released fixed-length one
(`onedtok convert`, docs/released_weights.md) with tail token drop or nested dropout, instead of training from
scratch. The optimizer, the step count and the discriminator start fresh; a resume (`--ckpt_path`) still restores
everything from its checkpoint afterwards.

The run's config must describe the same architecture as the saved one, field by field (like a resume). Only the
fields that shape training and not the computed function may differ (TRAINING_ONLY); nested dropout may add its
learned mask token, which a fixed or tail-drop model does not have (it starts at its usual init).
"""

from __future__ import annotations

from pathlib import Path

from ..model import OneDTokenizer
from ..persistence import load_state_strict
from .checkpoints import architecture_diff

TRAINING_ONLY = ("length_mechanism", "length_sampling", "per_sample_length", "cross_length_joint",
                 "vq_commitment_weight", "vq_decay", "vq_dead_code_threshold", "lfq_entropy_weight",
                 "vq_sync_codebook")  # fmt: skip
MASK_TOKEN = "decoder.latent_mask_token"


def load_initial_weights(tokenizer: OneDTokenizer, directory: str | Path) -> list[str]:
    """Copy the weights of the save_pretrained folder `directory` into `tokenizer`, in place. Returns the
    parameters that kept their fresh init (the nested-dropout mask token, if new). Raises ValueError naming every
    architecture field that differs."""
    source = OneDTokenizer.from_pretrained(directory)
    saved, current = source.config.to_dict(), tokenizer.config.to_dict()
    for name in TRAINING_ONLY:
        saved.pop(name), current.pop(name)
    diff = architecture_diff(saved, current)
    if diff:
        raise ValueError(f"init_from {directory}: the run's config describes another architecture than the saved "
                         "tokenizer (its config.json); set these model overrides to the saved values:\n  "
                         + "\n  ".join(line.replace("checkpoint", "saved") for line in diff))
    state = source.state_dict()
    fresh = []
    if MASK_TOKEN in tokenizer.state_dict() and MASK_TOKEN not in state:
        state[MASK_TOKEN] = tokenizer.state_dict()[MASK_TOKEN]  # nested dropout's new parameter keeps its init
        fresh.append(MASK_TOKEN)
    if MASK_TOKEN in state and MASK_TOKEN not in tokenizer.state_dict():
        del state[MASK_TOKEN]  # a nested-dropout model fine-tuned with tail drop: the mask token is unused
    load_state_strict(tokenizer, state, source=Path(directory) / "model.safetensors")
    return fresh


__all__ = ["load_initial_weights", "TRAINING_ONLY"]
