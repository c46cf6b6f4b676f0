"""The GPU training path, run on CPU as far as CPU can: the paper objective under bf16-mixed with the fused AdamW of a
CUDA run, no host sync in the steady-state step (the whole step, Lightning's hooks after it included), slicing equals
masking, one backward for the adaptive GAN weight,
and torch.compile with a bounded number of compilations over many k. (The 2-process DDP run of the same objective
with the documented strategy is tests/test_multinode.py.)"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _small_training import SMALL, data, fixed_batches, fresh_start, trainer
from _weights_probe import skip_without_lpips

from tokenizer import OneDTokenizer
from tokenizer.gpu import HostSyncDetector, no_host_sync
from tokenizer.losses import hinge_g_loss
from tokenizer.training import TokenizerModule
from tokenizer.training.config_files import load_config
from tokenizer.training.sync_audit import StepSyncAudit

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "tokenizer" / "onedpiece-B-256.yaml"


def paper_module(**changes) -> tuple[TokenizerModule, str]:
    """The paper config's objective (LPIPS + GAN + LeCam + EMA), shrunk to a tiny model, the GAN on from step 0 and
    the optimizer fused exactly as on CUDA. Returns the module and the config's trainer precision."""
    cfg = load_config(PAPER)
    args = dict(cfg["model"]["init_args"])
    args.update(preset="tiny", overrides={**args["overrides"], **SMALL}, gan_start=0, perceptual_subsample=2,
                fused_optimizer=True, warmup_steps=2, codebook_window=2)
    args.update(changes)
    return TokenizerModule(**args), cfg["trainer"]["precision"]


@pytest.fixture(scope="module")
def lpips_available():
    skip_without_lpips()


def test_paper_objective_bf16_fused_trains(lpips_available, tmp_path):
    pl.seed_everything(0)
    module, precision = paper_module()
    assert precision == "bf16-mixed"
    disc_before = [p.detach().clone() for p in module.discriminator.parameters()]
    fit = trainer(12, precision)
    fit.fit(module, datamodule=data())
    opt_g, opt_d = (o.optimizer for o in module.optimizers())
    assert opt_g.defaults["fused"] and opt_d.defaults["fused"], "the optimizer a CUDA run builds"
    assert fit.global_step == 12 and module.generator_steps == 6, "two optimizer steps per batch"
    metrics = fit.callback_metrics
    for key in ("train/loss", "train/lpips", "train/g_adv", "train/g_adv_weight", "train/d_loss", "train/lecam"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/g_adv_weight"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))
    ema = dict(module.ema_tokenizer.named_parameters())
    assert any(not torch.equal(ema[n], p) for n, p in module.tokenizer.named_parameters()), "EMA lags the weights"


@pytest.mark.parametrize("mechanism", ["tail_token_drop", "nested_dropout"])
def test_steady_state_step_makes_no_host_sync(lpips_available, mechanism):
    """What would sync the host on CUDA (.item(), bool(tensor), nonzero, bincount, tensors made from Python
    data, ...) happens only on logging steps, over whole steps: Lightning's hooks after the step are in the window
    (it read a progress-bar loss with .item() after every step that followed a logging step). Batches 0-1 are
    warm-up (optimizer state, lazy LPIPS)."""
    pl.seed_everything(0)
    module, precision = paper_module(overrides={**SMALL, "length_mechanism": mechanism})
    audit = StepSyncAudit(start=2)
    trainer(2 * 12, precision, [audit], log_every=5).fit(module, train_dataloaders=fixed_batches(12))
    quiet = [(i, found) for i, logging, found in audit.rows if not logging]
    assert len(quiet) >= 8 and len(audit.rows) == 10
    synced = audit.quiet_syncs()
    assert not synced, f"host syncs on non-logging steps: {synced}; first at {audit.sites[min(synced)]}"
    assert any(found for _, logging, found in audit.rows if logging), "the detector sees the logging steps' reads"


class HostPullEveryStep(TokenizerModule):
    """The training step plus the mutant of issue 22: a device-to-host copy of the loss in every step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        loss.detach().cpu().tolist()  # PLANTED HOST PULL
        return loss


class ReadAfterEveryStep(TokenizerModule):
    """A read of the loss in the module's own on_train_batch_end: Lightning calls it after every callback's, so
    a window that closes in a callback's on_train_batch_end never sees it (as it never saw Lightning's reads)."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.last_loss = outputs["loss"].item()  # PLANTED READ AFTER THE STEP


