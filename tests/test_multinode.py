"""Multi-node DDP smoke test (two single-process torchrun "nodes", gloo on CPU) and its checker.

`test_multinode_smoke` runs scripts/multinode_smoke.sh in a lighter setting (fewer images and steps) and needs
~1-2 minutes on two busy cores; deselect it with `-m "not slow"`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import multinode_check  # noqa: E402
from _launch_flags import documented_strategy  # noqa: E402

# The paper objective at tiny size: LPIPS (on 4 images), GAN + LeCam from the first batch, EMA, bf16-mixed and the
# fused AdamW a CUDA run builds. The strategy is whatever the SLURM script and the docs pass (plain `ddp`).
FULL_OBJECTIVE = ("--model.init_args.gan_weight 0.1 --model.init_args.gan_start 0 --model.init_args.lecam_weight 0.01 "
                  "--model.init_args.ema_decay 0.9 --model.init_args.perceptual_weight 1.0 "
                  "--model.init_args.perceptual_subsample 4 --model.init_args.fused_optimizer true "
                  "--trainer.precision bf16-mixed")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo over the 'lo' interface (Linux)")
@pytest.mark.parametrize("objective", ["reconstruction", "full"])
def test_multinode_smoke(tmp_path, objective):
    """`full`: discriminator (two optimizer steps per batch), LeCam buffers and EMA must stay in sync too, under
    the exact strategy flag of scripts/slurm_train.sbatch and docs/multinode.md."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable,
        TORCHRUN=str(torchrun),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        RUN_DIR=str(tmp_path / "run"),
        STEPS1="4" if objective == "full" else "3",  # full: 2 optimizer steps per batch
        STEPS2="8" if objective == "full" else "5",
        EXTRA_ARGS=FULL_OBJECTIVE if objective == "full" else "",
        STRATEGY=documented_strategy(),
        PER_PHOTO="6",
        RANK_TIMEOUT="240",
    )
    env.pop("BREAK_SYNC", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "multinode_smoke.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "MULTINODE SMOKE PASSED" in out
    assert "[FAIL]" not in out


# ---- the checker itself must catch what it claims to catch (fast, no training) ----------------------------
def _write_fit(audit: Path, rank: int, start: int, end: int, batches, tensors: dict) -> None:
    prefix = audit / f"rank{rank}-from{start}"
    torch.save(tensors, f"{prefix}-state.pt")
    record = {"rank": rank, "world_size": 2, "start_step": start, "end_step": end, "batches": batches}
    (audit / f"rank{rank}-from{start}-keys.json").write_text(json.dumps(record))


def _fake_run(tmp_path: Path, *, codebook_r1: torch.Tensor, keys_r1: list[str]) -> Path:
    audit = tmp_path / "audit"
    audit.mkdir(parents=True)
    base = {"param:w": torch.ones(3), "buffer:tokenizer.quantizer.impl._codebook.embed": torch.zeros(1, 4, 2)}
    _write_fit(audit, 0, 0, 2, [[0, 0, ["a", "b"]], [0, 1, ["c", "d"]]], base)
    other = {**base, "buffer:tokenizer.quantizer.impl._codebook.embed": codebook_r1}
    _write_fit(audit, 1, 0, 2, [[0, 0, keys_r1[:2]], [0, 1, keys_r1[2:]]], other)
    return tmp_path


def test_checker_passes_identical_disjoint(tmp_path, capsys):
    run = _fake_run(tmp_path, codebook_r1=torch.zeros(1, 4, 2), keys_r1=["e", "f", "g", "h"])
    assert multinode_check.check(str(run), 2, [2]) == 0
    assert "MULTINODE SMOKE PASSED" in capsys.readouterr().out


def test_checker_catches_codebook_drift(tmp_path, capsys):
    drift = torch.zeros(1, 4, 2)
    drift[0, 1, 0] = 1e-6
    run = _fake_run(tmp_path, codebook_r1=drift, keys_r1=["e", "f", "g", "h"])
    assert multinode_check.check(str(run), 2, [2]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] (b) identical parameters and buffers" in out
    assert "_codebook.embed" in out


def test_checker_catches_shared_samples(tmp_path, capsys):
    run = _fake_run(tmp_path, codebook_r1=torch.zeros(1, 4, 2), keys_r1=["e", "b", "g", "h"])
    assert multinode_check.check(str(run), 2, [2]) == 1
    assert "[FAIL] (a) disjoint samples across ranks" in capsys.readouterr().out
