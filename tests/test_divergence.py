"""Nothing silently wrong after a divergence: a NaN loss from a real learning rate stops training with the step
range and what to try, exports nothing, and a NaN model is refused by every reader."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _small_training import QUIET_FLAGS, SMALL, as_flag, data, trainer

from tokenizer import OneDTokenizer
from tokenizer.persistence import WEIGHTS_NAME
from tokenizer.training import TokenizerModule
from tokenizer.training.divergence import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_huge_learning_rate_stops_with_the_divergence_message_and_exports_nothing(quantizer, tmp_path):
    """lr 1e4: the loss is NaN within a few steps. Before: vq ran to the end and exported NaN weights; fsq failed
    with an index error of its code histogram that never said NaN."""
    pl.seed_everything(0)
    module = TokenizerModule(preset="tiny", overrides={**SMALL, "quantizer": quantizer}, lr=1e4, warmup_steps=1,
                             export_dir=str(tmp_path / "export"))
    with pytest.raises(TrainingDiverged, match=r"NaN/inf (at|between) optimizer step") as caught:
        trainer(12, "32-true", log_every=4).fit(module, datamodule=data())
    assert "lower learning rate (lr is 10000)" in str(caught.value)
    assert not (tmp_path / "export").exists()


def test_train_py_exits_nonzero_naming_the_divergence(tmp_path):
    run = tmp_path / "run"
    args = [
        sys.executable, "train.py", "fit", "--config", "configs/tokenizer/tiny.yaml",
        "--trainer.max_steps", "8", "--trainer.val_check_interval", "1000", "--trainer.log_every_n_steps", "4",
        *QUIET_FLAGS, "--trainer.default_root_dir", str(run),
        "--trainer.callbacks.init_args.dirpath", str(run / "ckpt"),
        "--trainer.callbacks.init_args.every_n_train_steps", "1",
        "--model.init_args.overrides", as_flag({**SMALL, "quantizer": "vq"}), "--model.init_args.lr", "1e4",
        "--model.init_args.export_dir", str(run / "tokenizer"),
        "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()
    assert any(line.startswith("train.py: error: training diverged") for line in last), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (run / "tokenizer").exists()
    # every checkpoint written is finite: the save of a diverged state was refused
    for ckpt in (run / "ckpt").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), ckpt
    if any((run / "ckpt").glob("*.ckpt")):
        assert "Last finite checkpoint:" in proc.stderr


def test_from_pretrained_refuses_a_nan_weight_naming_it(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tokenizer.command import main as onedtok

    directory = OneDTokenizer.from_preset("tiny", **SMALL).save_pretrained(tmp_path / "tok")
    path = directory / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in state if k.startswith("decoder.") and state[k].is_floating_point())
    state[name].view(-1)[0] = float("nan")  # one value of one tensor, in a file saved the ordinary way
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=f"weight '{name}'.*NaN/inf"):
        OneDTokenizer.from_pretrained(directory)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="NaN/inf"):  # and so every reader: onedtok, the report, extraction
        onedtok(["encode", "--tokenizer", str(directory), str(tmp_path / "a.png"), "--num-tokens", "8",
                 "--out", str(tmp_path / "t.npz"), "--quiet"])


def test_report_refuses_non_finite_reconstructions():
    from eval.recon_eval import NonFiniteReconstruction, reconstruct

    tok = OneDTokenizer.from_preset("tiny", **SMALL).eval()
    refs = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)
    _, recs = reconstruct(tok, refs, [8])
    assert recs[0].dtype == torch.uint8
    with torch.no_grad():
        next(tok.decoder.parameters()).fill_(float("inf"))  # decodes NaN; to_uint8 alone made it black
    with pytest.raises(NonFiniteReconstruction, match="2 of 2 reconstruction"):
        reconstruct(tok, refs, [8])
