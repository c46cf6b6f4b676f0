"""Inductor's compile workers per rank (tokenizer/compiling.py): a share of the node, not 32 in every rank."""

from __future__ import annotations

import pytest
import torch._inductor.config as inductor_config
from _small_training import SMALL, quiet_trainer

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
