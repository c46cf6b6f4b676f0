"""One interface over the VQ, LFQ and FSQ quantizers of vector-quantize-pytorch.

    q = Quantizer.from_config(cfg)
    out = q(z)                      # z: [B, K, q.dim]
    out.quantized                   # [B, K, q.dim]  straight-through / rotation-trick gradients to z
    out.ids                         # [B, K] int64 in [0, q.codebook_size)
    out.aux_loss                    # scalar (commitment for VQ, entropy + commitment for LFQ, 0 for FSQ)
    out.stats                       # usage and perplexity of this batch's ids
    q.codes_from_ids(ids)           # [B, k, q.dim], equals out.quantized at those ids

Quantization always runs in fp32, also inside a bf16 autocast region, and with TF32 off (`ieee_fp32`; the
training enables TF32 for everything else): low-precision distances pick the wrong code and low-precision EMA
updates drift.

A training forward + backward makes no host<->device sync (no .item(), nonzero, boolean-mask indexing, bincount
or host-to-device copy), so the CPU never waits for the GPU in steady state. Library paths that did are replaced:
- VQ dead-code expiry (the library's `expire_codes_`/`replace`): off in the library, done by
  `reseed_dead_codes_` with device-side random indices and `torch.where`; the codebook's per-forward
  `if self.initted:` and the one-hot of its code lookup are swapped for sync-free equivalents (from_config).
- LFQ's entropy term held [tokens, codebook_size] probabilities several times over (forward + backward of 4096
  tokens x 2^16 codes: +7 GiB); `lfq_entropy` (tokenizer/lfq_entropy.py) computes the same loss in checkpointed
  token chunks (+0.5 GiB), torch.compile'd under the training module's `compile` switch (`compiled_entropy`).
These replacements reach into the library's internals (`impl._codebook` and its `init_embed_`, `gumbel_sample`,
`all_reduce_fn`): pyproject.toml and scripts/gpu_wheels.sh pin vector-quantize-pytorch to the version they were
written against; raise the pin only with tests/test_quantizer.py passing on the new version.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

from .config import TokenizerConfig
from .distributed import all_reduce_sum, world_size
from .gpu import ieee_fp32
from .lfq_entropy import lfq_entropy


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
    samples: [..., D] this batch's codebook inputs, l2-normalised like the codebook where its lookup is cosine.

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
        self.cosine = False  # vq: l2-normalised lookup (from_config sets it from cfg.vq_distance)

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
            # TiTok: low-dimensional, l2-normalised codes (cosine-similarity lookup), EMA codebook updates; or,
            # with vq_distance "euclidean" (TiTok's single-stage 8192 x 64 models), raw codes and inputs.
            impl = VectorQuantize(
                dim=cfg.token_dim,
                codebook_size=cfg.codebook_size,
                use_cosine_sim=cfg.vq_distance == "cosine",
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
            quantizer = cls("vq", impl, cfg.token_dim, cfg.codebook_size,
                            dead_code_threshold=cfg.vq_dead_code_threshold, sync_codebook=cfg.vq_sync_codebook)
            quantizer.cosine = cfg.vq_distance == "cosine"
            return quantizer
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
        with torch.autocast(device_type=z.device.type, enabled=False), ieee_fp32():
            z = z.float()
            if self.kind == "vq":
                quantized, ids, aux = self.impl(z)
                if self.training and self.dead_code_threshold > 0:
                    # after the library's EMA update, where its own expiry ran; the same l2norm as its codebook
                    samples = F.normalize(z.detach(), dim=-1, eps=1e-6) if self.cosine else z.detach()  # [B, K, D]
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
