"""torch.compile of the transformer blocks in place, with Inductor's compile workers bounded per rank and a
recompile budget that raises instead of falling back to eager.

    compile_blocks(model.tokenizer, local_ranks=trainer.num_devices)   # or a GPT, or any module holding blocks

Per block, not per region: every block of a stack runs the same code (`Block.forward`) with the same shapes, so
Dynamo compiles it once and all blocks of the stack reuse that graph (one compile per stack shape, not per block,
and each graph is one block's size, not the whole encoder's). Under DDP each block's backward ends on its own, so
its gradients reach DDP's buckets while the blocks below it still run backward: compiled as one region, the
encoder's gradients all arrive after its last backward kernel, and their all-reduce is not overlapped with any.

The decoder reads N + k tokens, and k changes from step to step (tail drop, joint training, evaluation at several
k): its sequence dimension is marked dynamic from the first call (`mark_decoder_length_dynamic`), so any number
of k values costs one graph, not a static graph at the first k and a dynamic one at the second.

Inductor compiles kernels in a pool of min(32, CPUs the process may run on) workers, in every process. Under DDP
each rank of a node starts its own pool, so 8 ranks that each see a whole node (torchrun, Lightning's own launcher,
an srun that binds nothing) start up to 8 x 32 workers, on top of 8 x data.num_workers DataLoader workers.
`compile_threads_per_rank` gives each rank its share instead: under SLURM what the job asked per task
(SLURM_CPUS_PER_TASK, the cores srun binds the task to), elsewhere the CPUs the process may run on divided by the
ranks on its node; at most Inductor's own cap, at least 1. TORCHINDUCTOR_COMPILE_THREADS, when set, wins.

In place (`module.compile()`): parameter names stay as they are (no `_orig_mod.`), so checkpoints of compiled
and eager runs are interchangeable.

Compile caches keyed by the CPU vector ISA (`key_compile_cache_by_cpu_isa`): Inductor writes CPU kernels for one
vector ISA (AVX-512, or AVX2 when ATEN_CPU_CAPABILITY=avx2 forces it, as `make test-avx2` does), but its graph
cache's key does not hold that ISA (torch 2.14: on a machine without a GPU its system part is empty). A graph
cached under AVX-512 and loaded under AVX2 compiles its AVX-512 kernel source with AVX2's vector width, and a
compiled tokenizer decoded NaN everywhere (seen here: compiled blocks run with ATEN_CPU_CAPABILITY=avx2 after a
default run on the same machine). Nodes of both kinds sharing one cache directory would meet it too. The ISA goes
into torch.compiler.config.cache_key_tag, which every compile cache hashes; every compile of this project calls it.

Recompile budget (`bound_recompiles`): Dynamo keeps at most `recompile_limit` graphs per code object and, past
it, runs that code eagerly without a word (a run at a fraction of its speed). All blocks of one class share one
code object, so its graphs are one per stack shape, grad mode and (after a second batch size) dynamic batch:
2 in a tokenizer training run (encoder, decoder), 4 to 6 with compiled evaluation. RECOMPILE_LIMIT (16) leaves
room for that; a code object that needs more recompiles on every call (a Python value or shape that changes each
time), and `fail_on_recompile_limit_hit` makes that an error (FailOnRecompileLimitHit) instead of a slow run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

INDUCTOR_MAX_COMPILE_THREADS = 32  # torch._inductor.config.decide_compile_threads: min(32, CPUs)
RECOMPILE_LIMIT = 16  # graphs per code object before Dynamo raises (bound_recompiles; the module docstring)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which cgroups and srun's binding narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def compile_threads_per_rank(local_ranks: int, environ: Mapping[str, str] = os.environ,
                             cpus: int | None = None) -> int:  # fmt: skip
    """Inductor compile workers for one of `local_ranks` ranks on this node (see the module docstring). `cpus`:
    the CPUs this process may run on (default: its affinity mask)."""
    if environ.get("TORCHINDUCTOR_COMPILE_THREADS"):
        return int(environ["TORCHINDUCTOR_COMPILE_THREADS"])
    if environ.get("SLURM_CPUS_PER_TASK"):
        share = int(environ["SLURM_CPUS_PER_TASK"])
    else:
        share = (usable_cpus() if cpus is None else cpus) // max(1, local_ranks)
    return max(1, min(INDUCTOR_MAX_COMPILE_THREADS, share))


def bound_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Dynamo keeps at most `limit` graphs per code object, and raises (FailOnRecompileLimitHit) past it instead of
    silently running that code eagerly. Process-wide (torch._dynamo.config); see the module docstring."""
    import torch._dynamo.config as dynamo_config

    if limit < 1:
        raise ValueError(f"tokenizer/compiling.py: the recompile limit must be >= 1, got {limit}")
    dynamo_config.recompile_limit = limit
    dynamo_config.fail_on_recompile_limit_hit = True


