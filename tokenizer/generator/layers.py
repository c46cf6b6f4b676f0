"""The GPT's building blocks: RMSNorm, rotary position embedding, attention with an optional KV cache, SwiGLU.

Attention takes its position either as a Python int `start_pos` (training, prefill and the plain decode loop:
the cache returns the keys written so far, a prefix that grows by one per token) or as a `StepPosition` (the
compiled decode step: the cache is written at the tensor index `pos` and attention reads the first `span` slots,
span >= pos + 1, with the slots after pos masked; span is a dynamic size, so one graph serves every token).

Every Linear casts its input to its weight's dtype: a no-op in training (fp32 weights, autocast does the casts)
and in fp32 sampling, and what lets bf16 sampling run a bf16 copy of the weights without autocast
(sampling_weights.py) with exactly autocast's numerics: bf16 matmuls, the residual stream and norms in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .gpt import GPTConfig


class StepPosition(NamedTuple):
    """Where the one-token decode step writes (pos [1] int64) and which cache slots it reads (keys [S] int64,
    keys = 0..S-1 with S >= pos + 1; S is the span, a dynamic size under torch.compile)."""

    pos: torch.Tensor
    keys: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cache(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [T, head_dim] for the rotate-half form of RoPE."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # [D/2]
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, D]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, D]; cos/sin [T, D] in fp32 (fp64 for an fp64 model)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).type_as(x)


def prefix_mask(T: int, S: int, start_pos: int, device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for T queries at positions start_pos.. over S = start_pos + T keys."""
    if T == 1:
        return None, False  # one new query (the latest position) sees every key so far
    if S == T:
        return None, True  # plain causal self-attention over the whole prefix
    # a chunk of T queries after start_pos cached keys: query i sees keys <= start_pos + i
    qpos = torch.arange(start_pos, start_pos + T, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= qpos, False  # [T, S]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | StepPosition = 0, cache=None
    ) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x.to(self.qkv.weight.dtype)).view(B, T, 3, self.heads, self.head_dim)  # [B, T, 3, H, D]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3x [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(start_pos, StepPosition):  # decode step: one query at start_pos.pos [1]
            span = start_pos.keys.shape[0]
            k, v = cache.write(start_pos.pos, k, v, span)  # the first span slots [B, H, S, D]; > pos are stale
            mask, causal = start_pos.keys[None, :] <= start_pos.pos, False  # [1, S]
        else:
            if cache is not None:
                k, v = cache.update(start_pos, k, v)  # [B, H, start_pos + T, D]
            mask, causal = prefix_mask(T, k.shape[2], start_pos, x.device)
        dp = self.dropout if self.training else 0.0
        # [B, H, T, D]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dp)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down (output projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.w1.weight.dtype)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, start_pos: int | StepPosition = 0, cache=None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, start_pos, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


__all__ = ["StepPosition", "RMSNorm", "rope_cache", "apply_rope", "prefix_mask", "Attention", "SwiGLU", "Block"]
