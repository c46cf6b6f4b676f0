"""Throughput of the real training step of a config (tokenizer or generator), on synthetic data, after warm-up.

    python scripts/bench_train.py --config configs/tokenizer/tiny.yaml --device cpu
    python scripts/bench_train.py --config configs/generator/B.yaml --device cuda --compile --check-syncs
    python scripts/bench_train.py --config configs/tokenizer/onedpiece-B-256.yaml --device cpu --batch-size 2
    python scripts/bench_train.py --config configs/tokenizer/onedpiece-B-256.yaml --device cuda --compile \\
        --tokenizer-only --check-syncs

The step is `TokenizerModule.training_step` driven by a Lightning Trainer, exactly as `train.py` runs it (manual
optimization, the config's precision, EMA, LPIPS, GAN + LeCam), with the GAN on from the first step (the paper
configs start it at step 20k). `--tokenizer-only` drops LPIPS and the GAN: encoder, quantizer, decoder forward and
backward, optimizer and EMA. The last warm-up batch is a logging step, as every step of a long run follows one
(Lightning keeps what was logged, and reads some of it after every later step); the timed steps log nothing.

FLOPs per image are counted by `torch.utils.flop_counter.FlopCounterMode` (forward, the adaptive-weight
products and backward), not by a formula, before the timed run, on the host CPU and without computing anything: the
same steps with the same seed (so the same tail-drop k at each step: k sets the decoder's cost; the JSON line's
timed_k_mean is the mean k the timed steps decoded, which for 10 steps can be far from the nominal K/2) on fake
tensors, a copy of the model whose tensors hold shapes only (count_flops). MFU is against the device's dense bf16 peak
(tokenizer/gpu.py), null where unknown (CPU). `--check-syncs` checks every timed step for host syncs, the whole step
from its start to the next one's, Lightning's own hooks included: off CUDA with HostSyncDetector (the JSON line
gives host_syncs_per_step; the script then exits 1 naming where, if any), on CUDA with
torch.cuda.set_sync_debug_mode("error"), which raises at the first one.
(With `--check-syncs` the AdamW is fused on CPU too, as CUDA builds it.)
`--random-lpips` uses a randomly initialised LPIPS backbone (same FLOPs) where the weight files are missing.
`--preset` / `--overrides '{"image_size": 32, ...}'` replace the config's model preset / update its overrides
(a paper config's objective at a tiny size: scripts/gpu_check.sh --device cpu).

A generator config (model `GeneratorModule`) times `GeneratorModule.training_step` the same way, on random ids
[batch, K] and labels (an "image" is one sequence of K tokens): forward with the chunked loss, backward, sync-free
clipping, AdamW (fused with --check-syncs or on CUDA); `--vocab-size` / `--max-tokens` override the config's
(e.g. 65536 for an LFQ codebook). Its JSON adds tokens_per_s, params_m, vocab_size and max_tokens.

The last line printed is one JSON object: img_per_s, tflop_per_img, achieved_tflops, mfu, peak_mem_gb, ...,
compiles and graph_breaks (Dynamo's graphs and graph breaks over the run: tokenizer/compiling.compile_counts).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import SingleDeviceStrategy  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from tokenizer.compiling import compile_counts  # noqa: E402
from tokenizer.training import TokenizerModule  # noqa: E402
from tokenizer.training.config_files import load_config  # noqa: E402
from tokenizer.training.sync_audit import StepSyncAudit  # noqa: E402

warnings.filterwarnings("ignore", message=".*(eval mode|LeafSpec|ModelCheckpoint|does not have many workers).*")


class SameBatch(IterableDataset):
    """`n` copies of one fixed random batch: the loader costs nothing, the host-to-device copy stays real (from
    pinned memory when the batch is pinned, labels included: it runs inside the checked steps' windows)."""

    def __init__(self, batch: torch.Tensor, n: int):
        self.batch, self.n = batch, n
        labels = torch.zeros(batch.shape[0], dtype=torch.long)  # [B]
        self.labels = labels.pin_memory() if batch.is_pinned() else labels

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch, self.labels


class StepTimer(pl.Callback):
    """Wall time of the timed batches (`warmup` on), whole steps: from the start of batch `warmup` to the end of the
    epoch (Lightning's hooks after each step included), device synced at both ends. With `check_syncs`, each timed
    step, from its start to the next one's, runs under StepSyncAudit (HostSyncDetector) off CUDA, and on CUDA under
    torch's sync debug mode "error", which raises at the first sync (also inside compiled graphs)."""

    def __init__(self, warmup: int, device: torch.device, check_syncs: bool):
        self.warmup, self.device, self.check_syncs = warmup, device, check_syncs
        self.start = self.end = None
        self.timed = 0
        self.audit = StepSyncAudit(start=warmup) if check_syncs and device.type != "cuda" else None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.audit is not None:
            self.audit.on_train_batch_start(trainer, module, batch, batch_idx)
        if batch_idx == self.warmup:
            self._sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                if self.check_syncs:
                    torch.cuda.set_sync_debug_mode("error")
            self.start = time.perf_counter()
        if batch_idx >= self.warmup:
            self.timed += 1

    def on_train_epoch_end(self, trainer, module):
        if self.start is not None and self.end is None:
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
            self._sync()
            self.end = time.perf_counter()
        if self.audit is not None:
            self.audit.on_train_epoch_end(trainer, module)

    def on_exception(self, trainer, module, exception):
        if self.audit is not None:
            self.audit.on_exception(trainer, module, exception)

    def syncs_per_step(self) -> float:
        """Host syncs per timed step (on CUDA 0: the debug mode would have raised at the first one)."""
        if self.audit is None:
            return 0.0
        return sum(sum(found.values()) for _, _, found in self.audit.rows) / max(1, len(self.audit.rows))

    def fail_on_syncs(self) -> None:
        """Exit with status 1 naming where the timed steps synced (after the JSON line is printed)."""
        synced = self.audit.quiet_syncs() if self.audit is not None else {}
        if synced:
            first = min(synced)
            raise SystemExit(f"host syncs in {len(synced)} of {self.timed} timed steps: {synced[first]} in batch "
                             f"{first}, at: " + "; ".join(self.audit.sites[first][:3]))


class TimedLengths(pl.Callback):
    """The keep lengths the timed steps (`warmup` on) decoded: tail drop's k, the drawn prefix under joint
    training. The decoder's cost follows k, and a few steps' draws average far from the nominal mean (seed 0,
    the 10 timed steps of uniform 1..256 average 157.6, not 128.5), so the JSON line says what it was measured
    at. Kept on the device and read once, after the timed steps."""

    def __init__(self, warmup: int):
        self.warmup, self.drawn, self.hook = warmup, [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.hook = module.tokenizer.register_forward_hook(self._record)

    def _record(self, tokenizer, inputs, out):
        if tokenizer.training:
            self.drawn.append(out.lengths if out.prefix_lengths is None else out.prefix_lengths)  # [B]

    def on_train_epoch_end(self, trainer, module):
        if self.hook is not None:
            self.hook.remove()

    def mean(self) -> float | None:
        return round(torch.cat(self.drawn).float().mean().item(), 2) if self.drawn else None


class LogUntil(pl.Callback):
    """Logging steps (every `trainer.log_every_n_steps`) up to batch `batch`, none from it on: the warm-up ends
    with a logging step, as every step of a long run follows one, and the timed steps log nothing."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.batch:
            trainer.log_every_n_steps = 10**9


class SameIds(IterableDataset):
    """`n` copies of one fixed batch of token ids [B, K] and labels [B] (the generator's data)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, n: int):
        self.ids, self.labels, self.n = ids, labels, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.ids, self.labels


def generator_bench(a, config: dict, device: torch.device, precision: str) -> tuple[dict, StepTimer]:
    """Time GeneratorModule.training_step (see the module docstring); returns the JSON fields and the timer."""
    from tokenizer.generator.lightning import GeneratorModule

    args = dict(config["model"]["init_args"])
    overrides = {**(args.get("overrides") or {}), **(a.overrides or {})}
    overrides.update({k: v for k, v in (("vocab_size", a.vocab_size), ("max_tokens", a.max_tokens)) if v})
    args.update(overrides=overrides, tokenizer_dir=None, num_val_samples=0)
    if a.preset:
        args["preset"] = a.preset
    if a.compile_ is not None:
        args["compile"] = a.compile_
    if a.check_syncs:
        args["fused_optimizer"] = True  # as on CUDA (on CPU the default foreach AdamW reads its step counters)
    known = inspect.signature(GeneratorModule.__init__).parameters
    args = {k: v for k, v in args.items() if k in known}
    batch_size = a.batch_size or config["data"]["init_args"]["batch_size"]
    pl.seed_everything(0, verbose=False)
    # FLOPs first, on the host and on fake tensors: every step costs the same, so one step is counted
    flops = count_flops(lambda: GeneratorModule(**{**args, "compile": False}),
                        lambda m: SameIds(*random_ids(m, batch_size), 1), precision, 0, 1) / batch_size
    pl.seed_everything(0, verbose=False)
    module = GeneratorModule(**args)
    cfg = module.gpt.cfg
    ids, labels = random_ids(module, batch_size)
    if device.type == "cuda":
        ids, labels = ids.pin_memory(), labels.pin_memory()
    timer = StepTimer(a.warmup, device, a.check_syncs)
    fit(module, DataLoader(SameIds(ids, labels, a.warmup + a.steps), batch_size=None), device, precision, 1,
        a.warmup + a.steps, [timer], a.warmup)  # fmt: skip
    elapsed = timer.end - timer.start
    return dict(batch_size=batch_size, timed_steps=timer.timed, step_s=elapsed / timer.timed,
                img_per_s=batch_size * timer.timed / elapsed,
                tokens_per_s=batch_size * cfg.max_tokens * timer.timed / elapsed, flop_per_img=flops,
                compile=bool(module.hparams.compile), params_m=module.gpt.num_params() / 1e6,
                vocab_size=cfg.vocab_size, max_tokens=cfg.max_tokens, model="generator"), timer  # fmt: skip


def random_ids(module, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of random token ids [B, K] and labels [B] for a GeneratorModule."""
    cfg = module.gpt.cfg
    ids = torch.randint(0, cfg.vocab_size, (batch_size, cfg.max_tokens))  # [B, K]
    return ids, torch.randint(0, max(1, cfg.num_classes), (batch_size,))  # [B]


def module_args(config: dict, tokenizer_only: bool, compile_: bool | None, preset: str | None = None,
                overrides: dict | None = None) -> dict:  # fmt: skip
    args = dict(config["model"]["init_args"])
    if preset:
        args["preset"] = preset
    if overrides:
        args["overrides"] = {**(args.get("overrides") or {}), **overrides}
    if tokenizer_only:
        args.update(perceptual_weight=0.0, gan_weight=0.0)
    elif args.get("gan_weight", 0) > 0:
        args["gan_start"] = 0  # the full objective: adversarial terms on from the first step
    if compile_ is not None:
        args["compile"] = compile_
    args["eval_num_tokens"] = None
    known = inspect.signature(TokenizerModule.__init__).parameters
    return {k: v for k, v in args.items() if k in known}


def build(args: dict, random_lpips: bool) -> tuple[TokenizerModule, str]:
    module = TokenizerModule(**args)
    backbone = "none"
    if module.hparams.perceptual_weight > 0:
        from tokenizer.perceptual import LPIPS

        try:
            lpips = LPIPS(random_backbone_for_tests=random_lpips)
        except FileNotFoundError as err:
            raise SystemExit(f"{err}\n(pass --random-lpips to benchmark with a random LPIPS backbone)") from err
        module.use_lpips(lpips)  # moved to the training device on first use
        backbone = "random" if random_lpips else "pretrained"
    return module, backbone


def fit(module, loader, device, precision, steps_per_batch, batches, callbacks, warmup: int):
    """A Trainer as train.py builds one (no logger, checkpoints nor progress bar); the last of the `warmup` batches
    is a logging step and no later one is (LogUntil)."""
    trainer = pl.Trainer(
        accelerator=device.type if device.type == "cpu" else "gpu", devices=1, precision=precision,
        max_steps=steps_per_batch * batches, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=max(1, warmup),
        callbacks=[LogUntil(warmup), *callbacks],
    )
    trainer.fit(module, train_dataloaders=loader)
    return trainer


class FlopsPerStep(pl.Callback):
    """Counts the FLOPs of every training batch (torch's FlopCounterMode over the whole step)."""

    def __init__(self):
        self.per_step: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.counter.__exit__(None, None, None)
        self.per_step.append(float(self.counter.get_total_flops()))


class HostOnly(SingleDeviceStrategy):
    """The CPU strategy for a model of fake tensors: nothing to move to the device, nor back at the end."""

    def model_to_device(self) -> None:
        pass

    def teardown(self) -> None:
        pass


class FakeFlopsPerStep(FlopsPerStep):
    """FlopsPerStep with every training batch run under `mode` (FakeTensorMode): shapes only, no compute. Outside
    the steps (the DataLoader's seed, Lightning's bookkeeping) tensors stay real."""

    def __init__(self, mode: FakeTensorMode):
        super().__init__()
        self.mode = mode

    def on_train_start(self, trainer, module):
        # The optimizer and EMA updates are elementwise (no counted FLOPs) and are most of a step's operators:
        # skipped here, the count is the same and comes twice as fast. The closure still runs (manual optimization).
        for optimizer in trainer.optimizers:
            optimizer.step = lambda closure=None, **kwargs: closure() if closure is not None else None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.mode.__enter__()
        super().on_train_batch_start(trainer, module, batch, batch_idx)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        self.mode.__exit__(None, None, None)


def to_fake(module: torch.nn.Module, mode: FakeTensorMode) -> None:
    """Replace every parameter and buffer of `module` (in place, names kept) by a fake tensor of its shape."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = mode.from_tensor(b)


def count_flops(make_module, make_data, precision: str, warmup: int, steps: int) -> float:
    """Mean FLOPs of training batches warmup..warmup+steps-1 of `make_module()` (built after seeding 0, as the
    timed run's) on the batches of `make_data(module)`, counted by FlopCounterMode on the host CPU without
    computing anything: the module's tensors and every step's are fake (FakeTensorMode: meta storage, shapes and
    dtypes only; not the "meta" device itself, whose autocast the quantizer's fp32 region cannot enter). The
    same seed draws the same tail-drop k at every step as the timed run, and k sets the decoder's cost. No step
    logs (a logging step reads values) and the end-of-training hooks, which read values too, are skipped."""
    pl.seed_everything(0, verbose=False)
    module = make_module()
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the real batches become fake inside the steps
    to_fake(module, mode)
    if getattr(module, "_lpips", None) is not None:
        to_fake(module._lpips, mode)
    module.on_train_end = lambda: None  # the divergence check and the export read values
    if hasattr(module, "update_ema"):
        module.update_ema = lambda: None  # elementwise only: no counted FLOP (FakeFlopsPerStep.on_train_start)
    counter = FakeFlopsPerStep(mode)
    trainer = pl.Trainer(
        strategy=HostOnly(device=torch.device("cpu"), accelerator="cpu"), precision=precision,
        max_steps=getattr(module, "optimizers_per_batch", 1) * (warmup + steps), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, log_every_n_steps=10**9, callbacks=[counter],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(make_data(module), batch_size=None))
    timed = counter.per_step[warmup:]
    return sum(timed) / len(timed)


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "cpu_max_rss"  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="per device (default: the config's)")
    p.add_argument("--steps", type=int, default=10, help="timed batches")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (compilation, cuDNN autotuning)")
    p.add_argument("--tokenizer-only", action="store_true")
    p.add_argument("--compile", dest="compile_", action=argparse.BooleanOptionalAction, default=None,
                   help="override the config's model.init_args.compile")
    p.add_argument("--precision", default=None, help="override the config's trainer.precision")
    p.add_argument("--random-lpips", action="store_true")
    p.add_argument("--check-syncs", action="store_true")
    p.add_argument("--vocab-size", type=int, default=None, help="generator configs: override the vocabulary")
    p.add_argument("--max-tokens", type=int, default=None, help="generator configs: override K")
    p.add_argument("--preset", default=None, help="override the config's model.init_args.preset")
    p.add_argument("--overrides", type=json.loads, default=None,
                   help="JSON object merged over the config's model.init_args.overrides")
    a = p.parse_args(argv)

    config = load_config(a.config)  # bases merged (configs/base)
    device = torch.device(a.device)
    precision = a.precision or config.get("trainer", {}).get("precision", "32-true")
    batch_size = a.batch_size or config["data"]["init_args"]["batch_size"]
    if device.type == "cuda":
        from tokenizer.gpu import enable_fast_math

        enable_fast_math()
    if "GeneratorModule" in config["model"]["class_path"]:
        return report_generator(a, config, device, precision)
    args = module_args(config, a.tokenizer_only, a.compile_, a.preset, a.overrides)
    if a.check_syncs:
        # the optimizer a CUDA run builds (fused); on CPU the default foreach AdamW reads its step counters
        args["fused_optimizer"] = True

    def random_images(module) -> torch.Tensor:
        size = module.tokenizer.image_size
        return torch.rand(batch_size, 3, size, size)  # [B, 3, H, W]

    # FLOPs first, on the host and on fake tensors (count_flops)
    flops = count_flops(lambda: build({**args, "compile": False}, a.random_lpips)[0],
                        lambda m: SameBatch(random_images(m), a.warmup + a.steps), precision, a.warmup,
                        a.steps) / batch_size  # fmt: skip
    pl.seed_everything(0, verbose=False)
    module, backbone = build(args, a.random_lpips)
    batch = random_images(module)
    batch = batch.pin_memory() if device.type == "cuda" else batch
    timer, lengths = StepTimer(a.warmup, device, a.check_syncs), TimedLengths(a.warmup)
    loader = DataLoader(SameBatch(batch, a.warmup + a.steps), batch_size=None)
    fit(module, loader, device, precision, module.optimizers_per_batch, a.warmup + a.steps, [timer, lengths],
        a.warmup)
    elapsed = timer.end - timer.start
    img_per_s = batch_size * timer.timed / elapsed
    mem, mem_kind = peak_memory_gb(device)
    from tokenizer.gpu import peak_bf16_tflops

    achieved = flops * img_per_s / 1e12
    peak = peak_bf16_tflops(device)
    result = {
        "config": a.config, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "compile": bool(module.hparams.compile), "batch_size": batch_size,
        "tokenizer_only": a.tokenizer_only, "lpips_backbone": backbone, "timed_steps": timer.timed,
        "max_tokens": module.tokenizer.max_tokens, "timed_k_mean": lengths.mean(),
        "step_s": elapsed / timer.timed, "img_per_s": img_per_s, "tflop_per_img": flops / 1e12,
        "achieved_tflops": achieved, "peak_tflops": peak, "mfu": achieved / peak if peak else None,
        "peak_mem_gb": mem, "peak_mem_kind": mem_kind, "syncs_checked": a.check_syncs,
        "host_syncs_per_step": timer.syncs_per_step() if a.check_syncs else None, **compile_counts(),
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    timer.fail_on_syncs()
    return result


def report_generator(a, config: dict, device: torch.device, precision: str) -> dict:
    from tokenizer.gpu import peak_bf16_tflops

    r, timer = generator_bench(a, config, device, precision)
    mem, mem_kind = peak_memory_gb(device)
    achieved = r["flop_per_img"] * r["img_per_s"] / 1e12
    peak = peak_bf16_tflops(device)
    result = {
        "config": a.config, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, **{k: v for k, v in r.items() if k != "flop_per_img"},
        "tflop_per_img": r["flop_per_img"] / 1e12, "achieved_tflops": achieved, "peak_tflops": peak,
        "mfu": achieved / peak if peak else None, "peak_mem_gb": mem, "peak_mem_kind": mem_kind,
        "syncs_checked": a.check_syncs, "host_syncs_per_step": timer.syncs_per_step() if a.check_syncs else None,
        **compile_counts(),
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    timer.fail_on_syncs()
    return result


if __name__ == "__main__":
    main()