def key_compile_cache_by_cpu_isa() -> str:
    """Add the CPU vector ISA that Inductor generates kernels for (ATEN_CPU_CAPABILITY included) to
    torch.compiler.config.cache_key_tag, keeping any tag already there; see the module docstring. Process-wide and
    idempotent. Returns the tag."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    part = f"cpu_isa={str(pick_vec_isa()).replace(' ', '+') or 'none'}"
    tags = [t for t in torch.compiler.config.cache_key_tag.split(";") if t]
    if part not in tags:
        torch.compiler.config.cache_key_tag = ";".join([*tags, part])
    return torch.compiler.config.cache_key_tag


def compile_counts() -> dict[str, int]:
    """What Dynamo compiled in this process so far: {"compiles": graphs, "graph_breaks": breaks}, from
    torch._dynamo.utils.counters (the benchmarks' JSON lines; 0 and 0 where nothing was compiled)."""
    from torch._dynamo.utils import counters

    return {"compiles": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block in `model`: the encoder's and decoder's (tokenizer/vit.py) and the GPT's
    (tokenizer/generator/layers.py), in module order."""
    from .generator.layers import Block as GPTBlock
    from .vit import Block as ViTBlock

    return [m for m in model.modules() if isinstance(m, (ViTBlock, GPTBlock))]


def _mark_length_dynamic(stack: nn.Module, args: tuple) -> None:
    """Forward pre-hook of the decoder's (eager) Transformer: x [B, L, C] and a per-sample key mask [B, 1, 1, L]
    get a dynamic L before the first compiled block sees them. The blocks after the first get the previous
    block's output, which the dynamic graph's guards accept as it is."""
    x, mask = args[0], (args[1] if len(args) > 1 else None)
    torch._dynamo.mark_dynamic(x, 1)
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] == x.shape[1]:
        torch._dynamo.mark_dynamic(mask, 3)


def mark_decoder_length_dynamic(model: nn.Module) -> int:
    """Mark the sequence dimension of every tokenizer decoder's transformer in `model` dynamic at each call (a
    forward pre-hook, eager: the Transformer itself is not compiled). Returns the number of decoders marked."""
    from .decoder import Decoder

    decoders = [m for m in model.modules() if isinstance(m, Decoder)]
    for decoder in decoders:
        if not getattr(decoder.transformer, "_length_marked_dynamic", False):
            decoder.transformer.register_forward_pre_hook(_mark_length_dynamic)
            decoder.transformer._length_marked_dynamic = True
    return len(decoders)


def compile_blocks(model: nn.Module, local_ranks: int = 1) -> int:
    """The one way this project compiles a model: bound Inductor's compile workers for this rank (one of
    `local_ranks` on its node), key the compile caches by the CPU vector ISA (key_compile_cache_by_cpu_isa), bound
    the recompiles (bound_recompiles), mark every decoder's sequence length
    dynamic, then `compile()` every transformer block of `model` in place (lazily: the first forward compiles).
    Parameter names do not change. Returns the number of compile workers set."""
    import torch._inductor.config as inductor_config

    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"tokenizer/compiling.py: {type(model).__name__} holds no transformer block to compile "
            "(tokenizer/vit.py or tokenizer/generator/layers.py Block)"
        )
    threads = compile_threads_per_rank(local_ranks)
    inductor_config.compile_threads = threads  # read when the worker pool starts, at the first compilation
    key_compile_cache_by_cpu_isa()
    bound_recompiles()
    mark_decoder_length_dynamic(model)
    for block in blocks:
        block.compile()
    return threads


__all__ = [
    "compile_blocks",
    "compile_counts",
    "key_compile_cache_by_cpu_isa",
    "bound_recompiles",
    "transformer_blocks",
    "mark_decoder_length_dynamic",
    "compile_threads_per_rank",
    "usable_cpus",
    "INDUCTOR_MAX_COMPILE_THREADS",
    "RECOMPILE_LIMIT",
]
