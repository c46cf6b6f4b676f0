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
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize
from vector_quantize_pytorch import vector_quantize_pytorch as vq_impl

from .config import TokenizerConfig


class QuantizerStats(NamedTuple):
    usage: torch.Tensor  # fraction of the codebook used by this batch
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # [B, K, D] float32
    ids: torch.Tensor  # [B, K] int64
    aux_loss: torch.Tensor  # scalar
    stats: QuantizerStats


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_when_distributed(tensor: torch.Tensor, *args, **kwargs):
    if _distributed():
        dist.all_reduce(tensor, *args, **kwargs)


def _sample_when_distributed(samples: torch.Tensor, num: int) -> torch.Tensor:
    if _distributed():
        return vq_impl.sample_vectors_distributed(samples, num)
    return vq_impl.batched_sample_vectors(samples, num)


def code_histogram(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts of each code in `ids` (any shape). [codebook_size] float32."""
    return torch.bincount(ids.reshape(-1), minlength=codebook_size).float()


def histogram_stats(counts: torch.Tensor) -> QuantizerStats:
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return QuantizerStats(usage=(counts > 0).float().mean(), perplexity=entropy.exp())


class Quantizer(nn.Module):
    def __init__(self, kind: str, impl: nn.Module, dim: int, codebook_size: int):
        super().__init__()
        self.kind = kind
        self.impl = impl
        self.dim = dim
        self.codebook_size = codebook_size

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
                threshold_ema_dead_code=cfg.vq_dead_code_threshold,
                # Lightning builds the model before the process group exists, so the library's own
                # auto-detection would say "not distributed" forever. We ask for sync explicitly and make the
                # collectives no-ops while there is no process group (single process, CPU tests).
                sync_codebook=cfg.vq_sync_codebook,
            )
            if cfg.vq_sync_codebook:
                codebook = impl._codebook
                codebook.all_reduce_fn = _all_reduce_when_distributed
                codebook.kmeans_all_reduce_fn = _all_reduce_when_distributed
                codebook.sample_fn = _sample_when_distributed
                codebook.replace_sample_fn = _sample_when_distributed
            return cls("vq", impl, cfg.token_dim, cfg.codebook_size)
        if cfg.quantizer == "lfq":
            dim = cfg.codebook_size.bit_length() - 1  # one bit per dimension, no projection
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
            elif self.kind == "lfq":
                quantized, ids, aux = self.impl(z)
            else:
                quantized, ids = self.impl(z)
                aux = z.new_zeros(())
        ids = ids.long()
        stats = histogram_stats(code_histogram(ids.detach(), self.codebook_size))
        return QuantizerOutput(quantized, ids, aux.reshape(()), stats)

    @torch.no_grad()
    def codes_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, k] int64 -> quantized vectors [B, k, D] float32 (the same vectors forward() returns)."""
        with torch.autocast(device_type=ids.device.type, enabled=False):
            if self.kind == "vq":
                return self.impl.get_output_from_indices(ids).float()
            return self.impl.indices_to_codes(ids).float()