@pytest.mark.parametrize("planted", [None, "cpu_tolist", "item_after_step"])
def test_sync_audit_catches_a_host_pull_in_the_training_step(planted):
    """On CPU `.cpu()` and `.tolist()` never reach the dispatcher; the audit must still see them (on a GPU each is
    a blocking device-to-host copy) and name the line, and it must see a read after the training step too. The
    clean step (no LPIPS nor GAN: it runs where the LPIPS weights are missing too) shows nothing."""
    pl.seed_everything(0)
    kind = {None: TokenizerModule, "cpu_tolist": HostPullEveryStep, "item_after_step": ReadAfterEveryStep}[planted]
    # fused AdamW as on CUDA: the unfused one reads each parameter's step count on the host
    module = kind(preset="tiny", overrides=SMALL, warmup_steps=1, fused_optimizer=True)
    audit = StepSyncAudit(start=2)
    trainer(8, "32-true", [audit], log_every=5).fit(module, train_dataloaders=fixed_batches(8))
    quiet = [(i, found) for i, logging, found in audit.rows if not logging]
    assert len(audit.rows) == 6 and len(quiet) == 5
    synced = audit.quiet_syncs()
    if planted is None:
        assert not synced, f"host syncs on non-logging steps: {synced}; first at {audit.sites[min(synced)]}"
        return
    expected = {"Tensor.cpu": 1, "Tensor.tolist": 1} if planted == "cpu_tolist" else {
        "aten._local_scalar_dense.default": 1}
    assert all(found == expected for _, found in quiet), quiet
    sites = audit.sites[quiet[0][0]]
    mark = "PLANTED HOST PULL" if planted == "cpu_tolist" else "PLANTED READ AFTER THE STEP"
    assert any("test_gpu_path.py" in s and mark in s for s in sites), sites


def test_host_sync_detector_sees_explicit_host_copies():
    x = torch.arange(4.0)
    with HostSyncDetector() as detector:
        x.cpu()
        x.tolist()
        x.numpy()
        np.asarray(x)
    assert detector.found == {"Tensor.cpu": 1, "Tensor.tolist": 1, "Tensor.numpy": 1, "Tensor.__array__": 1}
    assert all("test_gpu_path.py" in hit for hit in detector.hits), detector.hits  # the caller, not torch


def test_host_sync_detector_flags_copies_to_cpu_from_a_device_only():
    """`.to(cpu)` and `.copy_` into a CPU tensor are host pulls only from a device; on CPU they are no-ops. A meta
    tensor stands in for the device tensor a CPU machine lacks (its copy then fails: there is no data)."""
    x = torch.arange(4.0)
    with HostSyncDetector() as detector:
        x.to("cpu")
        x.to(torch.device("cpu"), torch.float64)
        x.to(x)
        torch.empty(4).copy_(x)
    assert not detector.found, detector.hits
    on_device = torch.empty(4, device="meta")
    with HostSyncDetector() as detector:
        on_device.to("meta")
        on_device.to(torch.float64)
        for copy in (lambda: on_device.to("cpu"), lambda: on_device.to(x), lambda: torch.empty(4).copy_(on_device)):
            with pytest.raises(NotImplementedError, match="meta"):
                copy()
    assert detector.found == {"Tensor.to (to cpu from meta)": 2, "Tensor.copy_ (to cpu from meta)": 1}, detector.hits


