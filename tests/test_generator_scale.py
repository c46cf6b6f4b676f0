"""The generator at scale, on CPU as far as CPU goes: the paper configs, the chunked cross-entropy (equal to the
plain one in value and gradients, and never the whole batch's logits), the B config shrunk to tiny training under
bf16-mixed with the fused AdamW of a CUDA run, a steady-state training step without host syncs, range checks in
int64, and the static / compiled one-token decode step."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _small_training import LossRecorder, quiet_trainer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from tokenizer.generator import GPT, PRESETS, generate
from tokenizer.generator.decode_step import compiled_decode_step, decode_step
from tokenizer.generator.kv_cache import KVCache
from tokenizer.generator.lightning import GeneratorModule
from tokenizer.generator.loss import linear_cross_entropy
from tokenizer.generator.sampling import next_token_logits
from tokenizer.training.config_files import load_config
from tokenizer.training.sync_audit import StepSyncAudit

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SHRINK = dict(vocab_size=32, max_tokens=16, num_classes=4, dim=64, depth=2, heads=4)


def small_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT.from_preset("tiny", **{**SHRINK, "vocab_size": 64, **kw})


# ---- configs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,dims", [("B", (768, 12, 12)), ("L", (1024, 24, 16)), ("XL", (1280, 36, 20))])
def test_paper_configs_are_llamagen_sizes_with_the_recipe(name, dims):
    cfg = load_config(ROOT / "configs" / "generator" / f"{name}.yaml")
    args = cfg["model"]["init_args"]
    assert args["preset"] == name and (PRESETS[name].dim, PRESETS[name].depth, PRESETS[name].heads) == dims
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["trainer"]["strategy"] == "ddp"
    assert (args["lr"], tuple(args["betas"]), args["weight_decay"], args["grad_clip"]) == (1e-4, (0.9, 0.95), 0.05, 1.0)
    assert args["overrides"]["class_dropout_prob"] == 0.1 and args["min_lr_ratio"] == 1.0  # constant lr
    header = (ROOT / "configs" / "generator" / f"{name}.yaml").read_text().split("base:")[0]
    for word in ("lr 1e-4", "betas (0.9, 0.95)", "weight decay 0.05", "batch 256", "300 epochs", "label (class) "
                 "dropout 0.1", "CONSTANT lr", "no EMA"):  # fmt: skip
        assert word in header, (name, word)


# ---- chunked cross-entropy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("max_logits", [1, 7 * 50, 10**9])  # one row per chunk, uneven chunks, one chunk
def test_chunked_cross_entropy_equals_plain(dtype, max_logits):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, dtype=dtype, generator=g, requires_grad=True)  # [N, C]
    w = torch.randn(50, 16, dtype=dtype, generator=g, requires_grad=True)  # [V, C]
    t = torch.randint(0, 50, (23,), generator=g)
    ref = F.cross_entropy(h @ w.T, t)
    ref_gh, ref_gw = torch.autograd.grad(3.0 * ref, (h, w))  # a non-unit upstream gradient
    got = linear_cross_entropy(h, w, t, max_logits=max_logits)
    gh, gw = torch.autograd.grad(3.0 * got, (h, w))
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got, ref.to(got.dtype), **tol)
    torch.testing.assert_close(gh, ref_gh, **tol)
    torch.testing.assert_close(gw, ref_gw, **tol)


def test_chunked_cross_entropy_under_bf16_autocast_matches_the_head():
    """Inside autocast the matmuls run in bf16 like nn.Linear, the log-softmax in fp32."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = torch.randn(64, 32, generator=g, requires_grad=True)
    t = torch.randint(0, 64, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t)
        got = linear_cross_entropy(h, w, t, max_logits=64 * 8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # same bf16 logits, same fp32 reduction
    grads = [torch.autograd.grad(loss, (h, w)) for loss in (ref, got)]
    for a, b in zip(*grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-2)  # bf16 gradient matmuls, summed in another order


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an operator returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_gpt_chunked_loss_equals_logits_loss_and_never_holds_all_logits():
    m = small_gpt(vocab_size=512)
    ids = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    ref = m(ids, labels, drop_labels=False).loss
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    with LargestTensor() as seen:
        out = m(ids, labels, drop_labels=False, return_logits=False, max_loss_logits=512 * 8)
        grads = torch.autograd.grad(out.loss, list(m.parameters()))
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    # the whole batch's logits: 8 x 16 x 512 = 65536 values; a chunk: 8 rows x 512; the largest weight: 512 x 64
    assert seen.largest == 512 * 64 < 8 * 16 * 512, seen.largest


# ---- range checks ------------------------------------------------------------------------------------------
def test_check_ids_compares_in_int64():
    m = small_gpt(vocab_size=300)
    m.check_ids(torch.tensor([[0, 200]], dtype=torch.uint8))  # 300 does not fit uint8: must not wrap to 44
    m.check_ids(torch.tensor([[0, 299]], dtype=torch.int16))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 300\), got \[-56, 0\]"):
        m.check_ids(torch.tensor([[0, -56]], dtype=torch.int8))
    small = small_gpt(vocab_size=100)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 100\), got \[0, 200\]"):
        small.check_ids(torch.tensor([[0, 200]], dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.float32"):
        small.check_ids(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\].*got \[0, 250\]"):
        small.check_labels(torch.tensor([0, 250], dtype=torch.uint8))


# ---- training: the B recipe, shrunk --------------------------------------------------------------------------
def write_shards(root: Path, n: int = 192) -> None:
    """One template sequence per class, 20% of the tokens noise: learnable in a few steps."""
    from data.tokens import TokenShardWriter

    rng = np.random.default_rng(0)
    templates = rng.integers(0, 32, (4, 16))
    labels = rng.integers(0, 4, n)
    ids = templates[labels]
    noise = rng.random(ids.shape) < 0.2
    ids[noise] = rng.integers(0, 32, noise.sum())
    with TokenShardWriter(str(root), num_tokens=16, codebook_size=32, shard_size=100, num_classes=4) as w:
        w.write(ids, labels, [f"s{i}" for i in range(n)])


def b_module(**changes) -> tuple[GeneratorModule, dict]:
    """configs/generator/B.yaml's module with the model shrunk to tiny and the fused AdamW of a CUDA run."""
    cfg = load_config(ROOT / "configs" / "generator" / "B.yaml")
    args = dict(cfg["model"]["init_args"])
    args.update(preset="tiny", overrides={**args["overrides"], **SHRINK}, fused_optimizer=True, tokenizer_dir=None,
                num_val_samples=0, lr=3e-3, max_loss_logits=32 * 16)  # fmt: skip
    args.update(changes)
    return GeneratorModule(**args), cfg["trainer"]


def fit(module, tmp_path, steps: int, precision: str, callbacks=(), log_every: int = 4) -> pl.Trainer:
    from data.tokens import TokenDataModule

    write_shards(tmp_path / "tokens")
    trainer = quiet_trainer(max_steps=steps, devices=1, precision=precision, limit_val_batches=0,
                            log_every_n_steps=log_every, callbacks=list(callbacks))  # fmt: skip
    trainer.fit(module, datamodule=TokenDataModule(str(tmp_path / "tokens"), batch_size=16))
    return trainer


def test_b_config_shrunk_trains_bf16_mixed_with_fused_adamw(tmp_path):
    pl.seed_everything(0)
    module, trainer_cfg = b_module()
    assert trainer_cfg["precision"] == "bf16-mixed"
    record = LossRecorder()
    before = [p.detach().clone() for p in module.gpt.parameters()]
    trainer = fit(module, tmp_path, 12, trainer_cfg["precision"], [record])
    losses = record.losses
    assert module.optimizers().optimizer.defaults["fused"], "the optimizer a CUDA run builds"
    assert trainer.global_step == 12 and len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert all(not torch.equal(a, b) for a, b in zip(before, module.gpt.parameters()))
    assert torch.isfinite(trainer.callback_metrics["train/grad_norm"])


def test_steady_state_generator_step_makes_no_host_sync(tmp_path):
    """Forward (chunked loss), backward, sync-free clipping, fused AdamW step and the lr scheduler, and Lightning's
    hooks after the step: nothing that would sync the host on CUDA, except on logging steps. Batches 0-1 are warm-up
    (optimizer state)."""
    pl.seed_everything(0)
    module, trainer_cfg = b_module()
    audit = StepSyncAudit(start=2)
    # ids and labels made in advance: the shards' loader builds tensors from Python data in this process
    # (num_workers=0), which the audit's window (it fetches the next batch) would count
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 32, (12 * 16, 16), generator=g), torch.randint(0, 4, (12 * 16,), generator=g)
    trainer = quiet_trainer(max_steps=12, devices=1, precision=trainer_cfg["precision"], limit_val_batches=0,
                            log_every_n_steps=5, callbacks=[audit])  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(ids, labels), batch_size=16))
    quiet = [(i, found) for i, logging, found in audit.rows if not logging]
    assert len(audit.rows) == 10 and len(quiet) == 8
    synced = audit.quiet_syncs()
    assert not synced, f"host syncs on non-logging steps: {synced}; first at {audit.sites[min(synced)]}"
    assert any(found for _, logging, found in audit.rows if logging), "the detector sees the logging steps' reads"


