"""One interface over the VQ, LFQ and FSQ quantizers of vector-quantize-pytorch.

    q = Quantizer.from_config(cfg)
    out = q(z)                      # z: [B, K, q.dim]
    out.quantized                   # [B, K, q.dim]  straight-through / rotation-trick gradients to z
    out.ids                         # [B, K] int64 in [0, q.codebook_size)
    out.aux_loss                    # scalar (commitment for VQ, entropy + commitment for LFQ, 0 for FSQ)
    out.stats                       # usage and perplexity of this batch's ids
    q.codes_from_ids(ids)           # [B, k, q.dim], equals out.quantized at those ids

Quantization always runs in fp32, also inside a bf16 autocast region: low-precision distances pick the wrong
code and low-precision EMA updates drift.

A training forward + backward makes no host<->device sync (no .item(), nonzero, boolean-mask indexing, bincount
or host-to-device copy), so the CPU never waits for the GPU in steady state. Library paths that did are replaced:
- VQ dead-code expiry (the library's `expire_codes_`/`replace`): off in the library, done by
  `reseed_dead_codes_` with device-side random indices and `torch.where`; the codebook's per-forward
  `if self.initted:` and the one-hot of its code lookup are swapped for sync-free equivalents (from_config).
- LFQ's entropy term held [tokens, codebook_size] probabilities several times over (forward + backward of 4096
  tokens x 2^16 codes: +7 GiB); `lfq_entropy` computes the same loss in checkpointed token chunks (+0.5 GiB).
  Eager, each chunk is ~25 elementwise passes over [chunk, codebook_size] (8 forward, 7 in the checkpoint's
  replay, 10 backward) for almost no FLOPs; `compiled=True` (set by the training module's `compile` switch via
  `Quantizer.compiled_entropy`) runs the chunk through torch.compile, which fuses them.
These replacements reach into the library's internals (`impl._codebook` and its `init_embed_`, `gumbel_sample`,
`all_reduce_fn`): pyproject.toml and scripts/gpu_wheels.sh pin vector-quantize-pytorch to the version they were
written against; raise the pin only with tests/test_quantizer.py passing on the new version.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

from .config import TokenizerConfig
from .distributed import all_reduce_sum, world_size

# LFQ's softmax temperature: the library's forward() default, which this wrapper always used.
LFQ_INV_TEMPERATURE = 100.0
# LFQ entropy: tokens per chunk are chosen so that one [chunk, codebook_size] fp32 tensor holds at most this many
# elements (64 MiB); forward + backward keep a handful of those alive at once. Small codebooks get one chunk.
LFQ_ENTROPY_CHUNK_ELEMENTS = 2**24
# The library's entropy clamps probabilities at this value before the log (lookup_free_quantization.log).
_LFQ_LOG_EPS = 1e-5


class QuantizerStats(NamedTuple):
    usage: torch.Tensor  # fraction of the codebook used by this batch
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # [B, K, D] float32
    ids: torch.Tensor  # [B, K] int64
    aux_loss: torch.Tensor  # scalar
    stats: QuantizerStats


def code_histogram(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts of each code in `ids` (any shape, int64 in [0, codebook_size)). [codebook_size] float32.

    A scatter-add into a fixed-size buffer: torch.bincount sizes its output from ids.max(), a host sync on CUDA.
    Integer atomics make the counts exact and deterministic."""
    flat = ids.reshape(-1)
    counts = torch.zeros(codebook_size, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat)).float()


