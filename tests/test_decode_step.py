"""The compiled one-token decode step (tokenizer/generator/decode_step.py): one compile for a sweep of cfg scales
and k, one KV cache per model and batch sized to K, reads of the filled prefix only, and bf16 sampling without
casting every weight on every token. Compiles are counted with torch._dynamo.utils.counters; the backends are
"eager"/"aot_eager" (what Dynamo traces and guards is the same for inductor, which gpu_check.sh runs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from tokenizer.generator import GPT, generate
from tokenizer.generator.decode_step import decode_step, key_spans
from tokenizer.generator.kv_cache import KVCache, release_caches, reusable_cache
from tokenizer.generator.sampling import next_token_logits
from tokenizer.generator.sampling_weights import release_sampling_weights, sampling_weights
from tokenizer.precision import autocast

pytestmark = pytest.mark.usefixtures("one_thread")

EAGER = {"backend": "eager"}


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT.from_preset("tiny", vocab_size=64, max_tokens=16, num_classes=4, dim=32, depth=2, heads=2).eval()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def sample(m, labels, k, **kw):
    return generate(m, labels, k, generator=torch.Generator().manual_seed(k), temperature=1.0, top_k=10, **kw)


def test_one_compile_for_a_sweep_of_cfg_scales_and_k():
    """3 cfg scales x 2 k: one graph, and the ids of the eager loop. The scale 1 row (no CFG: B rows, no mix)
    is the one other graph; bf16 (another module, the bf16 copy) one more."""
    torch._dynamo.reset()
    counters.clear()
    m, labels = small_gpt(), torch.tensor([1, 2, 0])
    for scale in (1.5, 2.0, 3.0):
        for k in (6, 16):
            got = sample(m, labels, k, cfg_scale=scale, compile_step=True, compile_options=EAGER)
            assert torch.equal(got, sample(m, labels, k, cfg_scale=scale)), (scale, k)
    assert graphs() == 1
    sample(m, labels, 16, cfg_scale=1.0, compile_step=True, compile_options=EAGER)
    sample(m, labels, 8, cfg_scale=1.0, compile_step=True, compile_options=EAGER)
    assert graphs() == 2
    for scale in (1.5, 2.0):
        got = sample(m, labels, 16, cfg_scale=scale, precision="bf16", compile_step=True, compile_options=EAGER)
        assert torch.equal(got, sample(m, labels, 16, cfg_scale=scale, precision="bf16"))
    assert graphs() == 3


def test_a_gfid_sweep_stays_under_the_recompile_limit():
    """What eval.gfid_sweep asks of one process: cfg 1, 1.5, 2 x k 4, 8, 16 x batches of 4 and a last one of 3.
    2 CFG modes x 2 batch sizes = 4 graphs, under Dynamo's limit; past it, the test would fail, not fall back."""
    torch._dynamo.reset()
    counters.clear()
    m = small_gpt()
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        for scale in (1.0, 1.5, 2.0):
            for k in (4, 8, 16):
                for labels in (torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0]), torch.tensor([1, 1, 2])):
                    sample(m, labels, k, cfg_scale=scale, compile_step=True, compile_options=EAGER)
    assert graphs() == 4
    assert 4 < torch._dynamo.config.recompile_limit


def test_one_cache_per_model_and_batch_sized_to_k():
    m = small_gpt()
    release_caches(m)
    first = reusable_cache(m, 6, torch.float32)
    assert first.layers[0].k.shape == (6, 2, 16 + 1, 16)  # [rows, H, K + 1 (spare slot), D]
    labels = torch.tensor([1, 2, 0])
    for k in (4, 16):  # the same cache for every k
        sample(m, labels, k, cfg_scale=2.0, compile_step=True, compile_options=EAGER)
        assert reusable_cache(m, 6, torch.float32) is first
    assert reusable_cache(m, 3, torch.float32) is not first  # another batch: its own
    release_caches(m)
    assert reusable_cache(m, 6, torch.float32) is not first


