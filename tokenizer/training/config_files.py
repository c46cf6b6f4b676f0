"""Config files as a base plus a delta: a paper config says only what makes it different.

A config file may carry two keys of its own, read here and removed before LightningCLI sees the config:

    base: [../base/trainer-8gpu.yaml, ../base/imagenet-256.yaml]   # paths relative to this file, merged in order
    run: onedpiece-B-256                                            # fills every "{run}" in the merged strings

The merge is recursive for mappings (a later file overrides single keys) and replaces everything else (lists
included: a file that sets `trainer.callbacks` sets all of them). Bases may have bases. `train.py` expands each
`--config FILE` into the merged config, so `python train.py fit --config configs/tokenizer/onedpiece-B-256.yaml`
works as before, and the run's saved `config.yaml` is the full resolved config. Scripts and tests that read a
config without the CLI call `load_config`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

BASE_KEY, RUN_KEY = "base", "run"


def merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `delta`: mappings merge key by key, any other value replaces (neither input changes)."""
    out = copy.deepcopy(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _fill_run(value: Any, run: str) -> Any:
    if isinstance(value, str):
        return value.replace("{run}", run)
    if isinstance(value, dict):
        return {k: _fill_run(v, run) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_run(v, run) for v in value]
    return value


def _load(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config bases form a cycle: {' -> '.join(map(str, (*seen, path)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        where = f" (a base of {seen[-1]})" if seen else ""
        raise FileNotFoundError(f"config file {path} not found{where}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, _load(path.parent / base, (*seen, path)))
    return merge(merged, data)


def load_config(path: str | Path) -> dict[str, Any]:
    """The config at `path` with its bases merged in and `{run}` filled (no `base`/`run` keys left)."""
    cfg = _load(Path(path), ())
    run = cfg.pop(RUN_KEY, None)
    if run is None:
        return cfg
    if not isinstance(run, str) or not run:
        raise ValueError(f"{path}: `run` must be a non-empty name, got {run!r}")
    return _fill_run(cfg, run)


def uses_composition(path: str | Path) -> bool:
    """True when the file at `path` has a `base` or `run` key (and so must go through load_config)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and (BASE_KEY in data or RUN_KEY in data)


def expand_config_args(args: list[str]) -> list[str]:
    """Replace the file of each `--config FILE` / `--config=FILE` that uses composition by its merged config
    (as a YAML string, which LightningCLI's --config accepts); other arguments pass through unchanged."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args) and uses_composition(args[i + 1]):
            out += ["--config", yaml.safe_dump(load_config(args[i + 1]), sort_keys=False)]
            i += 2
            continue
        if arg.startswith("--config=") and uses_composition(arg.split("=", 1)[1]):
            out += ["--config", yaml.safe_dump(load_config(arg.split("=", 1)[1]), sort_keys=False)]
        else:
            out.append(arg)
        i += 1
    return out


__all__ = ["merge", "load_config", "uses_composition", "expand_config_args"]
