"""A Llama-style GPT over 1D image token ids (LlamaGen's class-conditional recipe).

The sequence the transformer sees for K image tokens is

    position:  0            1        2              K-1
    input:     [class]      id_0     id_1     ...   id_{K-2}
    predicts:  id_0         id_1     id_2     ...   id_{K-1}

so the output at position 0 (the class token) predicts the first image token.

End-of-image token (`end_token=True`, for variable-length records, e.g. adaptive extraction): the vocabulary
gains one id, `end_id` = vocab_size, in the embedding and the head. A record of length L (ids[:, L:] padding)
has targets id_0 .. id_{L-1}, END, and the positions after END are ignored in the loss; the inputs after
position L are END (whatever the padding held). A record of length L = T (the full sequence) has no END target:
sampling stops at K anyway, so no position K + 1 is needed and max_tokens stays K. Sampling
(`sampling.generate`) then stops each sample where it draws END.

Classifier-free guidance uses an
extra "null" class (index `num_classes`): during training a label is replaced by it with probability
`class_dropout_prob`; an unconditional model always uses it.

Architecture (`layers.py`): pre-norm RMSNorm, SwiGLU MLP, 1D rotary position embedding on q/k, no biases,
attention through `F.scaled_dot_product_attention`. Named presets live in `PRESETS`:

    model = GPT.from_preset("B", vocab_size=4096, max_tokens=128, num_classes=1000)

Training calls `model(ids, labels, return_logits=False, check_values=False)`: the loss then comes from
`loss.linear_cross_entropy` (no fp32 logits of the whole batch), and nothing reads a value on the host (the
Lightning module range-checks the token data once, at setup).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_ranges
from ..persistence import WEIGHTS_NAME, load_model_state, load_state_strict, read_model_config, save_model_dir
from .end_token import check_lengths, end_token_sequences
from .layers import Block, RMSNorm, StepPosition, rope_cache
from .loss import IGNORE_INDEX, linear_cross_entropy

FORMAT = "onedtok-gpt/1"


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


# Allowed values of GPTConfig's numeric fields, as tokenizer/config.py's RANGES: (lowest, highest, lowest allowed).
GPT_RANGES = {
    "vocab_size": (2, None, True), "max_tokens": (1, None, True), "num_classes": (0, None, True),
    "dim": (1, None, True), "depth": (1, None, True), "heads": (1, None, True), "mlp_hidden": (1, None, True),
    "mlp_multiple_of": (1, None, True), "class_dropout_prob": (0, 1, True), "rope_base": (0, None, False),
    "norm_eps": (0, None, False), "dropout": (0, 1, True), "init_std": (0, None, False),
}  # fmt: skip


@dataclass
class GPTConfig:
    vocab_size: int = 4096  # = tokenizer codebook size
    max_tokens: int = 128  # K = tokenizer max_tokens (the class token takes position 0, ids 1..K-1 follow)
    num_classes: int = 1000  # 0 means unconditional (only the null class exists)
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_hidden: int | None = None  # None: Llama's find_multiple(8/3 * dim, mlp_multiple_of)
    mlp_multiple_of: int = 256
    class_dropout_prob: float = 0.1  # label -> null class while training (for CFG)
    unconditional: bool = False  # always the null class
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    # residual and attention dropout: off by default (the tests, the CPU demo configs/generator/tiny.yaml); the
    # LlamaGen recipe, configs/base/generator-llamagen.yaml, sets 0.1 for every size it trains (B, L and XL)
    dropout: float = 0.0
    init_std: float = 0.02
    end_token: bool = False  # one more id, end_id = vocab_size: "this image is done" (variable-length records)

    def __post_init__(self) -> None:
        check_ranges(self, GPT_RANGES)  # first: dim % heads divides by heads
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if (self.dim // self.heads) % 2:
            raise ValueError(f"head dim {self.dim // self.heads} must be even for rotary embeddings")
        if self.mlp_hidden is None:
            self.mlp_hidden = _find_multiple(int(2 * 4 * self.dim / 3), self.mlp_multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def end_id(self) -> int:
        """The end-of-image id (only with end_token): the first id after the codebook."""
        if not self.end_token:
            raise ValueError("this GPT has no end-of-image token (GPTConfig.end_token is False)")
        return self.vocab_size

    @property
    def num_ids(self) -> int:
        """Rows of the token embedding and the output head: the codebook, plus END with end_token."""
        return self.vocab_size + int(self.end_token)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def is_unconditional(self) -> bool:
        return self.unconditional or self.num_classes == 0


# Architecture presets; data-dependent fields (vocab_size, max_tokens, num_classes) are set by overrides.
# B/L/XL follow LlamaGen's GPT-B/L/XL (111M/343M/775M parameters at vocab 16384).
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(dim=192, depth=4, heads=4, mlp_multiple_of=64),  # CPU demo, ~3.5M params at vocab 4096
    "B": GPTConfig(dim=768, depth=12, heads=12),
    "L": GPTConfig(dim=1024, depth=24, heads=16),
    "XL": GPTConfig(dim=1280, depth=36, heads=20),
}


# Renamed fields: saved models and checkpoints written under the old name keep loading.
RENAMED_FIELDS = {"block_size": "max_tokens"}


def current_field_names(values: dict) -> dict:
    """`values` with renamed GPTConfig fields under their current names (a value under both is an error)."""
    out = dict(values)
    for old, new in RENAMED_FIELDS.items():
        if old in out:
            if new in out:
                raise ValueError(f"GPT config gives both {old!r} (its old name) and {new!r}")
            out[new] = out.pop(old)
    return out


def preset_config(name: str, **overrides) -> GPTConfig:
    overrides = current_field_names(overrides)
    if name not in PRESETS:
        raise ValueError(f"unknown GPT preset {name!r}; known: {sorted(PRESETS)}")
    base = PRESETS[name]
    if "dim" in overrides and "mlp_hidden" not in overrides:
        overrides["mlp_hidden"] = None  # recompute from the new width
    return dataclasses.replace(base, **overrides)  # re-runs __post_init__; unknown keys -> TypeError


def value_range(t: torch.Tensor) -> tuple[int, int] | None:
    """(min, max) of an integer tensor as Python ints (None when empty). Python ints compare exactly: comparing a
    uint8/int8 tensor with vocab_size in the tensor's own dtype would wrap the bound (300 -> 44 in uint8)."""
    if not t.numel():
        return None
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"ids/labels must be an integer tensor, got {t.dtype}")
    try:
        lo, hi = torch.aminmax(t)  # min/max are exact in any integer dtype: no int64 copy of a whole data set
    except (RuntimeError, NotImplementedError):  # unsigned dtypes without aminmax (uint16/32/64)
        lo, hi = torch.aminmax(t.long())
    return int(lo), int(hi)


