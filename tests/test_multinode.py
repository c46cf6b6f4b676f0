"""Multi-node DDP smoke test (two single-process torchrun "nodes", gloo on CPU) and its checker.

`test_multinode_smoke` runs scripts/multinode_smoke.sh in a lighter setting (fewer images and steps) and needs
~1-2 minutes on two busy cores per variant (one of them plants a second all-reduce of the tokenizer's gradients,
which check (d) must catch); deselect it with `-m "not slow"`.
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

from tokenizer.training.callbacks import DistributedAudit, tokenizer_grad_elements  # noqa: E402

# The paper objective at tiny size: LPIPS (on 4 images), GAN + LeCam from the first batch, EMA, bf16-mixed and the
# fused AdamW a CUDA run builds. The strategy is whatever the SLURM script and the docs pass (plain `ddp`).
FULL_OBJECTIVE = ("--model.init_args.gan_weight 0.1 --model.init_args.gan_start 0 --model.init_args.lecam_weight 0.01 "
                  "--model.init_args.ema_decay 0.9 --model.init_args.perceptual_weight 1.0 "
                  "--model.init_args.perceptual_subsample 4 --model.init_args.fused_optimizer true "
                  "--trainer.precision bf16-mixed")


# The mutant of issue 22 that check (d) missed: a second, manual all-reduce of the tokenizer's gradients after DDP
# has reduced them. It averages already identical gradients, so training and weights do not change: only the
# audit of all-reduces can see it. Written into the test's tmp_path and added with `--trainer.callbacks+=`.
PLANTED_REDUCE = """
import lightning.pytorch as pl
import torch.distributed as dist


class ReduceTokenizerGradsAgain(pl.Callback):
    def on_after_backward(self, trainer, pl_module):
        for p in pl_module.tokenizer.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo over the 'lo' interface (Linux)")
@pytest.mark.parametrize("objective", ["reconstruction", "full", "planted_second_reduce"])
def test_multinode_smoke(tmp_path, objective):
    """`full`: discriminator (two optimizer steps per batch), LeCam buffers and EMA must stay in sync too, under
    the exact strategy flag of scripts/slurm_train.sbatch and docs/multinode.md. `planted_second_reduce`: the
    reconstruction run plus a callback that all-reduces the tokenizer's gradients a second time by hand: check (d)
    must fail on it, and only (d)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    planted = objective == "planted_second_reduce"
    extra_args = FULL_OBJECTIVE if objective == "full" else ""
    if planted:
        (tmp_path / "planted_reduce.py").write_text(PLANTED_REDUCE)
        extra_args = "--trainer.callbacks+=planted_reduce.ReduceTokenizerGradsAgain"
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable,
        TORCHRUN=str(torchrun),
        PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        RUN_DIR=str(tmp_path / "run"),
        STEPS1="4" if objective == "full" else "3",  # full: 2 optimizer steps per batch
        STEPS2="8" if objective == "full" else "5",
        EXTRA_ARGS=extra_args,
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
    checks = [line for line in out.splitlines() if line.startswith(("[PASS]", "[FAIL]"))]
    d_lines = [line for line in checks if line.startswith(("[PASS] (d)", "[FAIL] (d)"))]
    assert len(d_lines) == 2, f"check (d) must run on both fits: {checks or out[-6000:]}"  # never skipped
    if not planted:
        assert proc.returncode == 0, out[-6000:]
        assert "MULTINODE SMOKE PASSED" in out
        assert "[FAIL]" not in out
        assert all(line.startswith("[PASS] (d)") for line in d_lines), d_lines
        return
    assert proc.returncode == 1, out[-6000:]
    failed = [line for line in checks if line.startswith("[FAIL]")]
    assert failed == d_lines, f"only (d) may fail: {failed}"
    assert all("tokenizer gradients also all-reduced outside DDP" in line for line in failed), failed
    assert "MULTINODE SMOKE FAILED" in out


# ---- the checker itself must catch what it claims to catch (fast, no training) ----------------------------
TOKENIZER_ELEMENTS = 1000


def clean_ddp(batches: int = 2, **changes) -> dict:
    """The "ddp" record of DistributedAudit for a fit in which DDP alone reduced the tokenizer's gradients."""
    return {"managed_elements": TOKENIZER_ELEMENTS, "tokenizer_elements": TOKENIZER_ELEMENTS,
            "reduced_per_batch": [TOKENIZER_ELEMENTS] * batches,
            "tokenizer_grad_outside_ddp_per_batch": [0] * batches, "other_outside_ddp_per_batch": [300] * batches,
            "tokenizer_grad_outside_ddp_between_batches": 0, "other_outside_ddp_between_batches": 1, **changes}


def _write_fit(audit: Path, rank: int, start: int, end: int, batches, tensors: dict, ddp) -> None:
    prefix = audit / f"rank{rank}-from{start}"
    torch.save(tensors, f"{prefix}-state.pt")
    record = {"rank": rank, "world_size": 2, "start_step": start, "end_step": end, "batches": batches}
    if ddp != "absent":
        record["ddp"] = ddp
    (audit / f"rank{rank}-from{start}-keys.json").write_text(json.dumps(record))


