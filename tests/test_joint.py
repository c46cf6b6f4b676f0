"""Cross-length joint training (NesTok) and per-position codebook usage."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _small_training import SMALL, data, fresh_start, trainer

from tokenizer import OneDTokenizer
from tokenizer.quantizer import position_histogram, usage_per_position
from tokenizer.training import TokenizerModule
from tokenizer.training.codebook import CodebookMonitor


@pytest.mark.parametrize("mechanism", ["tail_token_drop", "nested_dropout"])
def test_joint_step_decodes_all_tokens_and_the_drawn_prefix_like_the_public_decode(mechanism):
    torch.manual_seed(0)
    model = OneDTokenizer.from_preset("tiny", **SMALL, length_mechanism=mechanism, cross_length_joint=True)
    images = torch.rand(3, 3, 32, 32)
    restart = fresh_start(model)
    restart()
    out = model.train()(images)
    assert out.prefix_recon is not None and out.prefix_recon.shape == images.shape
    assert torch.equal(out.lengths, torch.full((3,), model.max_tokens))
    restart()  # the codebook as the training forward used it
    ids = model.encode(images)
    torch.testing.assert_close(model.decode(ids), ((out.recon + 1) / 2).clamp(0, 1), atol=1e-5, rtol=1e-4)
    for i, k in enumerate(out.prefix_lengths.tolist()):
        prefix = model.decode(ids[i : i + 1, :k])
        torch.testing.assert_close(prefix, ((out.prefix_recon[i : i + 1] + 1) / 2).clamp(0, 1), atol=1e-5,
                                   rtol=1e-4, msg=lambda m, i=i, k=k: f"sample {i}, k={k}: {m}")
    # eval mode and explicit lengths decode once, as without joint training
    assert model.eval()(images).prefix_recon is None
    assert model.train()(images, num_tokens=2).prefix_recon is None


def test_joint_needs_a_length_mechanism():
    with pytest.raises(ValueError, match="cross_length_joint.*fixed"):
        OneDTokenizer.from_preset("tiny", **SMALL, length_mechanism="fixed", cross_length_joint=True)


def test_usage_per_position_of_hand_made_ids():
    ids = torch.tensor([[0, 1, 3], [0, 2, 3], [0, 3, 3], [0, 1, 3]])  # [B=4, K=3], V=4
    counts = position_histogram(ids, 4)
    assert counts.tolist() == [[4, 0, 0, 0], [0, 2, 1, 1], [0, 0, 0, 4]]
    assert usage_per_position(counts).tolist() == [0.25, 0.75, 0.25]


def test_codebook_monitor_flushes_full_windows_on_logging_steps_only():
    monitor = CodebookMonitor(codebook_size=4, window=2)
    monitor.add(torch.tensor([[0, 1]]))
    assert monitor.flush_if_due(True) is None, "window not full yet"
    monitor.add(torch.tensor([[0, 2]]))
    assert monitor.flush_if_due(False) is None, "not a logging step"
    monitor.add(torch.tensor([[0, 3]]))
    window = monitor.flush_if_due(True)
    assert window.usage_per_position.tolist() == [0.25, 0.75]
    assert window.usage.item() == 1.0 and window.dead_codes.item() == 0
    assert monitor.flush_if_due(True) is None, "a new window starts empty"


def test_joint_training_with_the_full_objective(tmp_path):
    """Both decodes go through the reconstruction, LPIPS and GAN terms; the step still trains, logs per-position
    usage, and keeps every parameter in the loss (DDP without find_unused_parameters)."""
    pl.seed_everything(0)
    try:
        module = TokenizerModule(preset="tiny", overrides={**SMALL, "cross_length_joint": True}, perceptual_weight=1.0,
                                 perceptual_subsample=2, gan_weight=0.1, lecam_weight=0.001, warmup_steps=1,
                                 codebook_window=2, joint_prefix_weight=0.5)
        module.lpips  # noqa: B018
    except FileNotFoundError as err:
        pytest.skip(f"LPIPS weights missing ({err}); run `make weights`")
    fit = trainer(8, "32-true", log_every=2)
    fit.fit(module, datamodule=data())
    metrics = fit.callback_metrics
    for key in ("train/recon", "train/lpips", "train/g_adv", "train/d_loss", "codebook/usage_per_position_mean"):
        assert torch.isfinite(metrics[key]), key
    assert 0 < metrics["codebook/usage_per_position_mean"] <= 1


@pytest.mark.slow  # two short trainings of the demo model (about a minute)
def test_bench_length_writes_a_row_per_mechanism_and_k(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "scripts/bench_length.py", "--steps", "3", "--out", str(tmp_path),
                           "--mechanisms", "fixed", "nested_dropout+joint"], cwd=root, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "length_ablation.json").read_text())
    assert [r["mechanism"] for r in report["results"]] == ["fixed", "nested_dropout+joint"]
    ks = [row["num_tokens"] for row in report["results"][0]["rows"]]
    assert ks == [1, 2, 4, 8, 16, 32, 64]  # the demo config: K = 64
    assert report["meta"]["usage_images"] == 4096
    table = (tmp_path / "length_ablation.md").read_text()
    assert table.count("| nested_dropout+joint |") == len(ks)
    assert (tmp_path / "fixed" / "model.safetensors").is_file()
