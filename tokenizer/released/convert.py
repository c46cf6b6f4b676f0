"""`onedtok convert {titok,one-d-piece} SRC --out DIR [--variant NAME]`: a released checkpoint -> a normal
`save_pretrained` folder of this project, usable by every tool (encode at any k, encode_adaptive, `onedtok`,
`eval.reconstruction`, `data.extract_tokens`, the AR generator, `train.py --model.init_args.init_from`).

The conversion is exact by construction: the model is built with the released-weight switches (config.py) that
reproduce the reference architecture, every reference key is consumed once, every project key is produced once
and shape-checked, and the result is loaded strictly. tests/test_released.py checks it against numbers of the
reference code (tests/data/released/README.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model import OneDTokenizer
from ..persistence import check_state_matches, load_state_strict
from .keys import map_state
from .source import Snapshot, check_convertible, read_snapshot
from .variants import FAMILIES, LICENCES, VARIANTS, tokenizer_config, variant_by_name, variant_for_hub_id

REFERENCE_CODE = {"titok": "https://github.com/bytedance/1d-tokenizer",
                  "one-d-piece": "https://github.com/turingmotors/One-D-Piece"}


def convert_state(family: str, reference: dict, state: dict[str, torch.Tensor], source: object = "checkpoint",
                  device: str | torch.device = "cpu") -> OneDTokenizer:
    """The project model equal to the reference model of config `reference` holding `state`. On the `meta`
    device nothing is allocated: the mapping and the shapes are checked without weights (the structure test)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {list(FAMILIES)}")
    check_convertible(state, source)
    cfg = tokenizer_config(family, reference, source)
    model = OneDTokenizer.empty(cfg, device)  # every tensor is then loaded strictly
    own = model.state_dict()
    prefix = next(k for k in own if k.startswith("quantizer.") and k.endswith("._codebook.embed"))[: -len("embed")]
    mapped, left_over = map_state(state, cfg, prefix, source)
    if left_over:
        raise ValueError(f"{source}: {len(left_over)} reference key(s) have no place in the converted model, e.g. "
                         f"{left_over[:6]}; this checkpoint is not the {family} architecture its config describes")
    if torch.device(device).type == "meta":
        check_state_matches(model, mapped, source)  # nothing to load on meta: keys and shapes only
        return model
    load_state_strict(model, mapped, source=source)
    return model.eval()


def reference_config(snapshot: Snapshot, family: str, variant: str | None) -> tuple[dict, str | None]:
    """(the reference config to build from, the variant's name if known). A snapshot's own config.json wins; a
    --variant given beside it must agree with it on the architecture."""
    name = variant
    if name is None:
        name = variant_for_hub_id(snapshot.source)
    chosen = variant_by_name(name, family) if name is not None else None
    if snapshot.config is None:
        if chosen is None:
            raise ValueError(f"{snapshot.source}: no config.json beside the weights; name the model with --variant "
                             f"(one of {sorted(v for v in VARIANTS if v.startswith(family))})")
        return chosen.reference_config(), name
    if chosen is not None and variant is not None:
        ours = tokenizer_config(family, chosen.reference_config(), f"variant {variant}")
        theirs = tokenizer_config(family, snapshot.config, snapshot.source)
        diff = [f.name for f in ours.__dataclass_fields__.values() if getattr(ours, f.name) != getattr(theirs, f.name)]
        if diff:
            raise ValueError(f"{snapshot.source}: its config.json differs from variant {variant} in {diff}; drop "
                             "--variant or pick the right one")
    return snapshot.config, name


def convert(family: str, source: str, out: str | Path, variant: str | None = None) -> Path:
    """Convert the checkpoint `source` (folder, file or hub id) of `family` into a save_pretrained folder `out`."""
    snapshot = read_snapshot(source)
    reference, name = reference_config(snapshot, family, variant)
    model = convert_state(family, reference, snapshot.state, snapshot.source)
    provenance = {
        "converted_from": {
            "family": family, "variant": name, "source": snapshot.source, "revision": snapshot.revision,
            "files_sha256": snapshot.sha256, "reference_code": REFERENCE_CODE[family], "licence": LICENCES[family],
            "published_rfid": VARIANTS[name].published_rfid if name in VARIANTS else None,
        },
        "converter": "onedtok convert",
    }  # fmt: skip
    return model.save_pretrained(out, provenance=provenance)


__all__ = ["convert", "convert_state", "reference_config", "REFERENCE_CODE"]
