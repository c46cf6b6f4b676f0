"""Cross-length joint training (NesTok) and per-position codebook usage."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _small_training import SMALL, data, fresh_start, trainer
from _weights_probe import needs_lpips

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


class JointAudit(pl.Callback):
    """What each training step fed the three loss terms: the tokenizer's output and input (a forward hook), the
    discriminator's inputs and logits (a forward hook), which tokenizer parameters had no gradient when the
    generator's optimizer stepped, and, on logging steps, the logged loss values."""

    def __init__(self, module: TokenizerModule):
        self.steps, self.no_grad = [], []
        module.tokenizer.register_forward_hook(self._tokenizer_forward)
        module.discriminator.register_forward_hook(self._discriminator_forward)

    def _tokenizer_forward(self, tokenizer, args, out):
        self.step["images"], self.step["out"] = args[0].detach().clone(), out

    def _discriminator_forward(self, disc, args, logits):
        # the generator-side call is the one whose input still requires grad (the reconstruction itself)
        side = "g" if args[0].requires_grad else "d"
        self.step.setdefault(side, []).append((args[0].detach().clone(), logits.detach().clone()))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.step = {"logging": module.is_logging_step()}
        self.steps.append(self.step)

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if optimizer is module.optimizers()[0].optimizer:  # the tokenizer's (generator's) optimizer
            self.no_grad.append([n for n, p in module.tokenizer.named_parameters() if p.grad is None])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.step["logging"]:
            self.step["logged"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}


@needs_lpips
def test_joint_training_with_the_full_objective():
    """Both decodes go through the reconstruction, LPIPS and GAN terms; the step still trains, logs per-position
    usage, and keeps every parameter in the loss (DDP without find_unused_parameters)."""
    pl.seed_everything(0)
    full_w, prefix_w, subsample = 1.0, 0.5, 2
    module = TokenizerModule(preset="tiny", overrides={**SMALL, "cross_length_joint": True}, perceptual_weight=1.0,
                             perceptual_subsample=subsample, gan_weight=0.1, lecam_weight=0.001, warmup_steps=1,
                             codebook_window=2, joint_full_weight=full_w, joint_prefix_weight=prefix_w)
    audit = JointAudit(module)
    before = {n: p.detach().clone() for n, p in [*module.tokenizer.named_parameters(),
                                                 *module.discriminator.named_parameters()]}  # fmt: skip
    fit = trainer(8, "32-true", callbacks=[audit], log_every=2)
    fit.fit(module, datamodule=data())

    # every step: the discriminator judged both decodes in the generator's loss and took both as fakes in its own
    assert len(audit.steps) == 4  # 8 optimizer steps = 4 batches of a generator and a discriminator step
    k_max = module.tokenizer.max_tokens
    assert any(s["out"].prefix_lengths.min() < k_max for s in audit.steps), "a prefix shorter than K was drawn"
    for step in audit.steps:
        out = step["out"]
        assert out.prefix_recon is not None and 1 <= out.prefix_lengths.min() <= out.prefix_lengths.max() <= k_max
        both = torch.cat([out.recon, out.prefix_recon]).detach()  # [2B, 3, H, W]
        (g_input, _), = step["g"]
        (real, _), (fake, _) = step["d"]
        assert torch.equal(g_input, both) and torch.equal(fake, both)
        assert torch.equal(real, step["images"] * 2 - 1)

    # on logging steps, each logged term is the weighted sum of that term over the two decodes
    logged = [s for s in audit.steps if s["logging"]]
    assert len(logged) == 2
    for step in logged:
        out, target = step["out"], step["images"] * 2 - 1
        decodes = [(out.recon.detach(), full_w), (out.prefix_recon.detach(), prefix_w)]
        recon = sum(w * F.mse_loss(r, target) for r, w in decodes)
        with torch.no_grad():
            lpips = sum(w * module.lpips(r[:subsample], target[:subsample]).mean() for r, w in decodes)
        (_, logits), = step["g"]
        b = target.shape[0]
        g_adv = full_w * -logits[:b].mean() + prefix_w * -logits[b:].mean()
        for name, expected in (("recon", recon), ("lpips", lpips), ("g_adv", g_adv)):
            assert step["logged"][f"train/{name}"] == pytest.approx(float(expected), rel=1e-5), name
        assert math.isfinite(step["logged"]["train/d_loss"])

    # every tokenizer parameter had a gradient at every generator step (none unused: DDP needs no graph walk),
    # and every parameter of both networks moved
    assert audit.no_grad == [[]] * 4
    moved = {n: not torch.equal(p, before[n]) for n, p in [*module.tokenizer.named_parameters(),
                                                           *module.discriminator.named_parameters()]}  # fmt: skip
    assert all(moved.values()), [n for n, m in moved.items() if not m]
    usage = fit.callback_metrics["codebook/usage_per_position_mean"]
    assert 0 < usage <= 1


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
