"""Bad input to the model API gets a clear error that names the value or file, and valid input of an unusual
type works: uint8/int8 ids, string or float K, damaged exported tokenizer directories, empty checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from _scripts import load_script
from _small_training import SMALL

from tokenizer import OneDTokenizer
from tokenizer.checkpoints import CheckpointError, tokenizer_from_checkpoint

# ids up to 200 must be valid: a codebook larger than uint8's range
SMALL_1K = {**SMALL, "codebook_size": 1024}


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return OneDTokenizer.from_preset("tiny", **SMALL_1K).eval()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_decode_accepts_every_integer_dtype(tok, dtype):
    ids = torch.tensor([[5, 100, 7, 99], [0, 127, 1, 2]])
    if dtype == torch.uint8:
        ids[0, 1] = 200  # above int8, below the codebook size: the comparison must not wrap
    expected = tok.decode(ids)
    assert torch.equal(tok.decode(ids.to(dtype)), expected)


def test_decode_names_the_actual_out_of_range_values(tok):
    with pytest.raises(ValueError, match=r"\[0, 1024\), got range \[0, 1024\]"):
        tok.decode(torch.tensor([[0, 1024]]))
    with pytest.raises(ValueError, match=r"got range \[-1, 3\]"):
        tok.decode(torch.tensor([[-1, 3]], dtype=torch.int8))


@pytest.mark.parametrize("field,value", [("max_tokens", "16"), ("max_tokens", 16.0),
                                         ("max_tokens", True), ("enc_width", None),
                                         ("fsq_levels", [8, "5"]), ("quantizer", 3)])
def test_config_refuses_values_of_the_wrong_type(field, value):
    with pytest.raises(TypeError, match=rf"TokenizerConfig\.{field} must be .*got {value!r}".replace("[", r"\[")):
        OneDTokenizer.from_preset("tiny", **{field: value})


def test_config_accepts_ints_for_floats():
    assert OneDTokenizer.from_preset("tiny", **SMALL_1K, vq_dead_code_threshold=2).config.vq_dead_code_threshold == 2


def test_from_pretrained_names_what_is_wrong_with_the_directory(tok, tmp_path):
    good = tok.save_pretrained(tmp_path / "good")
    assert sorted(p.name for p in good.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    config = good / "config.json"
    meta = json.loads(config.read_text())

    config.write_text(json.dumps({"format": meta["format"]}))  # the reported bare KeyError
    with pytest.raises(ValueError, match=r"config\.json has no 'config' object"):
        OneDTokenizer.from_pretrained(good)
    config.write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        OneDTokenizer.from_pretrained(good)

    # the two files of different saves (a kill between the two renames): refused, not loaded under the wrong config
    other = OneDTokenizer.from_preset("tiny", **{**SMALL_1K, "enc_heads": 4}).save_pretrained(tmp_path / "other")
    config.write_text((other / "config.json").read_text())
    with pytest.raises(ValueError, match="come from different saves"):
        OneDTokenizer.from_pretrained(good)

    config.write_text(json.dumps(meta))
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read"):
        OneDTokenizer.from_pretrained(good)


def test_tokenizer_from_an_empty_checkpoint_names_it(tmp_path):
    empty = tmp_path / "last.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last\.ckpt is empty \(0 bytes\)"):
        tokenizer_from_checkpoint(empty)


def test_demo_generator_never_deletes_what_it_did_not_write(tok, tmp_path):
    demo = load_script("demo_generator")
    tokenizer_dir = tok.save_pretrained(tmp_path / "tokenizer")
    foreign_dir = tmp_path / "mine"
    foreign_dir.mkdir()
    (foreign_dir / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="did not write"):
        demo.main(["--tokenizer", str(tokenizer_dir), "--out", str(foreign_dir)])
    assert (foreign_dir / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me too")
    with pytest.raises(SystemExit, match="is a file"):
        demo.main(["--tokenizer", str(tokenizer_dir), "--out", str(a_file)])
    assert a_file.read_text() == "keep me too"

    # in its own directory it replaces its outputs and leaves a file someone put beside them
    own = tmp_path / "own"
    demo.prepare_out(str(own))
    (own / "tokens").mkdir()
    (own / "tokens" / "tokens-000000.npz").write_bytes(b"old")
    (own / "summary.json").write_text("{}")
    (own / "README.txt").write_text("user note")
    demo.prepare_out(str(own))
    assert sorted(p.name for p in own.iterdir()) == [demo.MARKER, "README.txt"]


def test_tokenizers_saved_with_the_old_name_for_k_still_load(tok, tmp_path):
    """num_latent_tokens was renamed max_tokens (one word for K); directories saved before the rename load."""
    saved = tok.save_pretrained(tmp_path / "old")
    for path in (saved / "config.json",):
        meta = json.loads(path.read_text())
        meta["config"]["num_latent_tokens"] = meta["config"].pop("max_tokens")
        path.write_text(json.dumps(meta))
    from safetensors.torch import load_file, save_file

    weights = saved / "model.safetensors"
    save_file(load_file(str(weights)), str(weights),
              metadata={"format": meta["format"], "config": json.dumps(meta["config"], sort_keys=True)})
    old = OneDTokenizer.from_pretrained(saved)
    assert old.max_tokens == tok.max_tokens and old.config == tok.config
    assert OneDTokenizer.from_preset("tiny", num_latent_tokens=4).max_tokens == 4  # an old override too
