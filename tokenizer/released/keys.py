"""Reference state dict (TiTok / One-D-Piece names) -> this project's state dict, one rule per key.

Every reference key is consumed exactly once and every project key is produced once; the caller then loads the
result strictly. Where two reference tensors are only ever used as a sum (a learned token plus its position),
the project keeps the sum, computed here in float32 as the reference computes it in its forward pass:
- `latent_tokens` + `encoder.latent_token_positional_embedding` -> `encoder.latent_tokens`;
- `*.class_embedding` + row 0 of `*.positional_embedding` -> `*.class_token` (rows 1.. -> the patch positions).

Transformer blocks: `nn.MultiheadAttention`'s `in_proj_weight` rows are (q, k, v) with contiguous heads, the
layout of this project's fused `qkv` (vit.py). 1x1 convs over tokens become linears ([O, I, 1, 1] -> [O, I]).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..config import TokenizerConfig

# block-internal names: reference -> project
BLOCK_NAMES = {"ln_1": "norm1", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
               "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias", "ln_2": "norm2",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
# MaskGIT-VQGAN residual block: reference -> project (vqgan_decoder.py)
VQGAN_BLOCK_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "nin_shortcut": "shortcut"}  # fmt: skip
# plain renames, both sides (single-stage head and the 2-stage code head included)
RENAMES = {
    "encoder.patch_embed": "encoder.patch_embed", "encoder.ln_pre": "encoder.pre_norm",
    "encoder.ln_post": "encoder.transformer.norm", "decoder.decoder_embed": "decoder.token_in",
    "decoder.ln_pre": "decoder.pre_norm", "decoder.ln_post": "decoder.transformer.norm",
    "decoder.conv_out": "decoder.conv_out",
    "pixel_decoder.conv_in": "decoder.vqgan.pixel_decoder.conv_in",
    "pixel_decoder.norm_out": "decoder.vqgan.pixel_decoder.norm_out",
    "pixel_decoder.conv_out": "decoder.vqgan.pixel_decoder.conv_out",
}  # fmt: skip


class KeyMapper:
    """Consumes reference tensors by name (each once) and records the project tensors it produces."""

    def __init__(self, reference: dict[str, torch.Tensor], source: object):
        self.reference, self.source = reference, source
        self.taken: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}

    def take(self, key: str) -> torch.Tensor:
        if key not in self.reference:
            raise ValueError(f"{self.source}: reference key {key!r} is missing; is the checkpoint truncated or of "
                             "another family?")
        if key in self.taken:
            raise AssertionError(f"reference key {key!r} consumed twice")
        self.taken.add(key)
        return self.reference[key].float()

    def put(self, key: str, value: torch.Tensor) -> None:
        if key in self.out:
            raise AssertionError(f"project key {key!r} produced twice")
        self.out[key] = value.contiguous()

    def left_over(self) -> list[str]:
        return sorted(set(self.reference) - self.taken)


def _linear_from_conv1x1(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], weight.shape[1])  # [O, I, 1, 1] -> [O, I]


def _class_and_positions(m: KeyMapper, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    cls = m.take(f"{side}.class_embedding")  # [1, W]
    pos = m.take(f"{side}.positional_embedding")  # [1 + N, W]
    return (cls + pos[:1])[None], pos[1:][None]  # [1, 1, W], [1, N, W]


def map_state(reference: dict[str, torch.Tensor], cfg: TokenizerConfig, codebook_prefix: str,
              source: object = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """(project state dict, reference keys no rule consumed). `codebook_prefix`: where the VQ codebook's buffers
    live in the project model (`quantizer.impl._codebook.`, from the model's own state dict)."""
    m = KeyMapper(reference, source)
    latents = m.take("latent_tokens") + m.take("encoder.latent_token_positional_embedding")  # [K, W]
    m.put("encoder.latent_tokens", latents[None])
    cls, pos = _class_and_positions(m, "encoder")
    m.put("encoder.class_token", cls)
    m.put("encoder.pos_embed", pos)
    to_token = m.take("encoder.conv_out.weight")
    m.put("encoder.to_token.weight", _linear_from_conv1x1(to_token))
    m.put("encoder.to_token.bias", m.take("encoder.conv_out.bias"))

    codes = m.take("quantize.embedding.weight")  # [V, D]
    if cfg.vq_distance == "cosine":  # the library keeps a cosine codebook l2-normalised (the reference normalises
        codes = F.normalize(codes, dim=-1)  # at every lookup: the same vectors)
    m.put(codebook_prefix + "embed", codes[None])
    m.put(codebook_prefix + "embed_avg", codes[None].clone())  # EMA state consistent with cluster size 1
    m.put(codebook_prefix + "cluster_size", torch.ones(1, codes.shape[0]))
    m.put(codebook_prefix + "initted", torch.tensor(True))

    cls, pos = _class_and_positions(m, "decoder")
    m.put("decoder.class_token", cls)
    m.put("decoder.patch_pos", pos)
    m.put("decoder.patch_query", m.take("decoder.mask_token"))
    m.put("decoder.latent_pos", m.take("decoder.latent_token_positional_embedding")[None])
    if cfg.decoder_head == "vqgan":
        head = "decoder.vqgan.code_head."
        for ref, ours in (("decoder.ffn.0", "hidden"), ("decoder.ffn.2", "logits")):
            m.put(head + ours + ".weight", _linear_from_conv1x1(m.take(ref + ".weight")))
            m.put(head + ours + ".bias", m.take(ref + ".bias"))
        m.put(head + "codebook", m.take("pixel_quantize.embedding.weight"))
    else:
        m.put("decoder.to_pixels.weight", _linear_from_conv1x1(m.take("decoder.ffn.0.weight")))
        m.put("decoder.to_pixels.bias", m.take("decoder.ffn.0.bias"))

    levels = len(cfg.vqgan_channel_mult)
    for key in sorted(reference):
        if key in m.taken:
            continue
        target = _renamed(key, levels)
        if target is not None:
            m.put(target, m.take(key))
    return m.out, m.left_over()


def _renamed(key: str, levels: int) -> str | None:
    """The project name of a reference key covered by a plain rename rule (None: no rule)."""
    block = re.fullmatch(r"(encoder|decoder)\.transformer\.(\d+)\.(.+)", key)
    if block:
        side, index, rest = block.groups()
        for ref, ours in BLOCK_NAMES.items():
            if rest == ref or rest.startswith(ref + "."):
                return f"{side}.transformer.blocks.{index}.{ours}{rest[len(ref):]}"
        return None
    res = re.fullmatch(r"pixel_decoder\.(mid\.\d+|up\.(\d+)\.block\.(\d+))\.(\w+)\.(weight|bias)", key)
    if res:
        where, up, block_index, layer, kind = res.groups()
        if layer not in VQGAN_BLOCK_NAMES:
            return None
        if up is not None:  # the reference's up[i] runs finest-first indexed; ours are in processing order
            where = f"levels.{levels - 1 - int(up)}.blocks.{block_index}"
        return f"decoder.vqgan.pixel_decoder.{where}.{VQGAN_BLOCK_NAMES[layer]}.{kind}"
    up_conv = re.fullmatch(r"pixel_decoder\.up\.(\d+)\.upsample_conv\.(weight|bias)", key)
    if up_conv:
        return f"decoder.vqgan.pixel_decoder.levels.{levels - 1 - int(up_conv.group(1))}.upsample.{up_conv.group(2)}"
    for ref, ours in RENAMES.items():
        if key.startswith(ref + "."):
            return ours + key[len(ref):]
    return None


__all__ = ["map_state", "KeyMapper", "BLOCK_NAMES", "VQGAN_BLOCK_NAMES", "RENAMES"]