def _check_values(t: torch.Tensor) -> bool:
    """Range-check ids/labels on CPU only: on an accelerator the check would sync the host every step.

    Values bound for an accelerator are checked while still on the CPU instead (`GPT.check_ids` /
    `GPT.check_labels`): `condition_labels` checks labels before moving them, and the Lightning module checks
    the whole token data set once at setup.
    """
    return t.numel() > 0 and t.device.type == "cpu"


class GPTOutput(NamedTuple):
    logits: torch.Tensor | None  # [B, T, V] fp32; None with return_logits=False
    loss: torch.Tensor | None  # scalar mean cross-entropy, when targets were given


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last entry: null class
        self.tok_emb = nn.Embedding(cfg.num_ids, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_ids, bias=False)
        # RoPE tables are not buffers so that model.to(bfloat16) cannot round them; built per device/dtype.
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPT:
        return cls(preset_config(name, **overrides))

    def save_pretrained(self, directory: str | Path, provenance: dict | None = None) -> Path:
        """config.json + model.safetensors (no pickle), atomic and format-tagged (tokenizer/persistence.py)."""
        return save_model_dir(directory, self, dataclasses.asdict(self.cfg), FORMAT, provenance)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> GPT:
        """Strict load: a missing, unexpected or mis-shaped key is an error naming the file."""
        saved = read_model_config(directory, FORMAT)
        config = current_field_names(saved)
        known = {f.name for f in dataclasses.fields(GPTConfig)}
        if unknown := sorted(set(config) - known):
            raise ValueError(f"{Path(directory) / 'config.json'}: unknown GPTConfig fields {unknown}")
        model = cls(GPTConfig(**config))
        state = load_model_state(directory, saved, map_location)  # checked against the config as saved
        load_state_strict(model, state, Path(directory) / WEIGHTS_NAME)
        return model.to(map_location)

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * depth)."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for block in self.blocks:
            for w in (block.attn.proj.weight, block.mlp.w2.weight):
                nn.init.normal_(w, mean=0.0, std=std / math.sqrt(2 * self.cfg.depth))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + self.class_emb.weight.numel()
        return n

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay matrices of Linear layers only, not norms or embeddings."""
        decay, no_decay = [], []
        for module in self.modules():
            for _, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                (decay if isinstance(module, nn.Linear) and p.ndim >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ---- value checks (they read the values: call them on CPU tensors, a GPU tensor would sync the host) ----
    def check_ids(self, ids: torch.Tensor) -> None:
        """ValueError unless every id is in [0, vocab_size)."""
        lo_hi = value_range(ids)
        if lo_hi is not None and (lo_hi[0] < 0 or lo_hi[1] >= self.cfg.vocab_size):
            raise ValueError(f"ids must be in [0, {self.cfg.vocab_size}), got [{lo_hi[0]}, {lo_hi[1]}]")

    def check_labels(self, labels: torch.Tensor) -> None:
        """ValueError unless every label is in [0, null_class] (an unconditional model ignores labels)."""
        null = self.cfg.null_class
        lo_hi = None if self.cfg.is_unconditional else value_range(labels)
        if lo_hi is not None and (lo_hi[0] < 0 or lo_hi[1] > null):
            raise ValueError(f"labels must be in [0, {null}] ({null} = null class), got [{lo_hi[0]}, {lo_hi[1]}]")

    # ---- conditioning -------------------------------------------------------------------------------------
    def condition_labels(
        self, labels: torch.Tensor | None, batch_size: int, device, drop: bool | None = None, check: bool = True
    ) -> torch.Tensor:
        """Labels [B] int64 after unconditional mode and label dropout (`drop=None`: dropout iff training).
        check=False skips the CPU range check (labels validated elsewhere: it reads their values)."""
        null = self.cfg.null_class
        if labels is None or self.cfg.is_unconditional:
            return torch.full((batch_size,), null, dtype=torch.long, device=device)
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape [{batch_size}], got {tuple(labels.shape)}")
        if check and _check_values(labels):  # before the transfer: CPU labels bound for a GPU are checked too
            self.check_labels(labels)
        labels = labels.to(device=device, dtype=torch.long)
        drop = self.training if drop is None else drop
        if drop and self.cfg.class_dropout_prob > 0:
            dropped = torch.rand(batch_size, device=device) < self.cfg.class_dropout_prob  # [B]
            labels = torch.where(dropped, torch.full_like(labels, null), labels)
        return labels

    # ---- transformer ---------------------------------------------------------------------------------------
    def embed(self, labels: torch.Tensor | None, ids: torch.Tensor | None) -> torch.Tensor:
        """[class token] + token embeddings. labels [B] (already conditioned) or None, ids [B, T] or None."""
        parts = []
        if labels is not None:
            parts.append(self.class_emb(labels)[:, None])  # [B, 1, C]
        if ids is not None and ids.shape[1] > 0:
            parts.append(self.tok_emb(ids))  # [B, T, C]
        return torch.cat(parts, dim=1)  # [B, T', C]

    def rope_tables(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = (x.device, dtype)
        if key not in self._rope:
            cos, sin = rope_cache(self.cfg.max_tokens, self.cfg.head_dim, self.cfg.rope_base)  # [K, D] fp64
            self._rope[key] = (cos.to(x.device, dtype), sin.to(x.device, dtype))
        return self._rope[key]

    def hidden(self, x: torch.Tensor, start_pos: int | StepPosition = 0, cache=None) -> torch.Tensor:
        """Embedded sequence x [B, T, C] at positions start_pos.. -> final normed hidden states [B, T, C].

        start_pos: an int, or a `StepPosition` for the compiled one-token decode step (T = 1; the cache's
        `write` path, see layers.py)."""
        T = x.shape[1]
        cos, sin = self.rope_tables(x)  # [K, D]
        if isinstance(start_pos, StepPosition):
            if T != 1 or cache is None:
                raise ValueError(f"a StepPosition is the one-token decode step: T must be 1 with a cache, got {T}")
            cos, sin = cos.index_select(0, start_pos.pos), sin.index_select(0, start_pos.pos)  # [1, D]
        else:
            if start_pos + T > self.cfg.max_tokens:
                raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed max_tokens {self.cfg.max_tokens}")
            cos, sin = cos[start_pos : start_pos + T], sin[start_pos : start_pos + T]  # [T, D]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, start_pos, None if cache is None else cache.layers[i])
        return self.norm(x)

    def transformer(self, x: torch.Tensor, start_pos: int | StepPosition = 0, cache=None) -> torch.Tensor:
        """Embedded sequence x [B, T, C] at positions start_pos.. -> logits [B, T, V] (fp32)."""
        h = self.hidden(x, start_pos, cache)  # [B, T, C]
        return self.head(h.to(self.head.weight.dtype)).float()

    def forward(
        self,
        ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        compute_loss: bool = True,
        drop_labels: bool | None = None,
        return_logits: bool = True,
        check_values: bool = True,
        max_loss_logits: int | None = None,
        lengths: torch.Tensor | None = None,
    ) -> GPTOutput:
        """Teacher-forced logits for image ids [B, T] (T <= max_tokens); logits[:, t] predicts ids[:, t].

        return_logits=False: no logits (None); the loss is the chunked `linear_cross_entropy` (at most
        `max_loss_logits` fp32 logit values alive at once). check_values=False: no CPU range check of ids and
        labels (it reads their values; training checks the data once, at setup). lengths [B] (end_token models
        only): record b is ids[b, :lengths[b]], then END (end_token.py); the loss is the mean over the
        positions up to and including END."""
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an integer tensor [B, T], got {ids.dtype} {tuple(ids.shape)}")
        B, T = ids.shape
        if not 1 <= T <= self.cfg.max_tokens:
            raise ValueError(f"sequence length {T} must be in 1..max_tokens={self.cfg.max_tokens}")
        if check_values and _check_values(ids):
            self.check_ids(ids)
        ids = targets = ids.long()
        if lengths is not None:
            if not self.cfg.end_token:
                raise ValueError("lengths (variable-length records) need a GPT with end_token=True: without an end "
                                 "token it would learn the padding; set GPTConfig.end_token")  # fmt: skip
            if check_values and _check_values(lengths):
                check_lengths(lengths, B)
            ids, targets = end_token_sequences(ids, lengths, self.cfg.end_id)  # [B, T] each
        cond = self.condition_labels(labels, B, ids.device, drop=drop_labels, check=check_values)  # [B]
        h = self.hidden(self.embed(cond, ids[:, :-1]))  # [B, T, C]
        logits = self.head(h).float() if return_logits else None  # [B, T, V]
        loss = None
        if compute_loss and logits is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T), ignore_index=IGNORE_INDEX)
        elif compute_loss:
            flat = targets.reshape(B * T)
            loss = linear_cross_entropy(h.reshape(B * T, -1), self.head.weight, flat, max_loss_logits, IGNORE_INDEX)
        return GPTOutput(logits, loss)
