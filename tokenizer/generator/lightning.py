"""Lightning training of the generator GPT on extracted token shards (`data/tokens.py`).

    python train.py fit --config configs/generator/tiny.yaml      # LightningCLI (model: GeneratorModule)

The module owns only the GPT. A frozen tokenizer, referenced by its `from_pretrained` directory, is loaded
lazily (and kept out of checkpoints and the optimizer) only to decode validation samples into an image grid;
with `tokenizer_dir=None`, or when the tokenizer package is unavailable, sampling still runs and logs token
stats.

GPU path (as the tokenizer stage, tokenizer/gpu.py): the loss is the chunked `linear_cross_entropy` (never the
fp32 logits of the whole batch, `max_loss_logits`); AdamW is fused on CUDA (`fused_optimizer`); gradient
clipping is `tokenizer.training.optim.clip_grad_norm` (sync-free; Lightning's `clip_gradients` refuses fused
optimizers under mixed precision); a NaN/inf loss or gradient norm stops the run (`DivergenceGuard`, read on
logging steps and before checkpoints only); metrics are logged, and so read, only on Lightning's logging steps
(every `log_every_n_steps`), none with `prog_bar=True` (Lightning reads those after every batch); ids and labels
are range-checked once, at setup, not per batch. `compile=True` compiles each transformer block in place
(parameter names and checkpoints unchanged). Multi-GPU: plain DDP
(`trainer.strategy: ddp`), every parameter takes part in every loss, and each rank draws its own dropout masks
(tokenizer/training/seeding.py).

Variable-length token shards (adaptive extraction, `data/adaptive_records.py`) give batches (ids, labels,
lengths); the GPT must then have `overrides.end_token: true` (it learns the end-of-image token, end_token.py)
and the validation samples stop where they draw it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from ..compiling import compile_blocks
from ..training.checkpoints import ArchitectureGuard
from ..training.divergence import DivergenceGuard
from ..training.optim import clip_grad_norm, make_adamw, warmup_cosine
from ..training.seeding import seed_device_per_rank
from .gpt import GPT, preset_config
from .sampling import generate


class GeneratorModule(ArchitectureGuard, DivergenceGuard, pl.LightningModule):
    def __init__(
        self,
        preset: str = "tiny",
        overrides: dict
        | None = None,  # GPTConfig fields, e.g. {vocab_size: 4096, max_tokens: 128, num_classes: 1000}
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 1000,
        total_steps: int | None = None,  # cosine length; None = trainer.estimated_stepping_batches
        min_lr_ratio: float = 0.0,
        grad_clip: float = 1.0,  # by norm; a Trainer gradient_clip_val takes precedence
        tokenizer_dir: str | None = None,
        num_val_samples: int = 8,  # sampled once per validation; 0 disables
        sample_num_tokens: int | None = None,  # None = max_tokens
        sample_cfg_scale: float = 1.0,
        sample_temperature: float = 1.0,
        sample_top_k: int | None = None,
        sample_top_p: float | None = None,
        sample_seed: int = 0,
        compile: bool = False,  # torch.compile each transformer block (GPU)
        fused_optimizer: bool | None = None,  # None: fused AdamW when every parameter is on CUDA
        max_loss_logits: int | None = None,  # fp32 logit values per loss chunk (None: loss.DEFAULT_MAX_LOGITS)
    ):
        super().__init__()
        self.save_hyperparameters()
        self.gpt = GPT(preset_config(preset, **(overrides or {})))
        self._tokenizer = None  # plain attribute: never a registered submodule (see _load_tokenizer)
        self._tokenizer_failed = False

    # ---- setup ---------------------------------------------------------------------------------------------
    def architecture(self) -> dict:
        """What a checkpoint must match to be resumed (ArchitectureGuard): the GPT's config, minus the training
        regularisers (dropout rates), which a resume may change without changing the function."""
        cfg = dataclasses.asdict(self.gpt.cfg)
        return {k: v for k, v in cfg.items() if k not in ("dropout", "class_dropout_prob", "init_std")}

    def setup(self, stage: str) -> None:
        tdir = self.hparams.tokenizer_dir
        if tdir and not os.path.isdir(tdir):
            raise FileNotFoundError(
                f"tokenizer_dir {tdir!r} does not exist (set it to null to train without "
                "decoding validation samples)"
            )
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        meta = getattr(dm, "meta", None) if dm is not None else None
        if not meta:
            return
        cfg, k = self.gpt.cfg, getattr(dm, "seq_len", meta["num_tokens"])
        if meta["codebook_size"] > cfg.vocab_size:
            raise ValueError(
                f"token shards use codebook_size {meta['codebook_size']} > model vocab_size "
                f"{cfg.vocab_size}; set overrides.vocab_size"
            )
        if k > cfg.max_tokens:
            raise ValueError(
                f"training sequences have {k} tokens > model max_tokens {cfg.max_tokens}; set "
                "overrides.max_tokens or data.num_tokens"
            )
        if getattr(dm, "variable_length", False) and not cfg.end_token:
            raise ValueError(
                f"token shards at {getattr(dm, 'root', '?')} have variable lengths ({meta.get('length_target')}) "
                "but the GPT has no end token: set model.init_args.overrides.end_token: true"
            )
        nc = meta.get("num_classes")
        if nc and not cfg.is_unconditional and nc > cfg.num_classes:
            raise ValueError(f"token shards have {nc} classes > model num_classes {cfg.num_classes}")
        # Range-check every id and label once, here, on the CPU arrays: the steps skip `GPT.forward`'s check
        # (reading .min()/.max() of each batch would sync the host every step), so without this a bad
        # value would surface as an opaque device-side assert in the embedding.
        for name in ("train_set", "val_set"):
            ds = getattr(dm, name, None)
            if getattr(ds, "ids", None) is not None:
                self.gpt.check_ids(torch.as_tensor(ds.ids))
            if getattr(ds, "labels", None) is not None:
                self.gpt.check_labels(torch.as_tensor(ds.labels))

    def on_fit_start(self) -> None:
        seed_device_per_rank(self.global_rank)  # dropout and class-dropout draws differ per rank (seeding.py)
        super().on_fit_start()

    def configure_model(self) -> None:
        if self.hparams.compile:
            # in place: parameter names (and so checkpoints) stay the same; one graph per block shape;
            # Inductor's compile workers: this rank's share of the node (tokenizer/compiling.py)
            compile_blocks(self.gpt, self._trainer.num_devices if self._trainer is not None else 1)

    def configure_optimizers(self):
        hp = self.hparams
        opt = make_adamw(self.gpt.optim_groups(hp.weight_decay), hp.lr, hp.betas, fused=hp.fused_optimizer)
        total = hp.total_steps or int(self.trainer.estimated_stepping_batches)
        sched = warmup_cosine(opt, hp.warmup_steps, total, hp.min_lr_ratio)  # the tokenizer's schedule
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def is_logging_step(self) -> bool:
        """True on the batches whose metrics Lightning writes (every `log_every_n_steps` optimizer steps, as its
        logger connector counts them). Only these may read values on the host."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by global norm with our sync-free clip (also with the fused AdamW); a Trainer gradient_clip_val
        takes precedence over `grad_clip`. Lightning calls this after backward, before every optimizer step."""
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"only norm clipping is supported, got {gradient_clip_algorithm!r}")
        val = gradient_clip_val if gradient_clip_val is not None else self.hparams.grad_clip
        if not val or val <= 0:
            return
        norm = clip_grad_norm(list(self.gpt.parameters()), val)  # the pre-clip norm, a device tensor
        self.watch_finite(norm)  # device flag only (tokenizer/training/divergence.py)
        if self.is_logging_step():
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    # ---- steps ---------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        ids, labels, *lengths = batch  # [B, k] int64, [B] int64, variable-length shards: lengths [B] int64
        loss = self.loss(ids, labels, lengths=lengths[0] if lengths else None)
        self.watch_finite(loss)
        if self.is_logging_step():
            # not prog_bar: Lightning would read it after every later step (tokenizer/training/progress.py)
            self.log("train/loss", loss, on_step=True, on_epoch=False)
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
            self.check_finite(self.global_step + 1)  # this batch's optimizer step is not taken yet
        return loss

    def loss(self, ids: torch.Tensor, labels: torch.Tensor, drop_labels: bool | None = None,
             lengths: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Mean next-token cross-entropy, chunked, without a host read (values were checked at setup); with
        lengths, up to and including each record's end token."""
        out = self.gpt(ids, labels, drop_labels=drop_labels, return_logits=False, check_values=False,
                       max_loss_logits=self.hparams.max_loss_logits, lengths=lengths)  # fmt: skip
        return out.loss

    def validation_step(self, batch, batch_idx: int) -> None:
        ids, labels, *lengths = batch
        loss = self.loss(ids, labels, drop_labels=False, lengths=lengths[0] if lengths else None)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=len(ids))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.hparams.num_val_samples <= 0:
            return
        out = self.sample(self.hparams.num_val_samples)  # same samples on every rank (seeded)
        ids, lengths = out if self.gpt.cfg.end_token else (out, None)  # an end-token model stops by itself
        n_tok = [ids.shape[1]] * len(ids) if lengths is None else lengths.tolist()
        unique = torch.tensor([len(torch.unique(row[:n])) / n for row, n in zip(ids, n_tok)]).mean()
        self.log("val/sample_unique_frac", unique, on_epoch=True)
        if lengths is not None:
            self.log("val/sample_mean_length", lengths.float().mean(), on_epoch=True)
        tok = self._load_tokenizer()
        if tok is None or not self.trainer.is_global_zero:
            return
        with torch.no_grad():
            ids = ids.to(self.device)
            images = tok.decode(ids) if lengths is None else tok.decode(ids, lengths=lengths.to(self.device))
            images = images.float().clamp(0, 1).cpu()  # [n, 3, H, W]
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_images("val/samples", images, self.global_step)

    # ---- sampling and the frozen tokenizer ----------------------------------------------------------------
    def sample_labels(self, n: int) -> torch.Tensor | None:
        nc = self.gpt.cfg.num_classes
        if self.gpt.cfg.is_unconditional:
            return None
        return (torch.arange(n) * max(1, nc // n)) % nc  # classes spread over the label range

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, **kwargs):
        """ids [n, k] with the module's sampling settings (kwargs override them, see `generate`); an end-token
        model returns `Sampled(ids, lengths)` (stopping at END) unless kwargs say stop_at_end=False."""
        hp = self.hparams
        labels = self.sample_labels(n) if labels is None else labels
        gen = torch.Generator(device=self.device).manual_seed(hp.sample_seed)
        args = dict(
            num_tokens=hp.sample_num_tokens,
            cfg_scale=hp.sample_cfg_scale,
            temperature=hp.sample_temperature,
            top_k=hp.sample_top_k,
            top_p=hp.sample_top_p,
            generator=gen,
            batch_size=n,
        )
        args.update(kwargs)
        return generate(self.gpt, labels, **args)

    def set_tokenizer(self, tokenizer) -> None:
        """Use an already-built tokenizer (anything with decode(ids) -> [B,3,H,W] in [0,1])."""
        self._tokenizer = (
            tokenizer.eval().requires_grad_(False) if isinstance(tokenizer, torch.nn.Module) else tokenizer
        )

    def _load_tokenizer(self):
        if self._tokenizer is None and self.hparams.tokenizer_dir and not self._tokenizer_failed:
            try:
                from tokenizer import OneDTokenizer  # written in parallel; optional here
            except ImportError as e:
                self._tokenizer_failed = True
                warnings.warn(
                    f"tokenizer_dir is set but OneDTokenizer cannot be imported ({e}); "
                    "samples will not be decoded",
                    stacklevel=2,
                )
                return None
            tok = OneDTokenizer.from_pretrained(self.hparams.tokenizer_dir)
            cfg = self.gpt.cfg
            if tok.codebook_size != cfg.vocab_size or tok.max_tokens < cfg.max_tokens:
                raise ValueError(
                    f"tokenizer (codebook {tok.codebook_size}, K {tok.max_tokens}) does not fit the "
                    f"GPT (vocab {cfg.vocab_size}, max_tokens {cfg.max_tokens})"
                )
            self.set_tokenizer(tok)
        if isinstance(self._tokenizer, torch.nn.Module):
            self._tokenizer.to(self.device)
        return self._tokenizer

    def __setattr__(self, name, value):
        if name == "_tokenizer":  # bypass nn.Module registration: not in state_dict, optimizer or .to()
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)
