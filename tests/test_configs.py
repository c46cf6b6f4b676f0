"""Every shipped config parses: its classes import, its init_args are real parameters, its preset and overrides
make a valid TokenizerConfig. (Paper-size models are not built here: that is hundreds of MB on CPU.)"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from _launch_flags import documented_strategy

from tokenizer.config import preset_config
from tokenizer.training.config_files import load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if "base" not in p.parent.name)  # bases are not runs


def resolve(class_path: str):
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid(path):
    cfg = load_config(path)
    for section in ("model", "data"):
        cls = resolve(cfg[section]["class_path"])
        params = inspect.signature(cls.__init__).parameters
        unknown = set(cfg[section].get("init_args", {})) - set(params)
        assert not unknown, f"{path.name}: {section} has unknown init_args {unknown}"
    model_args = cfg["model"]["init_args"]
    if "TokenizerModule" in cfg["model"]["class_path"]:
        tok = preset_config(model_args["preset"], **(model_args.get("overrides") or {}))
        assert tok.max_tokens >= 1
    if cfg["trainer"].get("devices", 1) != 1 or cfg["trainer"].get("num_nodes", 1) != 1:
        # the multi-GPU configs use the strategy the launch docs pass, which the DDP test runs
        assert cfg["trainer"].get("strategy") == documented_strategy(), path.name


def test_paper_configs_cover_the_variants():
    names = {p.stem for p in CONFIGS}
    assert {"titok-L-32", "titok-B-64", "titok-S-128", "onedpiece-B-256", "flextok-style-B-256",
            "vq-B-128", "lfq-B-128", "fsq-B-128"} <= names
    flex = load_config(CONFIG_DIR / "tokenizer" / "flextok-style-B-256.yaml")["model"]["init_args"]
    cfg = preset_config(flex["preset"], **flex["overrides"])
    assert (cfg.length_mechanism, cfg.causal_latents, cfg.quantizer) == ("nested_dropout", True, "fsq")


def test_paper_configs_are_deltas_on_shared_bases():
    """Each paper config names its bases and says only what differs: run name, preset, overrides."""
    for path in CONFIGS:
        text = path.read_text()
        if "tiny" in path.stem or path.parent.name != "tokenizer":
            continue
        body = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        assert text.count("base:") == 1 and len(body) <= 25, f"{path.name}: {len(body)} lines"
        cfg = load_config(path)
        assert cfg["trainer"]["logger"]["init_args"]["name"] == path.stem  # {run} filled in
        assert cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] == f"checkpoints/{path.stem}/ckpt"


def test_composition_merges_recursively_and_fills_the_run_name(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("trainer: {max_steps: 5, devices: 8}\nname: '{run}-x'\nl: [1, 2]\n")
    (tmp_path / "b.yaml").write_text("base: base/a.yaml\nrun: r1\ntrainer: {max_steps: 7}\nl: [3]\n")
    assert load_config(tmp_path / "b.yaml") == {"trainer": {"max_steps": 7, "devices": 8}, "name": "r1-x", "l": [3]}
    (tmp_path / "c.yaml").write_text("base: [c.yaml]\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml not found \(a base of .*d\.yaml\)"):
        load_config(tmp_path / "d.yaml")


def test_train_cli_resolves_a_delta_config(capsys):
    """train.py takes the delta file itself, as before; the config it resolves is the base plus the delta."""
    import train

    path = CONFIG_DIR / "tokenizer" / "titok-B-64.yaml"
    with pytest.raises(SystemExit) as done:
        train.main(["fit", "--config", str(path), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(path)
    assert printed["model"]["init_args"]["overrides"] == expected["model"]["init_args"]["overrides"]
    assert printed["model"]["init_args"]["perceptual_weight"] == 1.0  # from the objective base
    assert printed["trainer"]["logger"]["init_args"]["name"] == "titok-B-64"
    assert printed["data"]["init_args"]["train_shards"] == expected["data"]["init_args"]["train_shards"]


@pytest.mark.parametrize("overrides", ["{num_latnet_tokens: 16}", "{max_tokens: sixteen}",
                                       "{token_mixing: 3}"])
def test_cli_validates_tokenizer_overrides_while_parsing(overrides, capsys):
    """`overrides` is typed from TokenizerConfig's fields: a typo or a wrong type stops the parser, naming it."""
    import train

    with pytest.raises(SystemExit) as done:
        train.main(["fit", "--config", str(CONFIG_DIR / "tokenizer" / "tiny.yaml"),
                    "--model.init_args.overrides", overrides, "--print_config"])
    assert done.value.code not in (0, None)
    assert "overrides" in capsys.readouterr().err


def test_paper_checkpoints_keep_last_and_every_nth_only(tmp_path):
    """The multi-GPU base keeps `last.ckpt` (rewritten every n steps) and every N-th checkpoint, not all of them: a
    1M-step run of L keeps 11 files, not 101 (configs/base/trainer-8gpu.yaml). Its two callbacks, run as they are
    with the intervals scaled down (10000 -> 2, 100000 -> 20), over 24 steps of the small tokenizer."""
    import lightning.pytorch as pl
    import torch
    from _small_training import SMALL, data, quiet_trainer

    from tokenizer.training import TokenizerModule

    callbacks = load_config(CONFIG_DIR / "tokenizer" / "onedpiece-L-256.yaml")["trainer"]["callbacks"]
    checkpoints = [c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    last, kept = sorted(checkpoints, key=lambda c: c["every_n_train_steps"])
    assert (last["save_last"], last["save_top_k"], kept["save_top_k"]) == (True, 0, -1)
    assert not kept.get("save_last") and kept["dirpath"] == last["dirpath"] == "checkpoints/onedpiece-L-256/ckpt"
    assert 1_000_000 // kept["every_n_train_steps"] + 1 == 11

    scaled = [resolve(c["class_path"])(**{**c["init_args"], "dirpath": str(tmp_path / "ckpt"),
                                          "every_n_train_steps": c["init_args"]["every_n_train_steps"] // 5000})
              for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]  # fmt: skip
    pl.seed_everything(0)
    module = TokenizerModule(preset="tiny", overrides=SMALL, warmup_steps=1)
    quiet_trainer(max_steps=24, limit_val_batches=0, enable_checkpointing=True, callbacks=scaled,
                  default_root_dir=str(tmp_path)).fit(module, datamodule=data())  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=20.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 24


def test_finetune_recipe_rebuilds_the_converted_titok_s128():
    """configs/tokenizer/finetune-titok-S-128-tail.yaml: its preset and overrides give exactly the architecture that
    `onedtok convert` builds for TiTok-S-128 (so init_from accepts the converted folder), apart from the length
    mechanism it fine-tunes with."""
    from tokenizer.released import VARIANTS, tokenizer_config

    args = load_config(CONFIG_DIR / "tokenizer" / "finetune-titok-S-128-tail.yaml")["model"]["init_args"]
    recipe = preset_config(args["preset"], **args["overrides"]).to_dict()
    converted = tokenizer_config("titok", VARIANTS["titok-S-128"].reference_config(), "titok-S-128").to_dict()
    assert (converted["length_mechanism"], recipe["length_mechanism"]) == ("fixed", "tail_token_drop")
    differ = {k: (converted[k], recipe[k]) for k in converted if converted[k] != recipe[k]}
    assert differ == {"length_mechanism": ("fixed", "tail_token_drop")}
    assert args["init_from"] and args["lr"] < 1e-4  # starts from the converted weights, at a fine-tuning lr
