"""Training: the loss drops on the real embedded photographs, the CLI writes and resumes runs, optimizer groups."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _small_training import SMALL, data, quiet_trainer, trainer

from data.photos import TRAIN_IMAGES, VAL_IMAGES, PhotosDataModule
from tokenizer import OneDTokenizer
from tokenizer.checkpoints import tokenizer_from_checkpoint
from tokenizer.length import powers_of_two_upto
from tokenizer.training import TokenizerModule
from tokenizer.training.optim import param_groups, warmup_cosine

# wider and deeper than the shared SMALL: the loss-drops test needs a model that learns in a few dozen steps
WIDER = {**SMALL, "enc_width": 64, "enc_depth": 2, "enc_heads": 4, "dec_width": 64, "dec_depth": 2, "dec_heads": 4,
         "codebook_size": 256}


def test_sample_data_holds_out_whole_photographs():
    assert not set(TRAIN_IMAGES) & set(VAL_IMAGES)
    # the stereo pair is near-identical: both halves must be on the same side of the split
    assert {"motorcycle_left", "motorcycle_right"} <= set(TRAIN_IMAGES)
    dm = PhotosDataModule(image_size=32, batch_size=8, train_crops_per_epoch=16, val_crops_per_scale=2)
    dm.setup()
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)  # uint8 from the loader -> float
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and y.max() < len(TRAIN_IMAGES)
    val = dm.val_batch()
    assert val.shape == (len(VAL_IMAGES) * 2 * 3, 3, 32, 32)
    assert torch.equal(val, PhotosDataModule(image_size=32, val_crops_per_scale=2).val_batch())


def test_color_jitter_recolours_training_crops_within_range():
    def first_batch(jitter: float) -> torch.Tensor:
        torch.manual_seed(0)
        dm = PhotosDataModule(image_size=32, batch_size=64, train_crops_per_epoch=64, color_jitter=jitter)
        dm.setup()
        return dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)[0]

    plain, jittered = first_batch(0.0), first_batch(0.4)
    assert 0 <= jittered.min() and jittered.max() <= 1
    # grayscale photos are half the training set: jitter gives their crops colour (channels differ)
    spread = lambda x: (x - x.mean(1, keepdim=True)).abs().mean((1, 2, 3))  # noqa: E731  [B] channel disagreement
    assert (spread(plain) < 1e-6).sum() >= 10  # many plain crops are gray
    assert (spread(jittered) < 1e-6).sum() == 0
    with pytest.raises(ValueError, match="color_jitter"):
        PhotosDataModule(color_jitter=1.5).setup()


def test_short_training_run_reduces_loss_on_real_photos(tmp_path):
    pl.seed_everything(0)
    dm = PhotosDataModule(image_size=32, batch_size=16, train_crops_per_epoch=16 * 60)
    module = TokenizerModule(preset="tiny", overrides=WIDER, lr=2e-3, warmup_steps=5, codebook_window=10)
    dm.setup()
    held_out = dm.val_batch()

    def held_out_loss() -> float:
        module.tokenizer.eval()
        with torch.no_grad():
            out = module.tokenizer(held_out)
        module.tokenizer.train()  # Lightning keeps the modes it is given
        return torch.nn.functional.mse_loss(out.recon, held_out * 2 - 1).item()

    before = held_out_loss()
    trainer = quiet_trainer(max_steps=60, default_root_dir=str(tmp_path), limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    after = held_out_loss()
    assert trainer.global_step == 60  # one optimizer step per batch
    assert after < 0.85 * before, f"held-out reconstruction loss {before:.4f} -> {after:.4f}"


def test_param_groups_exclude_norms_biases_and_tokens_from_decay():
    model = OneDTokenizer.from_preset("tiny", **WIDER, length_mechanism="nested_dropout")
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    for expected in ("encoder.latent_tokens", "encoder.pos_embed", "decoder.latent_mask_token",
                     "decoder.patch_query", "encoder.transformer.norm.weight", "encoder.to_token.bias"):
        assert expected in no_decay_names
    assert "encoder.transformer.blocks.0.attn.qkv.weight" in decay_names
    assert "decoder.to_pixels.weight" in decay_names
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_powers_of_two_upto():
    assert powers_of_two_upto(32) == [1, 2, 4, 8, 16, 32]
    assert powers_of_two_upto(12) == [1, 2, 4, 8, 12]


def test_export_goes_to_export_dir_or_the_run_directory_never_a_guessed_path(tmp_path):
    """Without a logger there is no run directory: the fit writes nothing (it used to export to
    <working directory>/checkpoints/tokenizer, replacing a model there); with export_dir it writes exactly there."""
    trainer(2, "32-true").fit(TokenizerModule(preset="tiny", overrides=SMALL, warmup_steps=1), datamodule=data())
    assert list(tmp_path.iterdir()) == []  # tmp_path is the working directory (conftest.py)
    module = TokenizerModule(preset="tiny", overrides=SMALL, warmup_steps=1, export_dir=str(tmp_path / "export"))
    trainer(2, "32-true").fit(module, datamodule=data())
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(OneDTokenizer.from_pretrained(tmp_path / "export").encode(x), module.eval_tokenizer.encode(x))


def test_cli_trains_exports_and_resumes(tmp_path, monkeypatch):
    """train.py fit writes config, checkpoints and the exported tokenizer; --ckpt_path last resumes."""
    import train

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "checkpoints" / "cli"
    overrides = ",".join(f"{k}: {v}" for k, v in WIDER.items())
    common = [
        "--trainer.accelerator", "cpu", "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir", str(tmp_path / "checkpoints"), "--trainer.logger.name", "cli",
        "--trainer.logger.version", "", "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", "3", "--trainer.check_val_every_n_epoch", "null",
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(run / "ckpt"), "--trainer.callbacks.save_last", "true",
        "--model", "tokenizer.training.TokenizerModule", "--model.preset", "tiny",
        "--model.overrides", "{" + overrides + "}", "--model.ema_decay", "0.99", "--model.warmup_steps", "2",
        "--data", "data.photos.PhotosDataModule", "--data.image_size", "32", "--data.batch_size", "4",
        "--data.train_crops_per_epoch", "400", "--data.val_crops_per_scale", "1",
    ]  # fmt: skip
    train.main(["fit", *common, "--trainer.max_steps", "3"])
    assert (run / "config.yaml").is_file()
    assert (run / "ckpt" / "last.ckpt").is_file()
    exported = OneDTokenizer.from_pretrained(run / "tokenizer")
    from_ckpt = tokenizer_from_checkpoint(run / "ckpt" / "last.ckpt")  # EMA weights
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(exported.encode(x), from_ckpt.encode(x))

    cli = train.main(["fit", *common, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 6
    state = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
