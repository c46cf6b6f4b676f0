"""Inductor's compile workers per rank (tokenizer/compiling.py): a share of the node, not 32 in every rank."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._inductor.config as inductor_config
from _scripts import SCRIPTS, load_script
from _small_training import SMALL, quiet_trainer
from torch.utils.data import DataLoader

from tokenizer.compiling import compile_threads_per_rank
from tokenizer.generator.lightning import GeneratorModule
from tokenizer.training import TokenizerModule


def test_compile_threads_are_this_ranks_share():
    assert compile_threads_per_rank(8, environ={}, cpus=128) == 16  # 8 ranks on a 128-CPU node, nothing bound
    assert compile_threads_per_rank(1, environ={}, cpus=128) == 32  # one rank: Inductor's own cap
    assert compile_threads_per_rank(8, environ={}, cpus=4) == 1  # never 0
    assert compile_threads_per_rank(8, environ={"SLURM_CPUS_PER_TASK": "12"}, cpus=128) == 12  # what the job asked
    assert compile_threads_per_rank(8, environ={"SLURM_CPUS_PER_TASK": "12", "TORCHINDUCTOR_COMPILE_THREADS": "3"},
                                    cpus=128) == 3  # the user's setting wins  # fmt: skip


@pytest.mark.parametrize("stage", ["tokenizer", "generator"])
def test_compiled_stages_set_the_compile_threads_of_their_rank(stage, monkeypatch):
    """What the SLURM script passes (SLURM_CPUS_PER_TASK) reaches Inductor when a compiled stage is set up. A fit of
    0 steps: the modules are compiled in place lazily, so nothing is compiled here."""
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    if stage == "tokenizer":
        module = TokenizerModule(preset="tiny", overrides=SMALL, compile=True)
    else:
        module = GeneratorModule(preset="tiny", overrides={"vocab_size": 32, "max_tokens": 16, "num_classes": 4},
                                 tokenizer_dir=None, num_val_samples=0, compile=True)  # fmt: skip
    with inductor_config.patch(compile_threads=32):  # the default of a machine with 32 or more CPUs; restored after
        quiet_trainer(max_steps=0, limit_val_batches=0).fit(module, train_dataloaders=[])
        assert inductor_config.compile_threads == 3


def _graphs_of(code) -> int:
    """Graphs Dynamo holds for one code object (all blocks of a class share their `forward`'s)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(code))


@pytest.mark.slow
def test_compile_blocks_one_graph_per_stack_equal_to_eager():
    """Per-block compile of a tokenizer: parameter names unchanged, outputs and gradients equal to eager at two
    values of k, and the compiles counted: one graph for the encoder's blocks, one for the decoder's (its length
    is dynamic from the first call: the second k compiles nothing), no graph break."""
    from torch._dynamo.utils import counters

    from tokenizer import OneDTokenizer
    from tokenizer.compiling import compile_blocks, transformer_blocks
    from tokenizer.vit import Block

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = OneDTokenizer.from_preset("tiny", **{**SMALL, "enc_depth": 2, "dec_depth": 2})
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in compiled.named_parameters()]
    compile_blocks(compiled)
    assert [n for n, _ in compiled.named_parameters()] == names, "in place: no `_orig_mod.` in any name"
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert len(transformer_blocks(compiled)) == 4
    images = torch.rand(2, 3, 32, 32)
    for k in (8, 3):
        outputs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            recon = model(images, num_tokens=k).recon
            recon.square().mean().backward()
            outputs.append((recon.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (ref, ref_grads), (out, grads) = outputs
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
        assert counters["stats"]["unique_graphs"] == 2, f"k={k}: {dict(counters['stats'])}"
    assert _graphs_of(Block.forward.__code__) == 2, "encoder blocks 1 graph, decoder blocks 1 (dynamic length)"
    assert not counters["graph_break"], dict(counters["graph_break"])


# A fresh interpreter compiles the tiny tokenizer's blocks with the compile cache in CACHE_DIR, and prints the CPU
# ISA Inductor wrote kernels for, the cache key tag, and how far the compiled reconstruction is from eager.
COMPILE_INTO_A_CACHE = """
import json, sys
import torch
from torch._inductor.cpu_vec_isa import pick_vec_isa
from tokenizer import OneDTokenizer
from tokenizer.compiling import compile_blocks

torch.manual_seed(0)
model = OneDTokenizer.from_preset("tiny", **json.loads(sys.argv[1])).eval()
images = torch.rand(2, 3, 32, 32)
with torch.no_grad():
    eager = model(images, num_tokens=5).recon  # [2, 3, 32, 32]
    compile_blocks(model)
    compiled = model(images, num_tokens=5).recon
print(json.dumps({"isa": str(pick_vec_isa()), "tag": torch.compiler.config.cache_key_tag,
                  "finite": bool(torch.isfinite(compiled).all()), "max_diff": float((compiled - eager).abs().max())}))
"""


@pytest.mark.slow
def test_a_compile_cache_filled_under_another_cpu_isa_gives_the_eager_result(tmp_path):
    """Inductor's graph cache did not key CPU kernels by vector ISA: filled under this machine's ISA and read under
    AVX2 (ATEN_CPU_CAPABILITY=avx2, as `make test-avx2` runs), the compiled tokenizer decoded NaN everywhere.
    key_compile_cache_by_cpu_isa puts the ISA in the key: both runs, one cache directory, the eager result."""
    import json
    import os
    import subprocess
    import sys

    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if not torch.cpu._is_avx512_supported() or str(pick_vec_isa()) == "avx2":
        pytest.skip("this CPU's default vector ISA is AVX2 already: no second ISA to read the cache with")
    base = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    base.pop("ATEN_CPU_CAPABILITY", None)
    runs = []
    for extra in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        proc = subprocess.run([sys.executable, "-c", COMPILE_INTO_A_CACHE, json.dumps(SMALL)], env={**base, **extra},
                              capture_output=True, text=True, timeout=600, cwd=str(SCRIPTS.parent))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert second["isa"] == "avx2" and first["isa"] != "avx2", runs
    assert first["tag"] != second["tag"], runs
    for run in runs:
        assert run["finite"] and run["max_diff"] < 1e-4, runs


def test_recompiles_past_the_budget_raise():
    """Past its recompile limit Dynamo would run a function eagerly without a word; bound_recompiles makes it
    raise. A Python int that changes every call forces a new static graph each time."""
    import torch._dynamo.config as dynamo_config

    # restored after the test by Dynamo's own patch (monkeypatch's undo deletes the attribute, which a Dynamo
    # config module takes as "hide this setting": every later compile then fails to read it)
    with dynamo_config.patch(recompile_limit=dynamo_config.recompile_limit,
                             fail_on_recompile_limit_hit=dynamo_config.fail_on_recompile_limit_hit):
        _check_the_budget_raises(dynamo_config)


def _check_the_budget_raises(dynamo_config):
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from tokenizer.compiling import RECOMPILE_LIMIT, bound_recompiles

    bound_recompiles()
    assert dynamo_config.recompile_limit == RECOMPILE_LIMIT and dynamo_config.fail_on_recompile_limit_hit
    bound_recompiles(2)
    torch._dynamo.reset()

    def scale(x, n):
        return x * n

    compiled = torch.compile(scale, backend="eager", dynamic=False)
    x = torch.ones(3)
    for n in (2, 3):
        assert torch.equal(compiled(x, n), x * n)
    with pytest.raises(FailOnRecompileLimitHit):
        compiled(x, 4)
    with pytest.raises(ValueError, match="recompile limit"):
        bound_recompiles(0)


@pytest.mark.parametrize("config", ["tokenizer/tiny.yaml", "generator/tiny.yaml"])
def test_bench_train_flops_on_fake_tensors_equal_the_eager_count(config):
    """bench_train.py counts FLOPs on fake tensors (shapes only, nothing computed): the same count, step by step,
    as FlopCounterMode over an eager run of the same seeded steps (tail drop's k differs from step to step)."""
    bench = load_script("bench_train")
    loaded = bench.load_config(SCRIPTS.parent / "configs" / config)
    if "generator" in config:
        args = {
            **loaded["model"]["init_args"],
            "tokenizer_dir": None,
            "num_val_samples": 0,
            "overrides": {**loaded["model"]["init_args"]["overrides"], "vocab_size": 64, "max_tokens": 8},
        }
        make = lambda: GeneratorModule(**args)  # noqa: E731
        data = lambda m: bench.SameIds(*bench.random_ids(m, 2), 3)  # noqa: E731
    else:
        args = bench.module_args(loaded, False, False, overrides={**SMALL, "image_size": 32})
        make = lambda: bench.build(args, False)[0]  # noqa: E731
        data = lambda m: bench.SameBatch(torch.rand(2, 3, 32, 32), 3)  # noqa: E731
    fake = bench.count_flops(make, data, "32-true", 0, 3)
    torch.manual_seed(0)
    counter = bench.FlopsPerStep()
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    module = make()
    bench.fit(module, DataLoader(data(module), batch_size=None), torch.device("cpu"), "32-true",
              getattr(module, "optimizers_per_batch", 1), 3, [counter], 0)  # fmt: skip
    eager = sum(counter.per_step) / len(counter.per_step)
    assert fake > 0 and fake == eager
