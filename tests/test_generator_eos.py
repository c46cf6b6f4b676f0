"""The end-of-image token: a GPT trained on variable-length token records learns where each image ends, and
sampling stops there by itself (per sample, also under CFG), with the lengths of the training data.

Also: the chunked cross-entropy with ignored targets equals F.cross_entropy(ignore_index=...), the training
targets put END right after each record, and `generate` without stopping never draws END."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _small_training import quiet_trainer

from data.tokens import TokenDataModule, TokenShardWriter, read_meta
from tokenizer.generator import GPT, GPTConfig, Sampled, generate, linear_cross_entropy
from tokenizer.generator.end_token import end_token_sequences
from tokenizer.generator.lightning import GeneratorModule
from tokenizer.generator.loss import IGNORE_INDEX
from tokenizer.gpu import HostSyncDetector

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, K, CLASSES = 16, 8, 3
# per class: the lengths its records have (each equally often). Class 2 fills all K tokens: it never ends early.
CLASS_LENGTHS = {0: [2], 1: [4, 5], 2: [K]}


def test_chunked_cross_entropy_with_ignored_targets_equals_plain(one_thread):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 12, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 12, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (37,), generator=g)
    targets[torch.rand(37, generator=g) < 0.4] = IGNORE_INDEX  # about 15 ignored rows, spread over chunks
    assert 5 < int((targets == IGNORE_INDEX).sum()) < 30
    for max_logits in (9 * 4, 9 * 37, 1):  # 4 rows per chunk, one chunk, one row per chunk
        loss = linear_cross_entropy(hidden, weight, targets, max_logits=max_logits)
        gh, gw = torch.autograd.grad(loss * 1.7, (hidden, weight))
        ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX)
        rh, rw = torch.autograd.grad(ref * 1.7, (hidden, weight))
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(gh, rh, rtol=0, atol=1e-12)
        torch.testing.assert_close(gw, rw, rtol=0, atol=1e-12)
        assert gh[targets == IGNORE_INDEX].abs().max() == 0  # an ignored row gets no gradient
    other = torch.where(targets == IGNORE_INDEX, torch.full_like(targets, 3), targets)  # another ignore value
    loss = linear_cross_entropy(hidden, weight, torch.where(targets == IGNORE_INDEX, 99, targets), ignore_index=99)
    assert torch.allclose(loss, F.cross_entropy(hidden @ weight.T, targets)) and not torch.allclose(
        loss, F.cross_entropy(hidden @ weight.T, other))


def test_end_token_targets_and_loss(one_thread):
    ids = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 9]])
    inputs, targets = end_token_sequences(ids, torch.tensor([3, 5]), end_id=16)
    assert inputs.tolist() == [[5, 6, 7, 16, 16], [1, 2, 3, 4, 9]]
    assert targets.tolist() == [[5, 6, 7, 16, IGNORE_INDEX], [1, 2, 3, 4, 9]]  # full length: no END target

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, max_tokens=5, num_classes=2, dim=32, depth=1, heads=2, end_token=True))
    assert model.head.out_features == model.tok_emb.num_embeddings == 17
    model.eval()
    labels, lengths = torch.tensor([0, 1]), torch.tensor([3, 5])
    out = model(ids, labels, lengths=lengths)
    # the same loss by hand: the logits of the END-filled inputs, mean CE over the 4 + 5 counted positions
    logits = model(inputs, labels, check_values=False).logits  # [2, 5, 17]; row 0 is fed END, as in sampling
    per_pos = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")  # [2, 5]
    torch.testing.assert_close(out.loss, per_pos[targets != IGNORE_INDEX].mean())
    chunked = model(ids, labels, lengths=lengths, return_logits=False, max_loss_logits=17 * 3)
    torch.testing.assert_close(chunked.loss, out.loss)
    with pytest.raises(ValueError, match="end_token=True"):
        GPT(GPTConfig(vocab_size=16, max_tokens=5, num_classes=2, dim=32, depth=1, heads=2))(ids, labels,
                                                                                             lengths=lengths)
    with pytest.raises(ValueError, match=">= 1"):
        model(ids, labels, lengths=torch.tensor([0, 5]))


def write_variable_length_shards(root: str, n: int = 600, seed: int = 0) -> dict[int, np.ndarray]:
    """Records of class c have a length drawn from CLASS_LENGTHS[c]; the ids are a noisy per-class template.
    Returns {class: the lengths written}."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, VOCAB, (CLASSES, K))
    labels = np.arange(n) % CLASSES
    lengths = np.array([CLASS_LENGTHS[c][(i // CLASSES) % len(CLASS_LENGTHS[c])] for i, c in enumerate(labels)])
    ids = templates[labels]
    noise = rng.random(ids.shape) < 0.2
    ids[noise] = rng.integers(0, VOCAB, noise.sum())
    with TokenShardWriter(root, num_tokens=K, codebook_size=VOCAB, shard_size=256, num_classes=CLASSES,
                          variable_length=True, length_target={"synthetic": "by class"}) as w:
        w.write(ids, labels, [f"r{i}" for i in range(n)], lengths)
    return {c: lengths[labels == c] for c in range(CLASSES)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A tiny end-token GPT trained by Lightning on variable-length shards (what `train.py fit` runs)."""
    root = str(tmp_path_factory.mktemp("eos") / "tokens")
    written = write_variable_length_shards(root)
    torch.manual_seed(0)
    dm = TokenDataModule(root, batch_size=64, val_fraction=0.1)
    module = GeneratorModule(preset="tiny", overrides=dict(vocab_size=VOCAB, max_tokens=K, num_classes=CLASSES,
                             dim=64, depth=2, heads=4, end_token=True, class_dropout_prob=0.1),
                             lr=3e-3, warmup_steps=10, num_val_samples=6, sample_cfg_scale=2.0)  # fmt: skip
    trainer = quiet_trainer(max_steps=250, devices=1, val_check_interval=250, check_val_every_n_epoch=None,
                            num_sanity_val_steps=0, limit_val_batches=1)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert 1 <= float(trainer.callback_metrics["val/sample_mean_length"]) <= K  # validation sampled and stopped
    return module.gpt.eval(), written, read_meta(root)


def total_variation(a: np.ndarray, b: np.ndarray) -> float:
    """Half the L1 distance between the empirical distributions of two integer samples."""
    support = np.union1d(a, b)
    pa = np.array([(a == v).mean() for v in support])
    pb = np.array([(b == v).mean() for v in support])
    return 0.5 * float(np.abs(pa - pb).sum())


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_sampling_stops_at_the_trained_lengths(trained, cfg_scale):
    model, written, meta = trained
    assert meta["variable_length"] and meta["length_target"] == {"synthetic": "by class"}
    assert meta["lengths"]["histogram"] == {"2": 200, "4": 100, "5": 100, "8": 200}
    per_class = 200
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(1)
    out = generate(model, labels, cfg_scale=cfg_scale, generator=gen, end_check_every=2)
    assert isinstance(out, Sampled) and out.ids.shape == (len(labels), K)
    ids, lengths = out
    pos = torch.arange(K)
    assert (ids[pos >= lengths[:, None]] == 0).all() and (ids < VOCAB).all()  # padded with 0, no END id left
    for c in range(CLASSES):
        got = lengths[labels == c].numpy()
        tv = total_variation(got, written[c])
        assert tv <= 0.12, (c, cfg_scale, np.unique(got, return_counts=True), tv)
        assert abs(got.mean() - written[c].mean()) <= 0.3, (c, got.mean(), written[c].mean())


def test_stopping_is_per_sample_and_fixed_k_never_ends(trained):
    model, _, _ = trained
    labels = torch.tensor([0, 2, 1])
    ids, lengths = generate(model, labels, greedy=True, end_check_every=1)
    assert lengths[0] == 2 and lengths[1] == K, lengths  # class 0 ends after 2 tokens, class 2 never
    # the loop stops as soon as every sample has ended (all class-0 rows end after 2 tokens): counted by the
    # host reads of "all ended?", one per end_check_every tokens
    with HostSyncDetector() as rec:
        short = generate(model, torch.zeros(4, dtype=torch.long), greedy=True, end_check_every=1)
    assert short.lengths.tolist() == [2, 2, 2, 2] and (short.ids[:, 2:] == 0).all()
    reads_short = rec.found["aten._local_scalar_dense.default"]
    with HostSyncDetector() as rec:
        generate(model, torch.full((4,), 2), greedy=True, end_check_every=4)  # class 2: never ends, k = 8 tokens
    assert set(rec.found) <= {"aten._local_scalar_dense.default"}, rec.found  # no upload, mask or multinomial
    reads_long = rec.found["aten._local_scalar_dense.default"]
    with HostSyncDetector() as rec:
        generate(model, torch.full((4,), 2), greedy=True, stop_at_end=False)
    setup_reads = rec.found["aten._local_scalar_dense.default"]  # the CPU range check of the labels
    assert reads_short == setup_reads + 3  # "all ended?" after tokens 1, 2 and the END drawn third: stop
    assert reads_long == setup_reads + 1  # after token 4 of 8 only (never after the last token)
    # the same draws with and without the KV cache, and greedy stopping is deterministic
    a = generate(model, labels, generator=torch.Generator().manual_seed(5))
    b = generate(model, labels, generator=torch.Generator().manual_seed(5), use_kv_cache=False)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.lengths, b.lengths)
    # stop_at_end=False: END is masked, exactly k ids in the codebook, a plain tensor as for fixed-length models
    fixed = generate(model, torch.zeros(64, dtype=torch.long), num_tokens=6, stop_at_end=False,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert isinstance(fixed, torch.Tensor) and fixed.shape == (64, 6) and int(fixed.max()) < VOCAB
    with pytest.raises(ValueError, match="end token"):
        generate(GPT(GPTConfig(vocab_size=VOCAB, max_tokens=K, num_classes=CLASSES, dim=32, depth=1, heads=2)),
                 labels, stop_at_end=True)  # fmt: skip


def test_variable_length_shards_need_an_end_token_model(trained, tmp_path):
    root = str(tmp_path / "tokens")
    write_variable_length_shards(root, n=30)
    dm = TokenDataModule(root, batch_size=8)
    dm.setup("fit")
    ids, labels, lengths = next(iter(dm.train_dataloader()))
    assert ids.shape == (8, K) and lengths.shape == (8,) and lengths.dtype == torch.int64
    module = GeneratorModule(preset="tiny", overrides=dict(vocab_size=VOCAB, max_tokens=K, num_classes=CLASSES,
                             dim=32, depth=1, heads=2), num_val_samples=0)  # fmt: skip
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(ValueError, match="end_token: true"):
        trainer.fit(module, datamodule=dm)


def test_sample_and_gfid_commands_at_natural_lengths(trained, tmp_path):
    """eval.sample_generator / eval.gfid_sweep with `--num-tokens 2 natural`: the natural set stops at the end
    token (lengths per class as trained), each image is tok.decode(ids, lengths=...) of its sample, and the
    length distribution and a "natural" gFID row are reported beside the fixed k."""
    import json

    from eval import gfid_sweep
    from eval.sample_generator import decode, sample_seed, to_uint8_hwc
    from eval.sample_generator import main as sample_main
    from tokenizer import OneDTokenizer

    model, written, _ = trained
    torch.manual_seed(0)
    tok = OneDTokenizer.from_preset("tiny", enc_depth=1, dec_depth=1, max_tokens=K, codebook_size=VOCAB)
    tok.save_pretrained(tmp_path / "tok")
    model.save_pretrained(tmp_path / "gpt")
    common = ["--gpt", str(tmp_path / "gpt"), "--tokenizer", str(tmp_path / "tok"), "--cpu", "--num-samples",
              "30", "--batch-size", "16", "--no-progress"]  # fmt: skip
    out = tmp_path / "samples"
    res = sample_main([*common, "--out", str(out), "--num-tokens", "2", "natural"])
    assert res["num_tokens"] == [2, "natural"] and (out / "grid.png").exists()  # the grid: fixed k only
    with np.load(out / "samples_natural.npz") as z:
        arr, labels, lengths = z["arr_0"], z["arr_1"], z["lengths"]
    for c in range(CLASSES):  # class 0 stops at 2 tokens, class 1 at 4 or 5, class 2 runs to K
        assert np.isin(lengths[labels == c], CLASS_LENGTHS[c]).mean() >= 0.8, (c, lengths[labels == c])
    # the images are the first chunk's samples, each decoded at its own length
    ids, chunk_lengths = generate(model, torch.arange(16) % CLASSES, generator=torch.Generator().manual_seed(
        sample_seed("eval", 0, "natural", 0)))  # fmt: skip
    assert torch.equal(chunk_lengths, torch.from_numpy(lengths[:16]))
    np.testing.assert_array_equal(arr[:16], to_uint8_hwc(decode(tok, ids, lengths=chunk_lengths)))
    with np.load(out / "samples_k002.npz") as z:
        assert (z["lengths"] == 2).all()
    report = json.loads((out / "sampling.json").read_text())["lengths"]
    assert report["natural"]["mean"] == pytest.approx(float(lengths.mean()))
    assert sum(report["natural"]["histogram"].values()) == 30 and report["2"]["histogram"] == {"2": 30}
    assert "| natural | " in (out / "lengths.md").read_text()
    with pytest.raises(SystemExit, match="end token"):  # a fixed-length GPT has no natural length
        GPT(GPTConfig(vocab_size=VOCAB, max_tokens=K, num_classes=CLASSES, dim=32, depth=1, heads=2)).save_pretrained(
            tmp_path / "plain")
        sample_main(["--gpt", str(tmp_path / "plain"), *common[2:], "--out", str(tmp_path / "x"), "--num-tokens",
                     "natural"])  # fmt: skip

    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=arr)  # a reference batch of images only: its statistics are computed
    sweep = tmp_path / "sweep"
    rows = gfid_sweep.main([*common, "--num-tokens", "2", "natural", "--cfg-scales", "2.0", "--ref-batch", str(ref),
                            "--out", str(sweep)],
                           extractor=lambda x: F.adaptive_avg_pool2d(x.double() / 255, 2).flatten(1))["rows"][2.0]
    assert set(rows) == {2, "natural"} and rows["natural"]["num_samples"] == 30
    assert rows["natural"]["lengths"]["max"] <= K and rows[2]["lengths"]["histogram"] == {"2": 30}
    table = (sweep / "sweep.md").read_text()
    assert f"| 2 | natural (mean {rows['natural']['lengths']['mean']:.1f}) | 30 |" in table
    assert (sweep / "gfid_vs_k.png").stat().st_size > 1000