def test_no_host_sync_names_the_operator():
    with pytest.raises(RuntimeError, match="_local_scalar_dense"):
        with no_host_sync("cpu"):
            torch.ones(3).sum().item()
    with pytest.raises(RuntimeError, match="Tensor.tolist"):
        with no_host_sync("cpu"):
            torch.ones(3).tolist()
    with no_host_sync("cpu"):
        torch.ones(3).add_(1).sum()
        torch.ones(3).to("cpu")


@pytest.mark.parametrize("mechanism", ["tail_token_drop", "fixed", "nested_dropout"])
def test_sliced_prefix_equals_masked_prefix(mechanism):
    """One k per batch slices the first k tokens; it computes what the per-sample mask computes, in the forward
    pass and in the gradients."""
    torch.manual_seed(0)
    model = OneDTokenizer.from_preset("tiny", **SMALL, length_mechanism=mechanism)
    images = torch.rand(3, 3, 32, 32)
    restart = fresh_start(model)
    for k in (1, 3, 8):
        outputs, grads = [], []
        for kwargs in ({"num_tokens": k}, {"lengths": torch.full((3,), k)}):
            model.zero_grad()
            restart()
            out = model(images, **kwargs)
            out.recon.square().mean().backward()
            outputs.append(out.recon.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            assert torch.equal(out.lengths, torch.full((3,), k))
        torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
        assert "encoder.patch_embed.weight" in grads[0], "gradients reach the encoder"
        for name in grads[1]:
            torch.testing.assert_close(grads[0].get(name, torch.zeros_like(grads[1][name])), grads[1][name],
                                       atol=1e-6, rtol=1e-4, msg=lambda m, name=name, k=k: f"{name} at k={k}: {m}")
        restart()
        prefix = model.decode(model.encode(images, k))  # the codebook as it was for the training passes
        torch.testing.assert_close(prefix, ((outputs[0] + 1) / 2).clamp(0, 1), atol=1e-5, rtol=1e-4)


def test_one_backward_adaptive_gan_weight_equals_vqgan_formula(lpips_available):
    """The step's gradient (from the objective's gradient at the reconstruction) equals backpropagating
    rec + quantizer + gan_weight * w * hinge_G with w computed as VQGAN does, by autograd at the last layer."""
    torch.manual_seed(0)
    module, _ = paper_module(lecam_weight=0.0)
    module.tokenizer.decoder.conv_out.weight.data.normal_(0, 0.02)  # a non-trivial last layer
    images = torch.rand(4, 3, 32, 32)
    target = images * 2 - 1

    restart = fresh_start(module.tokenizer)

    def forward():
        restart()
        out = module.tokenizer(images)
        rec_total = module.reconstruction_loss(out.recon, target) + module.lpips(out.recon, target).mean()
        g_loss = hinge_g_loss(module.discriminator(out.recon))
        return out, rec_total, g_loss

    hp = module.hparams
    out, rec_total, g_loss = forward()
    weight, recon_grad = module.generator_gradient(out.recon, rec_total, g_loss)
    ((out.recon * recon_grad).sum() + hp.quantizer_weight * out.aux_loss).backward()
    ours = {n: p.grad.clone() if p.grad is not None else None for n, p in module.tokenizer.named_parameters()}
    assert all(g is not None for g in ours.values()), "every tokenizer parameter takes part in the loss"

    module.tokenizer.zero_grad()
    module.discriminator.zero_grad()
    out, rec_total, g_loss = forward()
    last = module.last_decoder_layer()
    rec_last = torch.autograd.grad(rec_total, last, retain_graph=True)[0]
    gan_last = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    reference_weight = (rec_last.norm() / (gan_last.norm() + 1e-4)).detach()
    (rec_total + hp.quantizer_weight * out.aux_loss + hp.gan_weight * reference_weight * g_loss).backward()
    torch.testing.assert_close(weight, reference_weight, rtol=1e-4, atol=0)
    for name, param in module.tokenizer.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_discriminator_trains_from_gan_start_only():
    """Before gan_start the discriminator neither runs nor moves, but its optimizer still counts a (no-op) step,
    so that global_step stays two per batch."""
    pl.seed_everything(0)
    module, _ = paper_module(gan_start=3, perceptual_weight=0.0)
    seen = []
    original = module.discriminator.forward
    module.discriminator.forward = lambda x: (seen.append(module.generator_steps), original(x))[1]
    start = [p.detach().clone() for p in module.discriminator.parameters()]
    moved = []

    class Moved(pl.Callback):
        def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
            moved.append(any(not torch.equal(a, b) for a, b in zip(start, m.discriminator.parameters())))

    fit = trainer(12, "32-true", [Moved()])
    fit.fit(module, datamodule=data())
    assert fit.global_step == 12 and module.generator_steps == 6
    assert min(seen) == 3, "no discriminator pass before gan_start"
    assert moved == [False, False, False, True, True, True]


def test_ema_update_is_the_lerp_of_every_parameter():
    module, _ = paper_module(perceptual_weight=0.0, gan_weight=0.0, ema_decay=0.5)
    with torch.no_grad():
        for p in module.tokenizer.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in module.ema_tokenizer.named_parameters()}
    module.update_ema()  # generator_steps 0: decay min(0.5, 1/10) = 0.1
    for name, param in module.tokenizer.named_parameters():
        expected = before[name] + 0.9 * (param - before[name])
        torch.testing.assert_close(dict(module.ema_tokenizer.named_parameters())[name], expected)
    for (name, ema_b), b in zip(module.ema_tokenizer.named_buffers(), module.tokenizer.buffers()):
        assert torch.equal(ema_b, b), name


