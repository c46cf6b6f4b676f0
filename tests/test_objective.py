"""The full objective: adversarial path, step counting, EMA, LeCam, adaptive weight, perceptual term."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _small_training import SMALL, quiet_trainer
from _weights_probe import needs_lpips

from data.photos import PhotosDataModule
from tokenizer.discriminator import PatchDiscriminator
from tokenizer.losses import LeCamEMA, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from tokenizer.training import TokenizerModule


class Recorder(pl.Callback):
    """Records, per batch, which parameters the generator step changed and the discriminator's outputs."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before_g = module.tokenizer.decoder.to_pixels.weight.detach().clone()
        self.before_d = module.discriminator.net[0].weight.detach().clone()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.rows.append({
            "global_step": trainer.global_step,
            "g_moved": not torch.equal(self.before_g, module.tokenizer.decoder.to_pixels.weight),
            "d_moved": not torch.equal(self.before_d, module.discriminator.net[0].weight),
            "d_real": float(metrics.get("train/d_real", float("nan"))),
            "d_fake": float(metrics.get("train/d_fake", float("nan"))),
        })  # fmt: skip


def fit(module, root, steps_per_batch_total: int, batch_size: int = 8):
    dm = PhotosDataModule(image_size=32, batch_size=batch_size, train_crops_per_epoch=1000)
    recorder = Recorder()
    trainer = quiet_trainer(max_steps=steps_per_batch_total, default_root_dir=str(root), log_every_n_steps=1,
                            limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, datamodule=dm)
    return trainer, recorder.rows


def test_adversarial_path_steps_both_optimizers_and_starts_on_time(monkeypatch, tmp_path):
    pl.seed_everything(0)
    module = TokenizerModule(preset="tiny", overrides=SMALL, gan_weight=0.5, gan_start=4, lecam_weight=0.01,
                             lr=1e-3, disc_lr=1e-3, warmup_steps=1)
    adversarial_grads = []
    original = module.discriminator.forward

    def spy(x):
        # a generator-side call is the one whose input still requires grad (the reconstruction itself)
        if x.requires_grad:
            adversarial_grads.append(module.generator_steps)
        return original(x)

    monkeypatch.setattr(module.discriminator, "forward", spy)
    trainer, rows = fit(module, tmp_path, steps_per_batch_total=20)  # 10 batches x (G step + D step)
    assert trainer.global_step == 20 and module.generator_steps == 10
    assert [r["global_step"] for r in rows] == list(range(2, 21, 2))
    assert all(r["g_moved"] for r in rows), "the tokenizer steps on every batch"
    assert [r["d_moved"] for r in rows] == [False] * 4 + [True] * 6, "D trains from gan_start on (VQGAN, TiTok)"
    assert adversarial_grads == list(range(4, 10)), "generator sees D only from gan_start on"
    # the discriminator learns to tell real from reconstructed: real logits end above fake ones
    assert rows[-1]["d_real"] > rows[-1]["d_fake"]
    assert module.lecam.real_ema != 0 and module.lecam.fake_ema != 0


def test_discriminator_loss_responds_to_real_vs_reconstructed():
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=16, num_layers=2)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    dm = PhotosDataModule(image_size=32, batch_size=16, train_crops_per_epoch=16 * 40)
    dm.setup()

    def blurred(x):  # a stand-in for an early, blurry reconstruction
        return torch.nn.functional.avg_pool2d(x, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)

    losses = []
    for batch in dm.train_dataloader():
        real = dm.on_after_batch_transfer(batch, 0)[0] * 2 - 1  # the loader's uint8 -> float, as Lightning does
        loss = hinge_d_loss(disc(real), disc(blurred(real)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - 1.0) < 0.1, "at init D cannot tell them apart (hinge loss ~1)"
    assert sum(losses[-5:]) / 5 < 0.85
    real = dm.val_batch() * 2 - 1
    with torch.no_grad():
        assert disc(real).mean() > disc(blurred(real)).mean() + 0.3


def test_hinge_lecam_and_adaptive_weight_math():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    lecam = LeCamEMA(decay=0.0)
    lecam.update(real, fake)
    assert lecam.real_ema.item() == pytest.approx(1.25) and lecam.fake_ema.item() == pytest.approx(-1.0)
    # relu(real - fake_ema)^2 = (3, 1.5)^2 ; relu(real_ema - fake)^2 = (3.25, 1.25)^2
    expected = (9 + 2.25) / 2 + (3.25**2 + 1.25**2) / 2
    assert lecam(real, fake).item() == pytest.approx(expected)

    rec_grad = torch.full((3,), 2.0)  # norm 2*sqrt(3)
    gan_grad = torch.full((3,), 0.5)  # norm 0.5*sqrt(3)
    assert adaptive_gan_weight(rec_grad, gan_grad).item() == pytest.approx(4.0, rel=1e-3)
    assert adaptive_gan_weight(rec_grad, torch.zeros(3)).item() == 1e4, "clamped when D gives no gradient"


@needs_lpips
def test_perceptual_term_uses_real_lpips_and_is_not_checkpointed():
    module = TokenizerModule(preset="tiny", overrides=SMALL, perceptual_weight=1.0)
    lpips = module.lpips
    assert not lpips.random_backbone, "the pretrained VGG16 trunk, never a random one in training"
    assert not any(k.startswith("_lpips") or "lpips" in k for k in module.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).abs().max() < 1e-6