def _fake_run(tmp_path: Path, *, codebook_r1: torch.Tensor, keys_r1: list[str], ddp_r1="clean") -> Path:
    audit = tmp_path / "audit"
    audit.mkdir(parents=True)
    base = {"param:w": torch.ones(3), "buffer:tokenizer.quantizer.impl._codebook.embed": torch.zeros(1, 4, 2)}
    _write_fit(audit, 0, 0, 2, [[0, 0, ["a", "b"]], [0, 1, ["c", "d"]]], base, clean_ddp())
    other = {**base, "buffer:tokenizer.quantizer.impl._codebook.embed": codebook_r1}
    _write_fit(audit, 1, 0, 2, [[0, 0, keys_r1[:2]], [0, 1, keys_r1[2:]]], other,
               clean_ddp() if ddp_r1 == "clean" else ddp_r1)
    return tmp_path


def test_checker_passes_identical_disjoint(tmp_path, capsys):
    run = _fake_run(tmp_path, codebook_r1=torch.zeros(1, 4, 2), keys_r1=["e", "f", "g", "h"])
    assert multinode_check.check(str(run), 2, [2]) == 0
    out = capsys.readouterr().out
    assert "MULTINODE SMOKE PASSED" in out
    assert "[PASS] (d) DDP reduces each tokenizer gradient once per batch" in out


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


@pytest.mark.parametrize(
    ("ddp_r1", "named"),
    [
        ("absent", "rank 1: no 'ddp' data"),  # a record without the key: once skipped without a word
        (None, "rank 1: no 'ddp' data"),  # the model was not wrapped in DDP
        ({k: v for k, v in clean_ddp().items() if not k.startswith("tokenizer_grad_outside")},
         "'ddp' lacks ['tokenizer_grad_outside_ddp_per_batch', 'tokenizer_grad_outside_ddp_between_batches']"),
        (clean_ddp(tokenizer_grad_outside_ddp_per_batch=[0, TOKENIZER_ELEMENTS]),
         "tokenizer gradients also all-reduced outside DDP (rank, batch, elements) [(1, 1, 1000)]"),
        (clean_ddp(tokenizer_grad_outside_ddp_between_batches=40),
         "tokenizer gradients also all-reduced outside DDP (rank, batch, elements) [(1, 'between batches', 40)]"),
        (clean_ddp(reduced_per_batch=[TOKENIZER_ELEMENTS, 2 * TOKENIZER_ELEMENTS]),
         "DDP reduced other than the tokenizer's gradients (rank, batch, elements) [(1, 1, 2000)]"),
        (clean_ddp(managed_elements=TOKENIZER_ELEMENTS + 64), "DDP manages [1000, 1064] elements"),
        (clean_ddp(reduced_per_batch=[], tokenizer_grad_outside_ddp_per_batch=[]),
         "entries per batch (rank, (DDP, outside DDP, batches)) [(1, (0, 0, 2))]"),  # nothing counted: no pass
    ],
    ids=["no_ddp_key", "ddp_null", "old_record", "grads_reduced_twice", "grads_reduced_between_batches",
         "ddp_reduces_more", "ddp_manages_more", "no_batches_counted"],
)
def test_checker_fails_d(tmp_path, capsys, ddp_r1, named):
    run = _fake_run(tmp_path, codebook_r1=torch.zeros(1, 4, 2), keys_r1=["e", "f", "g", "h"], ddp_r1=ddp_r1)
    assert multinode_check.check(str(run), 2, [2]) == 1
    out = capsys.readouterr().out
    fail = [line for line in out.splitlines() if line.startswith("[FAIL]")]
    assert len(fail) == 1 and fail[0].startswith("[FAIL] (d) DDP reduces each tokenizer gradient once per batch"), out
    assert named in fail[0], fail[0]
    assert "failed: (d) DDP reduces each tokenizer gradient once per batch" in out


# ---- what DistributedAudit counts as a tokenizer gradient reduced outside DDP ------------------------------
def test_tokenizer_grad_elements_by_storage_and_by_copy():
    torch.manual_seed(0)
    grads = [torch.randn(4, 3), torch.randn(5), torch.zeros(2), torch.randn(6)]
    assert tokenizer_grad_elements(grads[0], grads) == 12  # the gradient itself
    assert tokenizer_grad_elements(grads[3][2:], grads) == 4  # a view of it
    flat = torch.cat([g.reshape(-1) for g in grads])  # average_gradients' flat buffer: copies, in order
    assert tokenizer_grad_elements(flat, grads) == 12 + 5 + 6  # the all-zero gradient is no evidence
    assert tokenizer_grad_elements(torch.cat([grads[1], torch.randn(7)]), grads) == 5  # a prefix, then other
    assert tokenizer_grad_elements(torch.randn(30), grads) == 0  # codebook statistics, discriminator gradients
    assert tokenizer_grad_elements(torch.zeros(30), grads) == 0  # zero counters do not match the zero gradient
    assert tokenizer_grad_elements(grads[0].double(), grads) == 0  # a converted copy is another tensor


def test_distributed_audit_puts_all_reduce_back_after_an_exception():
    original = torch.distributed.all_reduce
    audit = DistributedAudit(out_dir="unused")
    audit._wrap_all_reduce()
    try:
        assert torch.distributed.all_reduce is not original
    finally:
        audit.on_exception(None, None, RuntimeError("a failing step"))
    assert torch.distributed.all_reduce is original
    audit.teardown(None, None, "fit")  # a second restore is harmless
    assert torch.distributed.all_reduce is original