def position_histogram(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts of each code at each token position: ids [B, K] (int64 in [0, codebook_size)) -> [K, V] float32.
    One scatter-add into a fixed-size buffer, like code_histogram (no host sync)."""
    b, k = ids.shape
    flat = (torch.arange(k, device=ids.device) * codebook_size + ids).reshape(-1)  # [B*K] position-major index
    counts = torch.zeros(k * codebook_size, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat)).view(k, codebook_size).float()


def usage_per_position(counts: torch.Tensor) -> torch.Tensor:
    """[K, V] per-position code counts -> [K]: the fraction of the codebook used at each position. A position
    the encoder always fills with the same few codes carries almost no information, whatever its index."""
    return (counts > 0).float().mean(dim=1)


def histogram_stats(counts: torch.Tensor) -> QuantizerStats:
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return QuantizerStats(usage=(counts > 0).float().mean(), perplexity=entropy.exp())


# ---- VQ: library hooks that would sync the host --------------------------------------------------------------
def _codebook_already_initialised(data, mask=None) -> None:
    """Replaces Codebook.init_embed_, whose `if self.initted:` reads a device flag on every forward. Without
    k-means init (our configs) `initted` is True from construction, so the call is a no-op anyway."""


def _nearest_code(logits: torch.Tensor, dim: int = -1, topk=None, **_ignored):
    """Replaces the library's gumbel_sample for our deterministic, argmax-only lookup (stochastic and
    straight-through sampling off): the same ids and one-hot, but the one-hot is a scatter instead of F.one_hot,
    whose index-range check calls .item() on CPU tensors (CUDA skips it).
    logits [h, N, C] -> ids [h, N] int64, one_hot [h, N, C] in logits' dtype."""
    if topk is not None:
        raise ValueError(f"top-k code lookup is not supported by this quantizer, got topk={topk}")
    ids = logits.argmax(dim=dim)
    one_hot = torch.zeros_like(logits).scatter_(dim, ids.unsqueeze(dim), 1.0)
    return ids, one_hot


@torch.no_grad()
def reseed_dead_codes_(codebook: nn.Module, samples: torch.Tensor, threshold: float, sync: bool) -> torch.Tensor:
    """Re-seed the codes whose EMA cluster size is below `threshold` with vectors of this batch, in place and
    without host syncs. Returns the re-seeded codes as a [C] bool mask (on the device; for tests and logging).

    codebook: the library's Codebook (one codebook: embed [1, C, D], embed_avg [1, C, D], cluster_size [1, C]).
    samples: [..., D] this batch's codebook inputs, l2-normalised like the codebook (cosine-sim lookup).

    The library's semantics (Codebook.replace): each re-seeded code gets a distinct random batch vector v,
    cluster_size = threshold and embed_avg = v * threshold; when there are more dead codes than vectors, a random
    subset is re-seeded and the rest wait for a later step. Instead of counting the dead codes on the host, every
    code gets a slot in a random order (dead codes first) and slot i takes the i-th vector of a random
    permutation of the batch; codes whose slot is past the batch size are not touched.

    With `sync` under torch.distributed, every rank must end with the same codebook although each sees other
    data: each rank offers ceil(C / world) of its vectors, one all_gather shares the offers (and rank 0's random
    order), and slot i takes offer i // world of rank i % world, the same choice on every rank. (The dead mask
    itself is the same everywhere because cluster_size comes from all-reduced statistics.)"""
    embed, embed_avg, cluster_size = codebook.embed[0], codebook.embed_avg[0], codebook.cluster_size[0]
    num_codes, dim = embed.shape  # C, D
    device = embed.device
    samples = samples.reshape(-1, dim).to(embed.dtype)  # [N, D]
    num_samples = samples.shape[0]
    world = world_size() if sync else 1
    per_rank = -(-num_codes // world)  # R: rows each rank offers; world * R >= C

    # this rank's offer: its vectors in random order (distinct while N >= R), cycled to R rows
    if num_samples > 0:
        shuffled = torch.rand(num_samples, device=device).argsort()  # [N] a random permutation
        offer = samples[shuffled[torch.arange(per_rank, device=device) % num_samples]]  # [R, D]
    else:
        offer = samples.new_zeros(per_rank, dim)
    priority = torch.rand(num_codes, device=device)  # [C] random order among the dead codes
    count = offer.new_full((1,), float(num_samples))  # a fill, not a host-to-device copy

    if world > 1:
        local = torch.cat([offer.reshape(-1), priority, count])  # [R*D + C + 1]
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)  # the list form: every torch >= 2.3 backend has it, gloo included
        gathered = torch.stack(parts)  # [W, R*D + C + 1]
        offers = gathered[:, : per_rank * dim].reshape(world, per_rank, dim)  # [W, R, D]
        priority = gathered[0, per_rank * dim : per_rank * dim + num_codes]  # rank 0's draw, used by all
        counts = gathered[:, -1]  # [W]
    else:
        offers, counts = offer[None], count  # [1, R, D], [1]

    dead = cluster_size < threshold  # [C]
    # stable: ranks holding the same priorities must agree on the order even where two of them tie
    by_priority = torch.where(dead, priority, 2.0).argsort(stable=True)  # [C] codes, dead first (priority < 1)
    slot = torch.empty_like(by_priority).scatter_(0, by_priority, torch.arange(num_codes, device=device))  # [C]
    src_rank, src_row = slot % world, slot // world  # [C], [C]; src_row < R since slot < C <= W * R
    take = dead & (src_row < counts[src_rank])  # [C] rows past a rank's vector count would repeat a vector
    candidate = offers[src_rank, src_row]  # [C, D]

    reset = float(threshold)  # the library's reset_cluster_size defaults to the threshold
    embed.copy_(torch.where(take[:, None], candidate, embed))
    embed_avg.copy_(torch.where(take[:, None], candidate * reset, embed_avg))
    cluster_size.masked_fill_(take, reset)
    return take


