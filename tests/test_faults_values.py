"""Bad values stopped where they enter (issue 25, finding 12): config fields outside their range are named with the
value and the allowed range (image_size 0 or negative, patch_size 0 and codebook_size 0 used to pass, or end in a
ZeroDivisionError deep inside), and a training set too small for one batch is an error naming the count and the
batch size (it used to stop before the first step and exit 0 with no output)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import make_plain_tree
from _small_training import QUIET_FLAGS, SMALL, as_flag

from tokenizer import OneDTokenizer
from tokenizer.generator import GPTConfig

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("field,value,allowed", [
    ("image_size", 0, ">= 1"), ("image_size", -64, ">= 1"), ("patch_size", 0, ">= 1"), ("codebook_size", 0, ">= 2"),
    ("max_tokens", 0, ">= 1"), ("enc_heads", 0, ">= 1"), ("dec_depth", 0, ">= 1"), ("token_dim", -1, ">= 1"),
    ("mlp_ratio", 0.0, "> 0"), ("mlp_ratio", float("nan"), "> 0"), ("vq_decay", 1.5, "in [0, 1]"),
    ("decoder_refine_channels", -3, ">= 0"),
])  # fmt: skip
def test_tokenizer_config_names_a_value_out_of_range(field, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"TokenizerConfig.{field} must be {allowed}, got {value!r}")):
        OneDTokenizer.from_preset("tiny", **{field: value})


def test_fsq_levels_and_the_generator_config_are_checked_too():
    with pytest.raises(ValueError, match=re.escape("TokenizerConfig.fsq_levels must be a non-empty list of levels "
                                                   ">= 2, got [8, 1]")):
        OneDTokenizer.from_preset("tiny", quantizer="fsq", fsq_levels=[8, 1])
    for field, value, allowed in (("heads", 0, ">= 1"), ("dim", -8, ">= 1"), ("vocab_size", 1, ">= 2"),
                                  ("dropout", 1.5, "in [0, 1]"), ("norm_eps", 0.0, "> 0")):
        with pytest.raises(ValueError, match=re.escape(f"GPTConfig.{field} must be {allowed}, got {value!r}")):
            GPTConfig(**{field: value})


def tiny_run_args(run: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/tokenizer/tiny.yaml"), "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "1000000", *QUIET_FLAGS, "--trainer.default_root_dir", str(run),
            "--trainer.callbacks.init_args.dirpath", str(run / "ckpt"),
            "--model.init_args.export_dir", str(run / "tokenizer"),
            "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4", *extra]  # fmt: skip


def test_too_few_images_for_one_batch_is_an_error(tmp_path):
    import train

    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train_crops_per_epoch random crops: 3 for training, fewer than one batch "
                                         r"of batch_size 4.*Lower batch_size to at most 3, or raise "
                                         r"train_crops_per_epoch"):  # fmt: skip
        train.main(tiny_run_args(run, "--model.init_args.overrides", as_flag(SMALL),
                                 "--data.init_args.train_crops_per_epoch", "3"))
    assert not (run / "ckpt").exists() and not (run / "tokenizer").exists()

    from data.folder import FolderDataModule
    from data.tokens import TokenDataModule, TokenShardWriter

    make_plain_tree(str(tmp_path / "tree"), 1)  # 3 classes, one image each
    folder = FolderDataModule(str(tmp_path / "tree"), image_size=16, batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match=rf"folder {tmp_path / 'tree'}: image files: 3 for training, fewer than "
                                         r"one batch of batch_size 4"):  # fmt: skip
        folder.train_dataloader()
    kept = FolderDataModule(str(tmp_path / "tree"), image_size=16, batch_size=4, num_workers=0, drop_last=False)
    assert [len(b[0]) for b in kept.train_dataloader()] == [3]  # without drop_last the short batch is trained

    with TokenShardWriter(str(tmp_path / "tokens"), num_tokens=4, codebook_size=16, shard_size=10) as w:
        w.write(np.zeros((5, 4), np.int64), np.zeros(5, np.int64), [f"k{i}" for i in range(5)])
    tokens = TokenDataModule(str(tmp_path / "tokens"), batch_size=8)
    tokens.setup()
    with pytest.raises(ValueError, match="records: 5 for training, fewer than one batch of batch_size 8"):
        tokens.train_dataloader()


@pytest.mark.slow
def test_train_py_bad_config_value_is_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = tiny_run_args(tmp_path / "run", "--model.init_args.overrides", as_flag({**SMALL, "patch_size": 0}))
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "train.py: error: TokenizerConfig.patch_size must be >= 1, got 0"