@pytest.mark.slow
def test_compile_tail_drop_many_k_bounded_recompiles():
    """Compiled encoder and decoder blocks, tail drop over every k: the decoder's sequence length is a dynamic
    dimension from the first call, so eight values of k cost one decoder graph, not eight (nor a static one first)."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    pl.seed_everything(0)
    module = TokenizerModule(preset="tiny", overrides=SMALL, compile=True, warmup_steps=1)
    seen_k = set()

    class Ks(pl.Callback):
        def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
            seen_k.add(int(trainer.callback_metrics.get("train/keep_tokens", 0)))

    fit = trainer(24, "32-true", [Ks()], log_every=1)
    fit.fit(module, datamodule=data())
    assert len(seen_k) >= 5, f"tail drop drew too few distinct k to test: {seen_k}"
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 2, f"{graphs} graphs compiled for {len(seen_k)} values of k (encoder 1, decoder 1)"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"


@pytest.mark.slow
def test_compiled_lpips_and_discriminator_train_as_eager():
    """Under `compile: true` LPIPS and the discriminator are compiled too, and the step stays the same function:
    with the paper objective (LPIPS, adaptive GAN weight, LeCam) from step 0, the first batch's loss and gradients
    of every tokenizer and discriminator parameter equal the eager run's to fp32 rounding (Inductor sums GroupNorm
    and LPIPS's channel norms in another order). Each compiled backward runs once: they donate their buffers, and a
    retained graph would raise. Later batches compile nothing more, and nothing breaks a graph."""
    from torch._dynamo.utils import counters

    from tokenizer.perceptual import LPIPS

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    lpips_state = LPIPS(random_backbone_for_tests=True).state_dict()
    graphs = []

    class FirstGradients(pl.Callback):
        """Every gradient and the loss after the first batch (the optimizers stepped; the gradients stay), and the
        graphs compiled so far after every batch."""

        def __init__(self):
            self.first = {}

        def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
            if batch_idx == 0:
                self.first.update({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
                self.first["loss"] = outputs["loss"].detach().clone()
            graphs.append(counters["stats"]["unique_graphs"])

    runs = {}
    for compiled in (False, True):
        pl.seed_everything(0)
        module, _ = paper_module(compile=compiled)
        lpips = LPIPS(random_backbone_for_tests=True)
        lpips.load_state_dict(lpips_state)
        module.use_lpips(lpips)
        graphs.clear()
        pl.seed_everything(0)
        runs[compiled] = FirstGradients()
        trainer(2 * 3, "32-true", [runs[compiled]]).fit(module, train_dataloaders=fixed_batches(3))
    eager, compiled = runs[False].first, runs[True].first
    assert any(n.startswith("discriminator.") for n in eager) and any(n.startswith("tokenizer.") for n in eager)
    assert eager.keys() == compiled.keys()
    assert _relative(compiled.pop("loss"), eager.pop("loss")) < 1e-5
    worst = max(eager, key=lambda n: _relative(compiled[n], eager[n]))
    assert _relative(compiled[worst], eager[worst]) < 1e-4, f"{worst}: {_relative(compiled[worst], eager[worst])}"
    # encoder blocks, decoder blocks, LPIPS, and the discriminator in its own step and in the generator's
    assert graphs[0] == graphs[-1] == 5, f"graphs after each batch: {graphs}"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"


TOKENIZER_CONFIGS = sorted(p for p in (ROOT / "configs" / "tokenizer").glob("*.yaml") if "tiny" not in p.stem)


@pytest.mark.parametrize("path", TOKENIZER_CONFIGS, ids=[p.stem for p in TOKENIZER_CONFIGS])
def test_every_parameter_takes_part_in_every_loss(path):
    """What lets DDP run without find_unused_parameters: in every paper config, the extreme keep lengths (one token
    of tail drop, a nested-dropout batch with nothing dropped) still give every tokenizer parameter a gradient."""
    overrides = load_config(path)["model"]["init_args"].get("overrides") or {}
    keep = {k: v for k, v in overrides.items() if k not in ("max_tokens",)}
    if keep.get("decoder_head") == "vqgan":  # its pixel decoder upsamples 16x: patch 16, a narrow VQGAN
        keep.update(patch_size=16, vqgan_channels=32, vqgan_channel_mult=[1, 1, 1, 1, 1])
    torch.manual_seed(0)
    model = OneDTokenizer.from_preset("tiny", **{**SMALL, **keep}).train()
    k_max = model.max_tokens
    images = torch.rand(2, 3, 32, 32)
    for kwargs in ({"num_tokens": 1}, {"lengths": torch.full((2,), k_max)}, {"lengths": torch.tensor([1, k_max])}):
        model.zero_grad(set_to_none=True)
        out = model(images, **kwargs)
        (out.recon.square().mean() + out.aux_loss).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{path.name} {kwargs}: no gradient for {missing}"


def test_bench_train_prints_the_json_line_and_checks_syncs():
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "scripts/bench_train.py", "--config", "configs/tokenizer/tiny.yaml",
                           "--device", "cpu", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--check-syncs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["timed_steps"] == 2 and result["img_per_s"] > 0 and result["syncs_checked"]
    assert result["host_syncs_per_step"] == 0, "timed steps after a logging step (the last warm-up batch)"
    assert 0 < result["tflop_per_img"] < 0.01 and result["mfu"] is None and result["peak_mem_gb"] > 0


def _tf32_switches() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("start", [(True, True), (False, True), (True, False), (False, False)])
def test_ieee_fp32_turns_tf32_off_and_restores_the_switches(start):
    """The switches are process-wide: each combination comes back as it was, after an error too. (On CPU they
    change no result; on a GPU they are what makes fp32 matmuls and cuDNN convolutions IEEE fp32.)"""
    from tokenizer.gpu import ieee_fp32
    from tokenizer.precision import autocast

    before = _tf32_switches()
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = start
        with ieee_fp32():
            assert _tf32_switches() == (False, False)
            with ieee_fp32():  # nested: the inner exit restores the outer's state
                pass
            assert _tf32_switches() == (False, False)
        assert _tf32_switches() == start
        with pytest.raises(KeyError), ieee_fp32():
            raise KeyError("inside")
        assert _tf32_switches() == start
        with autocast("fp32", "cpu"):  # the precision named fp32 is IEEE fp32, autocast off
            assert _tf32_switches() == (False, False) and not torch.is_autocast_enabled("cpu")
        with autocast("bf16", "cpu"):  # bf16 leaves the switches alone
            assert _tf32_switches() == start and torch.is_autocast_enabled("cpu")
        assert _tf32_switches() == start
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("quantizer", ["vq", "lfq", "fsq"])
def test_quantizer_forward_runs_with_tf32_off(quantizer, monkeypatch):
    """The nearest-code search is documented as fp32: it runs with TF32 off inside a training run that turned it
    on for everything else, and the switches come back for the decoder."""
    import tokenizer.quantizer

    model = OneDTokenizer.from_preset("tiny", **SMALL, quantizer=quantizer)
    seen = []
    if quantizer == "lfq":  # its forward is ours; the code distances are in the entropy term
        entropy = tokenizer.quantizer.lfq_entropy
        monkeypatch.setattr(tokenizer.quantizer, "lfq_entropy",
                            lambda *a, **k: seen.append(_tf32_switches()) or entropy(*a, **k))  # fmt: skip
    else:
        model.quantizer.impl.register_forward_hook(lambda *_: seen.append(_tf32_switches()))
    before = _tf32_switches()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        model(torch.rand(2, 3, SMALL["image_size"], SMALL["image_size"]))
        after = _tf32_switches()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert seen == [(False, False)] and after == (True, True)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", None),
])  # fmt: skip
def test_peak_bf16_tflops_by_device_name(name, peak):
    from tokenizer.gpu import peak_bf16_tflops_of_name

    assert peak_bf16_tflops_of_name(name) == peak


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_lpips_and_discriminator_run_channels_last_and_equal_nchw():
    """LPIPS (weights and inputs) and the discriminator (inputs; its parameters keep the default layout for the
    optimizer and checkpoints) run channels_last; forward and gradients equal the NCHW computation to fp32
    rounding (a different summation order, not a different function)."""
    from tokenizer.discriminator import PatchDiscriminator
    from tokenizer.perceptual import LPIPS

    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1  # [B, 3, H, W] NCHW
    lpips = LPIPS(random_backbone_for_tests=True)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in lpips.parameters() if p.dim() == 4)
    nchw = LPIPS(random_backbone_for_tests=True)
    nchw.load_state_dict(lpips.state_dict())
    for p in nchw.parameters():
        p.data = p.data.contiguous()
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    out = lpips(xs[0], y)  # [B]
    ref = nchw.net(xs[1], y, normalize=False).reshape(2)  # the lpips package's forward, all NCHW
    (out.sum() + ref.sum()).backward()
    assert _relative(out, ref) < 1e-5 and _relative(xs[0].grad, xs[1].grad) < 1e-4

    disc = PatchDiscriminator(channels=16, num_layers=2)
    results = []
    for forward in (disc, disc.net):  # channels_last inputs, then the plain NCHW Sequential
        disc.zero_grad()
        xi = x.clone().requires_grad_(True)
        logits = forward(xi)  # [B, 1, h, w]
        logits.square().mean().backward()
        results.append((logits, xi.grad, [p.grad.clone() for p in disc.parameters()]))
    (cl_logits, cl_dx, cl_dw), (logits, dx, dw) = results
    assert cl_logits.is_contiguous(memory_format=torch.channels_last) and logits.is_contiguous()
    assert all(p.is_contiguous() and g.is_contiguous() for p, g in zip(disc.parameters(), cl_dw))
    assert _relative(cl_logits, logits) < 1e-5 and _relative(cl_dx, dx) < 1e-5
    assert max(_relative(a, b) for a, b in zip(cl_dw, dw)) < 1e-5