# ---- LFQ: the entropy aux loss in bounded memory ---------------------------------------------------------------
def _lfq_entropy_chunk(x: torch.Tensor, codebook: torch.Tensor, inv_temperature: float):
    """x [n, d], codebook [V, d] -> (sum over the n tokens of their clamped entropy, sum of their probs [V])."""
    logits = (2.0 * (x @ codebook.t())) * inv_temperature  # [n, V]; the library's -distance * inv_temperature
    prob = logits.softmax(dim=-1)  # [n, V]
    entropy = (-prob * prob.clamp(min=_LFQ_LOG_EPS).log()).sum()
    return entropy, prob.sum(dim=0)


@functools.cache
def _compiled_lfq_entropy_chunk():
    """_lfq_entropy_chunk under torch.compile, built on first use (importing the quantizer stays cheap).
    fullgraph: the chunk is pure tensor math, so a graph break would be a bug, not a fallback to accept.
    dynamic=None with the token dimension marked dynamic by the caller (maybe_mark_dynamic): one graph serves
    every chunk length, so the short last chunk of any batch size does not recompile, while the codebook
    dimensions (fixed for a model) stay static and get kernels specialised to them. Inductor's defaults are kept
    (no fast-math; the CPU build passes -fno-unsafe-math-optimizations -ffp-contract=off): results equal eager
    up to float32 rounding (summation order, softmax's division), see tests/test_quantizer.py."""
    return torch.compile(_lfq_entropy_chunk, fullgraph=True, dynamic=None)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiably: every rank's loss depends on every rank's input, so the gradient of a
    rank's input is the sum of all ranks' output gradients. (The library's LFQ meant to do this with
    torch.distributed.nn.all_reduce but drops its result, which is a new tensor: its batch entropy is that of the
    local mean divided by the world size.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def lfq_entropy(x: torch.Tensor, codebook: torch.Tensor, inv_temperature: float = LFQ_INV_TEMPERATURE,
                chunk_tokens: int | None = None, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """LFQ's two entropy terms, exactly as the library computes them, in chunks of tokens.

    x: [N, d] the quantizer input; codebook: [V, d] the +-1 codes. With p_t = softmax(2 * inv_temperature *
    codebook @ x_t) over the V codes and H(p) = -sum p * log(max(p, 1e-5)) (the library's clamped entropy):
        per_sample = mean_t H(p_t)                 (low: confident bits)
        codebook   = H(mean_t p_t)                 (high: all codes used; mean over ranks under torch.distributed)
    Memory is bounded by chunk_tokens x V (default: LFQ_ENTROPY_CHUNK_ELEMENTS elements) in the forward and the
    backward: each chunk is checkpointed, so its [chunk, V] probabilities are recomputed during backward rather
    than kept for all N tokens at once. `compiled`: each chunk (forward, replay and backward) runs torch.compile'd
    (_compiled_lfq_entropy_chunk): the same loss, fused into a few passes over [chunk, V] instead of ~25.

    Why not factorise the per-sample term over bits (p_t is a product of per-bit Bernoullis, so its Shannon
    entropy is a sum of d binary entropies): the library clamps p at 1e-5 inside the log, which does not
    factorise, and the batch term needs the [chunk, V] probabilities anyway, so the exact clamped per-sample term
    costs one more elementwise pass over a chunk that is already in memory."""
    num_tokens, num_codes = x.shape[0], codebook.shape[0]
    if num_tokens == 0:
        raise ValueError(f"lfq_entropy needs at least one token, got x of shape {tuple(x.shape)}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    chunk = chunk_tokens or max(1, LFQ_ENTROPY_CHUNK_ELEMENTS // num_codes)
    recompute = x.requires_grad and torch.is_grad_enabled() and num_tokens > chunk
    chunk_fn = _compiled_lfq_entropy_chunk() if compiled else _lfq_entropy_chunk
    entropy_sum, prob_sum = x.new_zeros(()), x.new_zeros(num_codes)  # scalar, [V]
    for start in range(0, num_tokens, chunk):
        part = x[start : start + chunk]  # [n, d]
        if compiled:  # n varies with the batch size (last chunk): one dynamic graph, not one per n
            torch._dynamo.maybe_mark_dynamic(part, 0)
        if recompute:
            h, p = checkpoint(chunk_fn, part, codebook, inv_temperature,
                              use_reentrant=False, preserve_rng_state=False)  # fmt: skip
        else:  # one chunk: keeping its activations is within the budget, recomputing would only cost time
            h, p = chunk_fn(part, codebook, inv_temperature)
        entropy_sum, prob_sum = entropy_sum + h, prob_sum + p
    per_sample = entropy_sum / num_tokens
    avg_prob = prob_sum / num_tokens  # [V]
    if world_size() > 1:  # the batch distribution is the mean over all ranks' tokens (see _AllReduceSum)
        avg_prob = _AllReduceSum.apply(avg_prob) / world_size()
    codebook_entropy = (-avg_prob * avg_prob.clamp(min=_LFQ_LOG_EPS).log()).sum()
    return per_sample, codebook_entropy


class Quantizer(nn.Module):
    def __init__(self, kind: str, impl: nn.Module, dim: int, codebook_size: int, *,
                 dead_code_threshold: float = 0.0, sync_codebook: bool = False):
        super().__init__()
        self.kind = kind
        self.impl = impl
        self.dim = dim
        self.codebook_size = codebook_size
        # vq: re-seed codes whose EMA cluster size falls below this (0: never); sync: identically on all ranks
        self.dead_code_threshold = float(dead_code_threshold)
        self.sync_codebook = sync_codebook
        # lfq: compute the entropy loss with torch.compile'd chunks (lfq_entropy's `compiled`); TokenizerModule
        # sets it under its `compile` switch. Eager by default (CPU, tests); no effect on vq and fsq.
        self.compiled_entropy = False

    @property
    def vq_codebook(self) -> nn.Module:
        """VQ's codebook module (buffers embed [1, V, D], embed_avg [1, V, D], cluster_size [1, V]): the one
        place that reaches into vector-quantize-pytorch's internals, so nothing else depends on their names."""
        if self.kind != "vq":
            raise AttributeError(f"a {self.kind} quantizer has no EMA codebook (only vq does)")
        return self.impl._codebook

    @classmethod
    def from_config(cls, cfg: TokenizerConfig) -> Quantizer:
        if cfg.quantizer == "vq":
            # TiTok: low-dimensional, l2-normalised codes (cosine-similarity lookup), EMA codebook updates.
            impl = VectorQuantize(
                dim=cfg.token_dim,
                codebook_size=cfg.codebook_size,
                use_cosine_sim=True,
                decay=cfg.vq_decay,
                commitment_weight=cfg.vq_commitment_weight,
                # The library's dead-code expiry syncs the host several times per step (torch.any in an `if`,
                # .item(), boolean-mask writes); reseed_dead_codes_ does the same job on the device, below.
                threshold_ema_dead_code=0,
                # Lightning builds the model before the process group exists, so the library's own
                # auto-detection would say "not distributed" forever. We ask for sync explicitly and make the
                # collective a no-op while there is no process group (single process, CPU tests).
                sync_codebook=cfg.vq_sync_codebook,
            )
            codebook = impl._codebook
            if cfg.vq_sync_codebook:
                # The EMA statistics are the only collective left: k-means init and the library's replace() are
                # off, so its sample_fn / kmeans_all_reduce_fn hooks are never called.
                codebook.all_reduce_fn = all_reduce_sum
            codebook.init_embed_ = _codebook_already_initialised
            codebook.gumbel_sample = _nearest_code
            return cls("vq", impl, cfg.token_dim, cfg.codebook_size,
                       dead_code_threshold=cfg.vq_dead_code_threshold, sync_codebook=cfg.vq_sync_codebook)
        if cfg.quantizer == "lfq":
            dim = cfg.codebook_size.bit_length() - 1  # one bit per dimension, no projection
            # The library's LFQ supplies the codes, ids <-> codes and the loss weights; forward() below runs its
            # quantization step itself so that the entropy term goes through lfq_entropy (bounded memory).
            impl = LFQ(dim=dim, codebook_size=cfg.codebook_size, entropy_loss_weight=cfg.lfq_entropy_weight,
                       commitment_loss_weight=0.25)
            return cls("lfq", impl, dim, cfg.codebook_size)
        impl = FSQ(levels=list(cfg.fsq_levels))
        return cls("fsq", impl, len(cfg.fsq_levels), cfg.effective_codebook_size)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        # z: [B, K, D]
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.kind == "vq":
                quantized, ids, aux = self.impl(z)
                if self.training and self.dead_code_threshold > 0:
                    # after the library's EMA update, where its own expiry ran; the same l2norm as its codebook
                    samples = F.normalize(z.detach(), dim=-1, eps=1e-6)  # [B, K, D]
                    reseed_dead_codes_(self.vq_codebook, samples, self.dead_code_threshold, self.sync_codebook)
            elif self.kind == "lfq":
                quantized, ids, aux = self._lfq(z)
            else:
                quantized, ids = self.impl(z)
                aux = z.new_zeros(())
                # FSQ casts NaN latents (a diverged step) to the integer minimum: an out-of-range id would fail
                # the histogram below with an index error (a device assert on CUDA) before the divergence check
                # (tokenizer/training/divergence.py) can name the cause. In-range ids are unchanged.
                ids = ids.clamp(0, self.codebook_size - 1)
        ids = ids.long()
        stats = histogram_stats(code_histogram(ids.detach(), self.codebook_size))
        return QuantizerOutput(quantized, ids, aux.reshape(()), stats)

    def _lfq(self, z: torch.Tensor):
        """The library's LFQ forward for our configuration (one codebook, no projection, codebook_scale 1, not
        spherical), with its entropy term computed by lfq_entropy. z [B, K, d] -> ([B, K, d], [B, K], scalar)."""
        lfq = self.impl
        positive = z > 0  # [B, K, d]
        quantized = torch.where(positive, 1.0, -1.0)  # [B, K, d] the +-1 code
        ids = (positive.long() * lfq.mask).sum(dim=-1)  # [B, K] bits, most significant first
        if not self.training:
            return quantized, ids, z.new_zeros(())
        out = z + (quantized - z).detach()  # straight-through
        per_sample, codebook_entropy = lfq_entropy(z.reshape(-1, z.shape[-1]), lfq.codebook.float(),
                                                   compiled=self.compiled_entropy)
        entropy_loss = per_sample - lfq.diversity_gamma * codebook_entropy
        commitment = F.mse_loss(z, quantized)
        aux = entropy_loss * lfq.entropy_loss_weight + commitment * lfq.commitment_loss_weight
        return out, ids, aux

    @torch.no_grad()
    def codes_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, k] int64 -> quantized vectors [B, k, D] float32 (the same vectors forward() returns)."""
        with torch.autocast(device_type=ids.device.type, enabled=False):
            if self.kind == "vq":
                return self.impl.get_output_from_indices(ids).float()
            return self.impl.indices_to_codes(ids).float()
