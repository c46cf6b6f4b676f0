"""Every file the project writes gets the mode the umask allows (0644 under umask 022, 0664 under 002), like any
file `open` creates: teammates on a shared cluster read the run's checkpoints, config, exported tokenizer, token
shards and reports. The atomic writer's temp file used to be 0600 (tempfile.mkstemp), and the rename kept it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from _small_training import demo_run_command
from _weights_probe import needs_lpips

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
UMASKS = [0o022, 0o002]


def wrong_modes(root: Path, umask: int) -> list[str]:
    """Every file and directory under root whose permission bits are not what the umask allows."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        got = stat.S_IMODE(path.stat().st_mode)
        if got != want:
            wrong.append(f"{path.relative_to(root.parent)}: {got:o}, want {want:o}")
    return wrong


def run(cmd: list[str], umask: int) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, umask=umask, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


WRITERS = """
import sys
import numpy as np
import torch
from data.tokens import TokenShardWriter
from tokenizer import OneDTokenizer, atomic
from tokenizer.directory_lock import lock_directory
out = sys.argv[1]
atomic.write_text(out + "/report.md", "x")
atomic.write_json(out + "/report.json", {})
atomic.torch_save({"w": torch.zeros(1)}, out + "/state.pt")
with atomic.atomic_open(out + "/per_image.npz") as f:
    np.savez(f, a=np.zeros(1))
OneDTokenizer.from_preset("tiny", enc_depth=1, dec_depth=1).save_pretrained(out + "/tokenizer")
with TokenShardWriter(out + "/tokens", num_tokens=4, codebook_size=16, shard_size=2) as w:
    w.write(np.zeros((3, 4)), np.zeros(3), ["a", "b", "c"])
lock_directory(out + "/run").release()
"""


@pytest.mark.parametrize("umask", UMASKS, ids=["umask022", "umask002"])
def test_every_writer_gives_the_mode_the_umask_allows(tmp_path, umask):
    """The writers themselves (tokenizer.atomic, save_pretrained, token shards, the lock file), in a process
    started with that umask."""
    out = tmp_path / "out"  # pytest's tmp_path is 0700 whatever the umask
    run([sys.executable, "-c", WRITERS, str(out)], umask)
    assert len(list(out.rglob("*"))) >= 12
    assert wrong_modes(out, umask) == []


@pytest.mark.slow
@needs_lpips
@pytest.mark.parametrize("umask", UMASKS, ids=["umask022", "umask002"])
def test_training_extraction_and_report_outputs_get_the_mode_the_umask_allows(tmp_path, umask):
    """The real outputs, end to end: a training's run directory (checkpoints, config.yaml, TensorBoard, the
    exported tokenizer), the token shards extracted with it (+ meta.json), and a reconstruction report."""
    run(demo_run_command(tmp_path, 2), umask)
    tok = str(tmp_path / "demo" / "tokenizer")
    run([sys.executable, "-m", "data.extract_tokens", "--tokenizer", tok, "--out", str(tmp_path / "tokens"),
         "--num-crops", "6", "--shard-size", "4", "--cpu", "--no-progress"], umask)  # fmt: skip
    run([sys.executable, "-m", "eval.reconstruction", "--tokenizer", tok, "--max-images", "4", "--num-tokens", "2",
         "--codecs", "--no-fid", "--no-adaptive", "--num-workers", "0", "--cpu", "--per-image",
         "--out", str(tmp_path / "report")], umask)  # fmt: skip
    for kind in ("demo/ckpt/last.ckpt", "demo/config.yaml", "demo/tokenizer/model.safetensors",
                 "demo/tokenizer/config.json", "tokens/meta.json", "tokens/tokens-r000-000001.npz",
                 "report/metrics.md", "report/metrics.json", "report/per_image.npz", "report/reconstructions.png"):
        assert (tmp_path / kind).is_file(), kind
    assert wrong_modes(tmp_path / "demo", umask) == []
    assert wrong_modes(tmp_path / "tokens", umask) == []
    assert wrong_modes(tmp_path / "report", umask) == []
