"""Generator GPT, sampling and its Lightning module: CPU, tiny, seconds."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _small_training import LossRecorder, quiet_trainer

from tokenizer.generator import (
    GPT,
    PRESETS,
    generate,
    next_token_logits,
    sample_from_logits,
    top_k_filter,
    top_p_filter,
)
from tokenizer.generator.gpt import preset_config
from tokenizer.generator.sampling import KVCache, cfg_mix

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(vocab_size=64, max_tokens=16, num_classes=4, dim=64, depth=2, heads=4)


def small_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT.from_preset("tiny", **{**SMALL, **kw})


# ---- model -------------------------------------------------------------------------------------------------
def test_forward_shapes_and_loss():
    m = small_gpt()
    ids = torch.randint(0, 64, (3, 16))
    out = m(ids, torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 16, 64) and out.logits.dtype == torch.float32
    assert abs(out.loss.item() - math.log(64)) < 0.3  # near-uniform at init
    assert m(ids[:, :5], None, compute_loss=False).loss is None  # a prefix, unconditional


def test_causal_and_position0_predicts_first_token():
    m = small_gpt().eval()
    ids = torch.randint(0, 64, (2, 16))
    labels = torch.tensor([1, 3])
    full = m(ids, labels).logits
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 64
    # logits[:, t] depend only on ids[:, :t]: changing ids[7:] leaves positions 0..7 unchanged
    torch.testing.assert_close(m(changed, labels).logits[:, :8], full[:, :8])
    assert not torch.allclose(m(changed, labels).logits[:, 8:], full[:, 8:])
    other = m(ids, torch.tensor([2, 0])).logits
    assert not torch.allclose(other[:, 0], full[:, 0])  # position 0 sees the class


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets(name):
    cfg = preset_config(name, vocab_size=16384, max_tokens=256)
    assert cfg.dim % cfg.heads == 0 and cfg.mlp_hidden % 64 == 0
    if name == "tiny":
        assert GPT(cfg).num_params() < 10e6
    with pytest.raises(TypeError):
        preset_config(name, not_a_field=1)
    with pytest.raises(ValueError):
        preset_config("nope")


def test_preset_param_counts_match_llamagen():
    # LlamaGen GPT-B/L: 111M/343M at vocab 16384 and 256 tokens; the real modules, built on the meta device
    # (shapes only, nothing allocated)
    for name, expected in (("B", 111e6), ("L", 343e6)):
        with torch.device("meta"):
            model = GPT(preset_config(name, vocab_size=16384, max_tokens=256))
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - expected) / expected < 0.01, (name, n)


def test_save_load_pretrained(tmp_path):
    m = small_gpt(num_classes=7, unconditional=False).eval()
    m.save_pretrained(str(tmp_path / "gpt"))
    m2 = GPT.from_pretrained(str(tmp_path / "gpt")).eval()
    assert m2.cfg == m.cfg
    ids = torch.randint(0, 64, (2, 16))
    assert torch.equal(m(ids, torch.tensor([1, 6])).logits, m2(ids, torch.tensor([1, 6])).logits)


def test_fresh_model_predicts_near_uniform_tokens():
    """What the small init is for: before training, every position's prediction is close to uniform over the
    vocabulary (loss ~ ln V), however deep the model, so early training is stable."""
    torch.manual_seed(0)
    for depth in (2, 8):
        m = GPT.from_preset("tiny", vocab_size=512, depth=depth, dim=256, heads=4, num_classes=10).eval()
        ids = torch.randint(0, 512, (4, 32))
        loss = m(ids, torch.randint(0, 10, (4,))).loss
        assert abs(loss.item() - math.log(512)) < 0.15, (depth, loss.item())  # unit-std init: > 10


def test_optim_groups_no_decay_on_norms_and_embeddings():
    m = small_gpt()
    decay, no_decay = m.optim_groups(0.05)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(m.tok_emb.weight) in no_decay_ids and id(m.class_emb.weight) in no_decay_ids
    assert id(m.norm.weight) in no_decay_ids and id(m.blocks[0].attn_norm.weight) in no_decay_ids
    assert id(m.head.weight) in {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_label_dropout_rate_and_unconditional():
    m = small_gpt(class_dropout_prob=0.1, num_classes=10).train()
    labels = torch.randint(0, 10, (20000,))
    out = m.condition_labels(labels, len(labels), "cpu")
    rate = (out == 10).float().mean().item()
    assert 0.09 < rate < 0.11
    kept = out != 10
    assert torch.equal(out[kept], labels[kept])
    m.eval()  # no dropout at eval
    assert torch.equal(m.condition_labels(labels, len(labels), "cpu"), labels)
    unc = small_gpt(unconditional=True, num_classes=10)
    assert (unc.condition_labels(labels, len(labels), "cpu") == 10).all()
    zero = small_gpt(num_classes=0)
    assert zero.class_emb.num_embeddings == 1
    ids = generate(zero, None, 5, batch_size=3, greedy=True)
    assert ids.shape == (3, 5)
    with pytest.raises(ValueError):
        m.condition_labels(torch.tensor([11]), 1, "cpu")


# ---- sampling ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_kv_cache_equals_full_recompute(k, cfg_scale):
    m = small_gpt(seed=k).double()  # fp64 so that an argmax near-tie cannot flip between the two paths
    labels = torch.tensor([0, 1, 2, 3, 3])
    a = generate(m, labels, k, cfg_scale=cfg_scale, greedy=True, use_kv_cache=True)
    b = generate(m, labels, k, cfg_scale=cfg_scale, greedy=True, use_kv_cache=False)
    assert a.shape == (5, k) and a.dtype == torch.int64
    assert torch.equal(a, b)
    # and sampled (not greedy) with the same seed
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = generate(m, labels, k, cfg_scale=cfg_scale, top_k=10, use_kv_cache=True, generator=g1)
    s2 = generate(m, labels, k, cfg_scale=cfg_scale, top_k=10, use_kv_cache=False, generator=g2)
    assert torch.equal(s1, s2)


def test_cached_logits_match_teacher_forcing():
    m = small_gpt().eval()
    labels = torch.tensor([2, 0])
    ids = torch.randint(0, 64, (2, 16))
    full = m(ids, labels).logits
    cache = KVCache(m, 2)
    for t in range(16):
        torch.testing.assert_close(
            next_token_logits(m, labels, ids[:, :t], cache=cache), full[:, t], atol=1e-5, rtol=1e-5
        )


def test_chunked_prefill_with_cache_matches_teacher_forcing():
    m = small_gpt().eval()
    labels = torch.tensor([1, 2])
    ids = torch.randint(0, 64, (2, 16))
    full = m(ids, labels).logits  # [2, 16, V]
    cache = KVCache(m, 2)
    first = m.transformer(m.embed(labels, ids[:, :4]), 0, cache)  # class + 4 ids: positions 0..4
    chunk = m.transformer(m.embed(None, ids[:, 4:10]), 5, cache)  # ids 4..9 at positions 5..10 (masked path)
    torch.testing.assert_close(torch.cat([first, chunk], 1), full[:, :11], atol=1e-5, rtol=1e-5)


def test_cfg_scale_one_is_conditional_and_mix_formula():
    m = small_gpt().eval()
    labels = torch.tensor([0, 3])
    ids = torch.randint(0, 64, (2, 6))
    cond = m.transformer(m.embed(labels, ids))[:, -1]
    assert torch.equal(next_token_logits(m, labels, ids, cfg_scale=1.0), cond)
    uncond = m.transformer(m.embed(torch.full_like(labels, 4), ids))[:, -1]
    torch.testing.assert_close(
        next_token_logits(m, labels, ids, cfg_scale=2.5), uncond + 2.5 * (cond - uncond)
    )
    both = torch.cat([cond, uncond])
    torch.testing.assert_close(cfg_mix(both, 1.0), cond)  # the mixing formula itself is exact at scale 1
    assert torch.equal(cfg_mix(both, 0.0), uncond)


def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, 5.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    kept = top_k_filter(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False], [False, False, False, True, True]]
    assert top_k_filter(logits, 1).isfinite()[0].tolist() == [False, True, False, True, False]  # ties kept
    for k in (None, 0, 5, 99):
        assert torch.equal(top_k_filter(logits, k), logits)


def test_top_p_filter():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    keep = lambda p: top_p_filter(logits, p).isfinite()[0].tolist()
    assert keep(0.5) == [True, False, False, False]  # top token alone reaches 0.5
    assert keep(0.6) == [True, True, False, False]
    assert keep(0.8) == [True, True, False, False]  # 0.5 + 0.3 = 0.8 >= 0.8
    assert keep(0.81) == [True, True, True, False]
    assert keep(0.0) == [True, False, False, False]  # always the top token
    assert keep(1.0) == [True] * 4
    tied = torch.tensor([[0.4, 0.2, 0.2, 0.2]]).log()  # boundary inside a tie: every tied token kept
    assert top_p_filter(tied, 0.5).isfinite()[0].tolist() == [True, True, True, True]
    assert top_p_filter(tied, 0.4).isfinite()[0].tolist() == [True, False, False, False]


def test_sample_from_logits_temperature_and_greedy():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0]]).repeat(2000, 1)
    assert (sample_from_logits(logits, temperature=0.0) == 1).all()  # argmax, first of the tie
    assert (sample_from_logits(logits, greedy=True, temperature=5.0) == 1).all()
    g = torch.Generator().manual_seed(0)
    s = sample_from_logits(logits, top_k=2, generator=g)
    assert set(s.tolist()) == {1, 3}
    cold = sample_from_logits(logits, temperature=0.05, generator=g)
    assert set(cold.tolist()) <= {1, 3}
    hot = sample_from_logits(logits, temperature=100.0, generator=g)
    assert np.bincount(hot.numpy(), minlength=4).min() > 400  # near uniform
    freq = np.bincount(sample_from_logits(logits, generator=g).numpy(), minlength=4) / 2000
    expected = torch.softmax(logits[0], 0).numpy()
    assert np.abs(freq - expected).max() < 0.04
    with pytest.raises(ValueError):
        sample_from_logits(logits, temperature=-1.0)


def test_generate_validates_and_restores_mode():
    m = small_gpt().train()
    with pytest.raises(ValueError):
        generate(m, torch.tensor([0]), 17)
    generate(m, torch.tensor([0]), 2)
    assert m.training


def test_overfit_reproduces_sequences_from_class_prefix():
    torch.manual_seed(0)
    m = GPT.from_preset(
        "tiny", vocab_size=64, max_tokens=16, num_classes=4, dim=64, depth=2, heads=4, class_dropout_prob=0.0
    )
    data = torch.randint(0, 64, (4, 16))
    labels = torch.arange(4)
    opt = torch.optim.AdamW(m.optim_groups(0.0), lr=3e-3)
    for _ in range(300):
        loss = m(data, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05
    assert torch.equal(generate(m, labels, 16, greedy=True), data)
    assert torch.equal(generate(m, labels, 7, greedy=True, use_kv_cache=False), data[:, :7])


# ---- Lightning ---------------------------------------------------------------------------------------------
def write_synthetic_shards(root: str, n: int = 256, k: int = 16, vocab: int = 32, classes: int = 4) -> None:
    """Each class has one template sequence; 20% of tokens are random noise. Learnable in a few steps."""
    from data.tokens import TokenShardWriter

    rng = np.random.default_rng(0)
    templates = rng.integers(0, vocab, (classes, k))
    labels = rng.integers(0, classes, n)
    ids = templates[labels]
    noise = rng.random((n, k)) < 0.2
    ids[noise] = rng.integers(0, vocab, noise.sum())
    with TokenShardWriter(root, num_tokens=k, codebook_size=vocab, shard_size=100, num_classes=classes) as w:
        w.write(ids, labels, [f"s{i}" for i in range(n)])


class _FakeTokenizer:
    def decode(self, ids):  # [B, k] -> [B, 3, 8, 8] in [0, 1]
        return (ids.float().mean(1) / 32).clamp(0, 1)[:, None, None, None].expand(-1, 3, 8, 8)


def test_lightning_training_loss_drops(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from data.tokens import TokenDataModule
    from tokenizer.generator.lightning import GeneratorModule

    write_synthetic_shards(str(tmp_path / "tokens"))
    dm = TokenDataModule(str(tmp_path / "tokens"), batch_size=32, val_fraction=0.1)
    module = GeneratorModule(
        preset="tiny",
        overrides=dict(vocab_size=32, max_tokens=16, num_classes=4, dim=64, depth=2, heads=4),
        lr=3e-3,
        warmup_steps=5,
        num_val_samples=4,
        sample_cfg_scale=2.0,
    )
    module.set_tokenizer(_FakeTokenizer())
    record = LossRecorder()
    trainer = quiet_trainer(max_steps=30, devices=1, logger=TensorBoardLogger(str(tmp_path)), val_check_interval=30,
                            check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0,
                            callbacks=[record], log_every_n_steps=5)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    losses = record.losses
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3]), losses  # ~3.4 -> ~1.9 in 30 steps
    metrics = trainer.callback_metrics
    assert "val/loss" in metrics and "train/lr" in metrics and "val/sample_unique_frac" in metrics
    assert metrics["val/loss"] < np.mean(losses[:3])
    assert module._tokenizer is not None and "_tokenizer" not in dict(module.named_children())
    assert not any("tokenizer" in k for k in module.state_dict())
    events = [f for _, _, fs in os.walk(tmp_path / "lightning_logs") for f in fs if f.startswith("events")]
    assert events
    # the learning rate followed the shared warmup + cosine schedule: 3e-3 reached after 5 warmup steps, then decayed
    lrs = [e.value for e in _scalars(tmp_path / "lightning_logs", "train/lr")]
    assert lrs and max(lrs) <= 3e-3 * (1 + 1e-6) and lrs[-1] < 3e-3


def test_lightning_module_rejects_mismatched_data(tmp_path):
    from data.tokens import TokenDataModule
    from tokenizer.generator.lightning import GeneratorModule

    write_synthetic_shards(str(tmp_path / "tokens"), n=40)
    module = GeneratorModule(
        overrides=dict(vocab_size=16, max_tokens=16, num_classes=4, dim=64, depth=1, heads=4)
    )
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(ValueError, match="vocab_size"):
        trainer.fit(module, datamodule=TokenDataModule(str(tmp_path / "tokens"), batch_size=8))


def test_lightning_checks_token_values_once_at_setup(tmp_path):
    """GPT.forward range-checks CPU tensors only (on a GPU every batch would sync the host), so the module
    checks the loaded token arrays once, at setup, with the same error: here labels -1 (a data set without
    classes) for a class-conditional model."""
    from data.tokens import TokenDataModule, TokenShardWriter
    from tokenizer.generator.lightning import GeneratorModule

    root = str(tmp_path / "tokens")
    with TokenShardWriter(root, num_tokens=16, codebook_size=16, shard_size=100) as w:
        w.write(np.zeros((20, 16), np.int64), np.full(20, -1), [f"s{i}" for i in range(20)])
    module = GeneratorModule(overrides=dict(vocab_size=16, max_tokens=16, num_classes=4, dim=64, depth=1, heads=4))
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\].*got \[-1, -1\]") as err:
        trainer.fit(module, datamodule=TokenDataModule(root, batch_size=8))
    assert any(entry.name == "setup" for entry in err.traceback)  # raised at setup, not in a step
    m = small_gpt()
    with pytest.raises(ValueError, match=r"ids must be in \[0, 64\), got \[0, 64\]"):
        m.check_ids(torch.tensor([[0, 64]]))
    m.check_labels(torch.tensor([0, 4]))  # 4 = the null class is a valid label


def test_models_saved_with_the_old_field_name_still_load(tmp_path):
    """block_size was renamed max_tokens (one word for K across the project); old saves and configs load."""
    import json

    m = small_gpt().eval()
    m.save_pretrained(tmp_path / "gpt")
    for name in ("config.json",):
        meta = json.loads((tmp_path / "gpt" / name).read_text())
        meta["config"]["block_size"] = meta["config"].pop("max_tokens")
        (tmp_path / "gpt" / name).write_text(json.dumps(meta))
    # the weights' own metadata carries the config as saved then: rewrite it the old way too
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "gpt" / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "onedtok-gpt/1",
                                                               "config": json.dumps(meta["config"], sort_keys=True)})
    old = GPT.from_pretrained(tmp_path / "gpt").eval()
    assert old.cfg == m.cfg
    assert preset_config("tiny", block_size=8).max_tokens == 8
    with pytest.raises(ValueError, match="both 'block_size'"):
        preset_config("tiny", block_size=8, max_tokens=8)


def _scalars(log_dir, tag: str) -> list:
    """Every logged event of a TensorBoard scalar below log_dir, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            events += acc.Scalars(tag)
    return sorted(events, key=lambda e: e.step)
