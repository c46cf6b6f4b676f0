"""TokenizerModule: the Lightning stage that trains a OneDTokenizer, single-stage from pixels.

Objective (generator side):
    recon_weight * L1|L2(recon, x) + perceptual_weight * LPIPS-VGG(recon, x) + quantizer_weight * aux
    + gan_weight * w_adaptive * hinge_G(D(recon))            (only from `gan_start` on)
With cross-length joint training (config `cross_length_joint`) each reconstruction term is summed over the two
decodes of one encoding, all K tokens and the drawn prefix, weighted `joint_full_weight` and
`joint_prefix_weight`; the adversarial term too (D judges both decodes, and sees both as fakes in its own step:
the prefix decodes are what users get at small k, and leaving them out of the GAN would leave them blurry).
Discriminator (PatchGAN, hinge, optional LeCam): trained from `gan_start` on, one step after every generator
step (VQGAN and TiTok start it together with the adversarial loss; before that it would train for nothing).

Steps: manual optimization, and Lightning's `global_step` counts *optimizer* steps. With a discriminator that is
two per batch, so `trainer.max_steps` counts both; `gan_start` and `warmup_steps` are in *generator* steps
(batches), which is what `generator_steps` reports. Before `gan_start` the discriminator's optimizer steps on no
gradients (a no-op) so that the count stays two per batch from the first step.

GPU path (see tokenizer/gpu.py):
- No host sync in the steady-state step, Lightning's hooks after it included: metrics are logged, and so read,
  only every `log_every_n_steps`, and none with `prog_bar=True` (Lightning reads those after every batch; the
  progress display reads `train/loss` on logging steps itself, progress.py); keep lengths and codebook
  histograms stay on the device; gradient clipping is ours (sync-free, and it works with the
  fused AdamW that Lightning's `clip_gradients` refuses under mixed precision).
- Divergence (tokenizer/training/divergence.py): each step ORs "loss or gradient norm is NaN/inf" into a device
  flag, read on logging steps and before checkpoints and the export: a diverged run stops with TrainingDiverged
  instead of exporting NaN weights, and no step pays a host sync for it.
- Random draws: the one k per batch of tail drop is the same on every rank (Python's `random`, seeded alike);
  the device draws (per-sample lengths) differ per rank (seeding.py).
- DDP (plain `--trainer.strategy ddp`) reduces each tokenizer gradient once per step and nothing else: the
  discriminator and every buffer are kept out of DDP (`_ddp_params_and_buffers_to_ignore`). The discriminator
  averages its own gradients in one flat all-reduce; buffers are kept identical by construction (the codebook
  all-reduces its statistics, the EMA copies synced weights, LeCam and the codebook counters all-reduce).
  Every tokenizer parameter takes part in every generator loss, so no `find_unused_parameters` graph walk.
- The adaptive GAN weight needs the gradients of two losses at the decoder's last layer. They come from one
  backward of each loss to the reconstruction plus a cheap product with the last layer only (which stays out
  of torch.compile), and the step's single backward then starts from the combined gradient at the
  reconstruction: LPIPS, the discriminator and the decoder each run backward once.

An EMA copy of the tokenizer (weights and codebook buffers; never the discriminator nor the LPIPS net) is kept
when `ema_decay` is set; it is part of the checkpoint, survives resume, and is what validation and export use.
The frozen LPIPS network is not registered as a submodule: it is neither checkpointed nor wrapped by DDP.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from ..compiling import compile_blocks
from ..config import TokenizerOverrides
from ..discriminator import PatchDiscriminator
from ..distributed import average_gradients, broadcast_from_rank0
from ..images import make_grid
from ..length import powers_of_two_upto
from ..losses import LeCamEMA, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from ..metrics import psnr, to_uint8
from ..model import OneDTokenizer
from .checkpoints import ArchitectureGuard
from .codebook import CodebookMonitor, usage_curve_figure
from .divergence import DivergenceGuard
from .export import export_tokenizer
from .initial_weights import load_initial_weights
from .optim import clip_grad_norm, make_adamw, param_groups, warmup_cosine
from .seeding import seed_device_per_rank


class TokenizerModule(ArchitectureGuard, DivergenceGuard, pl.LightningModule):
    def __init__(
        self,
        preset: str = "tiny",
        overrides: TokenizerOverrides | None = None,
        recon_loss: str = "l2",
        recon_weight: float = 1.0,
        quantizer_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        perceptual_subsample: int | None = None,
        gan_weight: float = 0.0,
        gan_start: int = 0,
        adaptive_gan_weight: bool = True,
        lecam_weight: float = 0.0,
        disc_lr: float | None = None,
        disc_channels: int = 64,
        disc_layers: int = 3,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 1e-4,
        warmup_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        grad_clip: float = 1.0,
        ema_decay: float | None = None,
        eval_num_tokens: list[int] | None = None,
        num_log_images: int = 8,
        codebook_window: int = 100,
        export_dir: str | None = None,
        compile: bool = False,
        fused_optimizer: bool | None = None,
        joint_full_weight: float = 1.0,
        joint_prefix_weight: float = 1.0,
        init_from: str | None = None,
    ):
        super().__init__()
        if recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {recon_loss!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.tokenizer = OneDTokenizer.from_preset(preset, **(overrides or {}))
        if init_from is not None:  # weights only, before the EMA copy is taken (initial_weights.py)
            load_initial_weights(self.tokenizer, init_from)
        self.discriminator = self.lecam = None
        if gan_weight > 0:
            self.discriminator = PatchDiscriminator(disc_channels, disc_layers)
            self.lecam = LeCamEMA()
        self._lpips = None  # built lazily (needs the converted weights); deliberately not a submodule
        self._lpips_compiled = None  # the network compiled in place under `compile` (the `lpips` property)
        self.ema_tokenizer = None
        if ema_decay is not None:
            self.ema_tokenizer = copy.deepcopy(self.tokenizer).requires_grad_(False).eval()
        k_max = self.tokenizer.max_tokens
        self.eval_num_tokens = sorted(set(eval_num_tokens or powers_of_two_upto(k_max)))
        if not all(1 <= k <= k_max for k in self.eval_num_tokens):
            raise ValueError(f"eval_num_tokens must be within 1..{k_max}, got {self.eval_num_tokens}")
        self.codebook_monitor = CodebookMonitor(self.tokenizer.codebook_size, codebook_window)
        # Out of DDP: the discriminator (it averages its own gradients) and every buffer (kept identical by
        # construction; DDP would broadcast them from rank 0 before every forward, and hide any drift).
        self._ddp_params_and_buffers_to_ignore = [
            name for name, _ in self.named_parameters() if name.startswith("discriminator.")
        ] + [name for name, _ in self.named_buffers()]

    def architecture(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed (ArchitectureGuard): the tokenizer's config, and which
        extra trained state (EMA copy, discriminator) the checkpoint carries."""
        hp = self.hparams
        disc = f"{hp.disc_channels} channels x {hp.disc_layers} layers" if self.discriminator is not None else None
        return {**self.tokenizer.config.to_dict(), "ema": hp.ema_decay is not None, "discriminator": disc}

    # ---- optimisation ---------------------------------------------------------------------------------------
    @property
    def optimizers_per_batch(self) -> int:
        return 2 if self.discriminator is not None else 1

    @property
    def generator_steps(self) -> int:
        """Tokenizer optimizer steps taken so far (= batches trained)."""
        return self.global_step // self.optimizers_per_batch

    def configure_model(self) -> None:
        if self.hparams.compile:
            # Each transformer block is compiled in place (compiling.py): parameter names stay (checkpoints stay
            # interchangeable), all blocks of the encoder share one graph and all of the decoder's another, and
            # under DDP each block's gradients reach their buckets as soon as its backward ends. The decoder's
            # sequence length N + k changes with tail drop's k: it is dynamic from the first call, so any number of
            # k values costs one decoder graph. Everything outside the blocks stays eager: the decoder's pixel head
            # (the adaptive GAN weight differentiates through its last layer only, which inside a compiled graph
            # would rerun the whole compiled backward) and the quantizer (data-dependent codebook updates, fp32),
            # except LFQ's entropy chunks: memory-bound elementwise math that compiled takes a few fused passes
            # instead of ~25 per chunk. Inductor's compile workers: this rank's share of the node.
            # (no Trainer yet when called by hand: one rank)
            local_ranks = self._trainer.num_devices if self._trainer is not None else 1
            compile_blocks(self.tokenizer, local_ranks)
            self.tokenizer.quantizer.compiled_entropy = True
            # The discriminator in place (fuses GroupNorm + LeakyReLU around each convolution): two graphs, its
            # own step (parameters train) and the generator's (frozen, input differentiable). LPIPS when built
            # (the `lpips` property; its channel norms, scaling and averages fuse). Both equal eager to fp32
            # rounding: Inductor reorders reductions, the convolutions stay aten's (tests/test_gpu_path.py).
            # Compiled backwards donate their buffers and cannot be retained: each loss is differentiated once
            # (generator_gradient).
            if self.discriminator is not None:
                self.discriminator.compile()

    def configure_optimizers(self):
        hp = self.hparams
        if self.trainer.max_steps > 0:  # optimizer steps, `optimizers_per_batch` per batch
            total_generator_steps = max(1, self.trainer.max_steps // self.optimizers_per_batch)
        else:  # epoch-bound run: with manual optimization this estimate counts batches
            total_generator_steps = max(1, int(self.trainer.estimated_stepping_batches))
        fused = hp.fused_optimizer
        opt = make_adamw(param_groups(self.tokenizer, hp.weight_decay), hp.lr, hp.betas, fused=fused)
        optimizers = [opt]
        schedulers = [{"scheduler": warmup_cosine(opt, hp.warmup_steps, total_generator_steps, hp.min_lr_ratio),
                       "interval": "step"}]
        if self.discriminator is not None:
            opt_d = make_adamw(param_groups(self.discriminator, hp.weight_decay), hp.disc_lr or hp.lr, hp.betas,
                               fused=fused)
            optimizers.append(opt_d)
            schedulers.append({"scheduler": warmup_cosine(opt_d, hp.warmup_steps, total_generator_steps,
                                                          hp.min_lr_ratio), "interval": "step"})
        return optimizers, schedulers

    def on_fit_start(self) -> None:
        # DDP broadcasts rank 0's parameters and buffers once when it wraps the model, except what we keep out of
        # it: broadcast those here (the discriminator's initialisation, the codebook, the EMA weights).
        ignored = set(self._ddp_params_and_buffers_to_ignore)
        broadcast_from_rank0(t for name, t in [*self.named_parameters(), *self.named_buffers()] if name in ignored)
        # per-rank device draws (nested-dropout lengths, ...); tail drop's shared k comes from Python's `random`
        seed_device_per_rank(self.global_rank)
        self._trained_this_fit = False  # on_train_start sets it; a finished run resumed never gets there
        super().on_fit_start()

    @property
    def lpips(self):
        """The frozen LPIPS network, on the device training runs on (built on first use, or the one given to
        `use_lpips`)."""
        if self._lpips is None:
            from ..perceptual import LPIPS

            self.use_lpips(LPIPS())
        if next(self._lpips.parameters()).device != self.device:
            self.use_lpips(self._lpips.to(self.device))
        if self.hparams.compile and self._lpips_compiled is not self._lpips:
            self._lpips.compile()  # in place, once per network; equal to eager to fp32 rounding (configure_model)
            object.__setattr__(self, "_lpips_compiled", self._lpips)
        return self._lpips

    def use_lpips(self, network: torch.nn.Module) -> None:
        """Use `network` as the perceptual loss (e.g. an explicitly random-backbone LPIPS where the weight files
        are missing: same FLOPs, for benchmarks). object.__setattr__: an nn.Module attribute would otherwise
        become a submodule (checkpointed, DDP-wrapped, moved by .to())."""
        object.__setattr__(self, "_lpips", network)

    def reconstruction_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hparams.recon_loss == "l1":
            return F.l1_loss(recon.float(), target.float())
        return F.mse_loss(recon.float(), target.float())

    def is_logging_step(self) -> bool:
        """True on the batches whose metrics Lightning writes (every `log_every_n_steps`, as its own logger
        connector counts them). Only these read metric values, so only these may sync the host. Call it before
        the batch's optimizer steps."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.generator_steps + 1) % every == 0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        hp = self.hparams
        optimizers = self.optimizers()
        schedulers = self.lr_schedulers()
        opt_g, sched_g = (optimizers[0], schedulers[0]) if isinstance(optimizers, list) else (optimizers, schedulers)
        adversarial_on = self.discriminator is not None and self.generator_steps >= hp.gan_start
        log_now = self.is_logging_step()

        # ---- generator (tokenizer) step ----
        out = self.tokenizer(images)
        target = images * 2 - 1
        # the decodes this step trains: all K tokens (or the drawn prefix), plus the prefix under joint training
        recon, passes = out.recon, [(slice(None), 1.0)]  # passes: (rows of `recon`, loss weight)
        if out.prefix_recon is not None:
            b = images.shape[0]
            recon = torch.cat([out.recon, out.prefix_recon])  # [2B, 3, H, W]: all K tokens, then the prefix
            passes = [(slice(0, b), hp.joint_full_weight), (slice(b, 2 * b), hp.joint_prefix_weight)]

        def over_passes(loss_fn) -> torch.Tensor:
            return sum(weight * loss_fn(recon[rows]) for rows, weight in passes)

        rec = over_passes(lambda r: self.reconstruction_loss(r, target))
        logs = {"train/recon": rec, "train/quantizer": out.aux_loss}
        rec_total = hp.recon_weight * rec
        if hp.perceptual_weight > 0:
            # LPIPS-VGG costs more than the tokenizer itself at small sizes; `perceptual_subsample` applies it to
            # the first n images of the (shuffled) batch only: an unbiased estimate at a fraction of the cost.
            n = hp.perceptual_subsample or images.shape[0]
            perceptual = over_passes(lambda r: self.lpips(r[:n].float(), target[:n].float()).mean())
            rec_total = rec_total + hp.perceptual_weight * perceptual
            logs["train/lpips"] = perceptual
        loss = rec_total + hp.quantizer_weight * out.aux_loss
        opt_g.zero_grad(set_to_none=True)
        if adversarial_on:
            self.discriminator.requires_grad_(False)  # generator step: no gradients into D
            logits = self.discriminator(recon)  # one pass over both decodes under joint training
            g_loss = sum(w * hinge_g_loss(logits[rows]) for rows, w in passes)
            self.discriminator.requires_grad_(True)
            weight, recon_grad = self.generator_gradient(recon, rec_total, g_loss)
            loss = loss + hp.gan_weight * weight * g_loss.detach()
            logs.update({"train/g_adv": g_loss, "train/g_adv_weight": weight})
            # one backward through decoder and encoder, from the objective's gradient at the reconstruction
            surrogate = (recon * recon_grad).sum() + hp.quantizer_weight * out.aux_loss
            self.manual_backward(surrogate)
        else:
            self.manual_backward(loss)
        logs["train/grad_norm"] = clip_grad_norm(list(self.tokenizer.parameters()), hp.grad_clip)
        self.watch_finite(loss, logs["train/grad_norm"])  # device flag only: read in check_finite below
        opt_g.step()
        sched_g.step()
        self.update_ema()

        # ---- discriminator step ----
        if self.discriminator is not None:
            opt_d, sched_d = optimizers[1], schedulers[1]
            opt_d.zero_grad(set_to_none=True)
            if adversarial_on:
                logs.update(self.discriminator_backward(target, recon.detach()))  # every decode is a fake
                clip_grad_norm(list(self.discriminator.parameters()), hp.grad_clip)
            opt_d.step()  # before gan_start: no gradients, a no-op that keeps two optimizer steps per batch
            sched_d.step()

        self.codebook_monitor.add(out.ids)
        window = self.codebook_monitor.flush_if_due(log_now)
        if window is not None:
            self.log_codebook(window)
        if log_now:
            lengths = out.lengths if out.prefix_lengths is None else out.prefix_lengths
            logs.update({"train/loss": loss, "train/keep_tokens": lengths.float().mean(),
                         "train/batch_usage": out.stats.usage, "train/batch_perplexity": out.stats.perplexity,
                         "lr": sched_g.get_last_lr()[0]})
            # no prog_bar value: Lightning would read it after every later step (tokenizer/training/progress.py)
            self.log_dict(logs, on_step=True, on_epoch=False, batch_size=images.shape[0])
            self.check_finite(self.global_step)  # the logging step reads the device anyway
        return loss.detach()

    def generator_gradient(self, recon: torch.Tensor, rec_total: torch.Tensor, g_loss: torch.Tensor):
        """The objective's gradient with respect to the reconstruction, and the GAN weight it uses.

        rec_total and g_loss depend on the tokenizer only through `recon`, so by the chain rule backpropagating
        `recon_grad` from `recon` gives exactly the gradient of rec_total + gan_weight * weight * g_loss. The
        adaptive weight needs each loss's gradient at the decoder's last layer: a product of the gradient at
        `recon` with that layer alone, not a rerun of the decoder's backward.

        The two losses' graphs above `recon` are disjoint (each slices `recon` itself) and a gradient *at* `recon`
        runs nothing below it, so each is differentiated once and freed: nothing is retained through LPIPS or
        the discriminator. Compiled (`compile: true`), their backwards donate buffers and refuse retain_graph;
        eager, their activations are freed before the decoder's backward runs."""
        hp = self.hparams
        rec_grad, = torch.autograd.grad(rec_total, recon)  # [B, 3, H, W]
        gan_grad, = torch.autograd.grad(g_loss, recon)  # [B, 3, H, W]
        weight = torch.ones((), device=recon.device)
        if hp.adaptive_gan_weight:
            last = self.last_decoder_layer()
            rec_at_last, = torch.autograd.grad(recon, last, grad_outputs=rec_grad, retain_graph=True)
            gan_at_last, = torch.autograd.grad(recon, last, grad_outputs=gan_grad, retain_graph=True)
            weight = adaptive_gan_weight(rec_at_last, gan_at_last)
        return weight, (rec_grad + hp.gan_weight * weight * gan_grad).detach()

    def discriminator_backward(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hinge (+ LeCam) loss of the discriminator on real images and detached reconstructions; its gradients,
        averaged over ranks. Returns what to log."""
        hp = self.hparams
        # Under bf16-mixed the reconstructions are bf16 and the real images fp32. D's first convolution casts both
        # to bf16 under autocast, so giving the fakes the real images' dtype changes no value (bf16 -> fp32 is
        # exact), and compiled D sees one input type in its step: one graph, not two.
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(fake.to(real.dtype))
        d_loss = hinge_d_loss(real_logits, fake_logits)
        logs = {"train/d_real": real_logits.detach().mean(), "train/d_fake": fake_logits.detach().mean()}
        if hp.lecam_weight > 0:
            lecam = self.lecam(real_logits, fake_logits)
            d_loss = d_loss + hp.lecam_weight * lecam
            logs["train/lecam"] = lecam
        self.lecam.update(real_logits, fake_logits)
        # not through manual_backward: the discriminator is outside DDP, and Lightning would prepare DDP's
        # reducer for a backward in which no tokenizer gradient arrives. bf16 and fp32 need no loss scaling;
        # fp16 is refused in `setup`.
        d_loss.backward()
        average_gradients(self.discriminator)
        logs["train/d_loss"] = d_loss.detach()
        return logs

    def setup(self, stage: str) -> None:
        precision = str(getattr(self.trainer, "precision", ""))
        if precision.startswith("16"):
            raise ValueError(f"trainer.precision {precision!r} is not supported by the tokenizer stage (fp16 needs "
                             "loss scaling); use 'bf16-mixed' on GPU or '32-true'")

    def last_decoder_layer(self) -> torch.Tensor:
        return self.tokenizer.decoder.last_layer

    # ---- EMA ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema_tokenizer is None:
            return
        # warm-up: early on the EMA follows the weights closely (decay grows toward ema_decay)
        step = self.generator_steps
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
        # foreach: a handful of kernels for all tensors instead of two per parameter
        ema_params, params = list(self.ema_tokenizer.parameters()), [p.detach() for p in self.tokenizer.parameters()]
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        torch._foreach_copy_(list(self.ema_tokenizer.buffers()), list(self.tokenizer.buffers()))  # codebook

    @property
    def eval_tokenizer(self) -> OneDTokenizer:
        """The weights to evaluate and export: EMA when enabled."""
        return self.ema_tokenizer if self.ema_tokenizer is not None else self.tokenizer

    # ---- codebook health ------------------------------------------------------------------------------------
    def log_codebook(self, window) -> None:
        """Log a flushed CodebookWindow: scalars, and the usage-per-position curve as a TensorBoard figure."""
        self.log_dict({"codebook/usage": window.usage, "codebook/perplexity": window.perplexity,
                       "codebook/dead_codes": window.dead_codes,
                       "codebook/usage_per_position_mean": window.usage_per_position.mean()}, rank_zero_only=True)
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_figure"):
            experiment.add_figure("codebook/usage_per_position", usage_curve_figure(window.usage_per_position),
                                  self.global_step)

    # ---- validation: PSNR at every evaluated k --------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        model = self.eval_tokenizer
        b = images.shape[0]
        recons = []
        for k in self.eval_num_tokens:
            out = model(images, num_tokens=k)
            recon = ((out.recon + 1) / 2).clamp(0, 1)
            # the report's PSNR (uint8, tokenizer/metrics.py), so the training log and the report agree
            self.log(f"val/psnr@{k}", psnr(to_uint8(recon), to_uint8(images)).mean().float(), batch_size=b,
                     sync_dist=True)
            if k == model.max_tokens:
                self.log("val/recon", self.reconstruction_loss(out.recon, images * 2 - 1), batch_size=b,
                         sync_dist=True, prog_bar=True)
            recons.append(recon)
        if batch_idx == 0:
            self.log_image_grid(images, recons)

    def log_image_grid(self, images: torch.Tensor, recons: list[torch.Tensor]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        n = min(self.hparams.num_log_images, images.shape[0])
        rows = torch.stack([images[:n]] + [r[:n] for r in recons])  # [1+len(ks), n, 3, H, W]
        grid = make_grid(rows)
        experiment.add_image("val/originals_then_k=" + ",".join(map(str, self.eval_num_tokens)), grid,
                             self.global_step)

    # ---- export ---------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._trained_this_fit = True
        super().on_train_start()

    def on_train_end(self) -> None:
        super().on_train_end()  # DivergenceGuard: refuses a run that diverged after its last logging step
        export_tokenizer(self)  # tokenizer/training/export.py: where, and with which provenance

    def on_fit_end(self) -> None:
        # A finished run restored by `--ckpt_path last` trains nothing: Lightning skips on_train_start and
        # on_train_end (max_steps reached). Its export may be missing or incomplete (the disk filled up while it
        # was written): the rerun is how to write it, so it exports again unless the export is complete.
        if not getattr(self, "_trained_this_fit", True):
            export_tokenizer(self, only_if_incomplete=True)
        super().on_fit_end()


__all__ = ["TokenizerModule"]