# ---- the static / compiled decode step -----------------------------------------------------------------------
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_static_decode_step_equals_the_growing_cache(cfg_scale):
    m = small_gpt().eval()
    labels = torch.tensor([0, 3])
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    rows = 4 if cfg_scale != 1.0 else 2
    growing, static = KVCache(m, rows, max_len=16), KVCache(m, rows, max_len=16)
    positions = torch.arange(16)
    with torch.no_grad():
        for t in range(16):
            ref = next_token_logits(m, labels, ids[:, :t], cfg_scale, growing)  # [2, V]
            if t == 0:
                got = next_token_logits(m, labels, ids[:, :0], cfg_scale, static)  # the class token, as generate
            else:
                got = decode_step(m, ids[:, t - 1 : t], positions[t : t + 1], static, cfg_scale)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_decode_step_traces_whole_and_samples_the_same_ids(backend):
    """fullgraph=True: the step traces as one graph (no graph break) and, with the same seeds, the compiled
    sampling loop draws exactly the ids of the eager loop. (inductor / CUDA graphs: scripts/gpu_check.sh.)"""
    torch._dynamo.reset()
    m = small_gpt().eval()
    labels = torch.tensor([1, 2, 0])
    for kw in (dict(greedy=True), dict(temperature=1.0, top_k=10, cfg_scale=2.0)):
        ref = generate(m, labels, 12, generator=torch.Generator().manual_seed(0), **kw)
        got = generate(m, labels, 12, generator=torch.Generator().manual_seed(0), compile_step=True,
                       compile_options={"backend": backend}, **kw)  # fmt: skip
        assert torch.equal(got, ref), kw
    assert compiled_decode_step({"backend": backend}) is compiled_decode_step({"backend": backend})
    with pytest.raises(ValueError, match="use_kv_cache"):
        generate(m, labels, 4, compile_step=True, use_kv_cache=False)


@pytest.mark.cpu_bf16_attention
def test_bench_train_times_the_generator_step():
    """scripts/bench_train.py on a generator config: the last line is one JSON object with the throughput, FLOPs
    and the sync check of the timed steps (bf16-mixed, fused AdamW as on CUDA)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "scripts/bench_train.py", "--config", "configs/generator/tiny.yaml",
                           "--device", "cpu", "--precision", "bf16-mixed", "--batch-size", "4", "--steps", "2",
                           "--warmup", "1", "--check-syncs", "--vocab-size", "512"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["model"] == "generator" and out["syncs_checked"] and out["vocab_size"] == 512
    assert out["tokens_per_s"] == pytest.approx(out["img_per_s"] * out["max_tokens"]) and out["img_per_s"] > 0
    # FLOPs per sequence are at least 6 x (non-embedding parameters) x tokens (forward + backward of the matmuls)
    assert out["tflop_per_img"] * 1e12 >= 6 * 0.9 * (out["params_m"] * 1e6 - 2 * 512 * 192) * out["max_tokens"]