@pytest.mark.parametrize("window", [1, 4])
def test_the_step_reads_only_its_span(window):
    """Slots past the span hold NaN before every step: a step that read them (even masked: 0 * NaN) would
    return NaN; the slots after pos within the span hold stale values, masked. The logits equal the growing
    cache's, whose reads are exactly the filled prefix."""
    m, labels = small_gpt(), torch.tensor([0, 3])
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    growing, static = KVCache(m, 4, max_len=16), KVCache(m, 4, max_len=16)
    positions = torch.arange(16)
    spans = key_spans(positions, window)
    assert [len(s) for s in spans[:6]] == ([1, 2, 3, 4, 5, 6] if window == 1 else [4, 4, 4, 4, 8, 8])
    scale = torch.full((), 2.0)
    with torch.no_grad():
        for t in range(16):
            ref = next_token_logits(m, labels, ids[:, :t], 2.0, growing)  # [2, V]
            if t == 0:
                got = next_token_logits(m, labels, ids[:, :0], 2.0, static)
            else:
                for layer in static.layers:
                    for buf in layer.tensors():
                        buf[:, :, t + 1 :] = 5.0  # masked slots in the span: stale (finite) values of a last call
                        buf[:, :, len(spans[t]) :] = float("nan")  # past the span: never read
                got = decode_step(m, ids[:, t - 1 : t], positions[t : t + 1], static, scale, spans[t])
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def casts(runner: nn.Module, region: str) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes written) of every dtype cast in the compiled step's graph (aten level, after autocast)."""
    found = []

    def record(gm, example_inputs):
        ops = (torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default)
        vals = [n.meta["val"] for n in gm.graph.nodes if n.target in ops]
        found.append([(tuple(v.shape), v.numel() * v.element_size()) for v in vals])
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(decode_step, backend=aot_autograd(fw_compiler=record), fullgraph=True, dynamic=False)
    labels = torch.tensor([1, 2])
    with torch.no_grad(), autocast(region, "cpu"):
        cache = KVCache(runner, 2, dtype=torch.bfloat16)
        next_token_logits(runner, labels, labels[:, None][:, :0], 1.0, cache)
        step(runner, labels[:, None], torch.tensor([1]), cache, None, torch.arange(2))
    assert len(found) == 1
    return found[0]


def test_bf16_copy_casts_no_weight_per_token():
    """The fp32 model under bf16 autocast (the old compiled step) writes a bf16 copy of every Linear weight
    per token; the bf16 copy without autocast casts only activations (the same ones autocast cast)."""
    m = small_gpt()
    weights = [tuple(mod.weight.shape) for mod in m.modules() if isinstance(mod, nn.Linear)]
    old, new = casts(m, "bf16"), casts(sampling_weights(m, torch.bfloat16), "fp32")
    old_weights = [(shape, n) for shape, n in old if shape in weights]
    assert sorted(shape for shape, _ in old_weights) == sorted(weights)  # each Linear weight, every token
    assert not [shape for shape, _ in new if shape in weights]
    # and no more activation casts (one fewer per MLP: autocast cast its input for w1 and again for w3)
    assert sum(n for _, n in old) - sum(n for _, n in new) >= sum(n for _, n in old_weights)


def test_kept_bf16_copy_is_made_once_and_follows_the_weights():
    m = small_gpt()
    release_sampling_weights(m)
    twin = sampling_weights(m, torch.bfloat16, keep=True)
    assert sampling_weights(m, torch.bfloat16, keep=True) is twin
    assert twin.head.weight.dtype == torch.bfloat16 and twin.tok_emb.weight is m.tok_emb.weight  # shared
    assert twin.blocks[0].attn_norm.weight is m.blocks[0].attn_norm.weight
    address = twin.head.weight.data_ptr()
    with torch.no_grad():
        m.head.weight.mul_(2)  # what an optimizer step does: in place, the version counter moves
    assert sampling_weights(m, torch.bfloat16, keep=True) is twin and twin.head.weight.data_ptr() == address
    torch.testing.assert_close(twin.head.weight, m.head.weight.to(torch.bfloat16), atol=0, rtol=0)
    assert sampling_weights(m, torch.float32) is m  # fp32: no copy
    assert sampling_weights(m.to(torch.bfloat16), torch.bfloat16) is m  # already bf16: no copy


class WeightCasts(TorchDispatchMode):
    """Counts dtype casts of tensors shaped like one of `shapes` (the Linear weights)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.n = set(shapes), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) in self.shapes:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_eager_bf16_sampling_of_a_frozen_gpt_casts_each_weight_once_per_call():
    """Autocast caches casts only of tensors that require grad: a frozen GPT under autocast had each weight cast on
    every token. The bf16 copy is made once per call: the casts do not grow with k."""
    m = small_gpt().requires_grad_(False)
    shapes = [tuple(mod.weight.shape) for mod in m.modules() if isinstance(mod, nn.Linear)]
    counts = []
    for k in (4, 12):
        with WeightCasts(shapes) as casts_seen:
            sample(m, torch.tensor([1, 2]), k, cfg_scale=2.0, precision="bf16")
        counts.append(casts_seen.n)
    assert counts[0] == counts[1] == len(shapes)
