"""OneDTokenizer: image -> K ordered discrete tokens -> image from any prefix.

    tok = OneDTokenizer.from_preset("tiny")
    ids = tok.encode(images, num_tokens=8)     # images [B, 3, H, W] float in [0, 1] -> int64 [B, 8]
    recon = tok.decode(ids)                    # [B, 3, H, W] float in [0, 1]
    tok.save_pretrained("out/"); tok = OneDTokenizer.from_pretrained("out/")

`forward` is the training path: it returns the un-clamped reconstruction in [-1, 1] space, the ids, the
quantizer's aux loss and the keep lengths the length mechanism drew for this batch. `forward(x, num_tokens=k)`
decodes the first k tokens, the same function as `decode(encode(x, k))` but without clamping.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .adaptive import AdaptiveTokens, encode_adaptive
from .config import TokenizerConfig, preset_config
from .decoder import Decoder
from .encoder import Encoder
from .length import KeepLengths, draw_keep_lengths
from .persistence import WEIGHTS_NAME, load_model_state, load_state_strict, read_model_config, save_model_dir
from .quantizer import Quantizer, QuantizerStats

FORMAT = "onedtok-tokenizer/1"


class TokenizerOutput(NamedTuple):
    recon: torch.Tensor  # [B, 3, H, W] in [-1, 1] space, not clamped
    ids: torch.Tensor  # [B, K] int64
    aux_loss: torch.Tensor  # scalar quantizer loss
    stats: QuantizerStats
    lengths: torch.Tensor  # [B] int64: leading tokens the decoder saw
    # cross-length joint training only (else None): the second decode, of the prefix the length mechanism drew
    prefix_recon: torch.Tensor | None = None  # [B, 3, H, W]
    prefix_lengths: torch.Tensor | None = None  # [B] int64


def _as_lengths(keep: KeepLengths, batch_size: int, device: torch.device) -> torch.Tensor:
    """The keep length of every sample, [B] int64 (a fill on the device, not a host-to-device copy)."""
    if keep.lengths is not None:
        return keep.lengths
    return torch.full((batch_size,), keep.num_tokens, dtype=torch.long, device=device)


class OneDTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = TokenizerConfig(**overrides)
        elif overrides:
            config = TokenizerConfig.from_dict({**config.to_dict(), **overrides})
        self._build(config)

    def _build(self, config: TokenizerConfig, parts_device: str | torch.device | None = None) -> None:
        self.config = config
        self.quantizer = Quantizer.from_config(config)
        with contextlib.nullcontext() if parts_device is None else torch.device(parts_device):
            self.encoder = Encoder(config, out_dim=self.quantizer.dim)
            self.decoder = Decoder(config, token_dim=self.quantizer.dim)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> OneDTokenizer:
        return cls(preset_config(name, **overrides))

    # ---- public attributes ----------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    # ---- training path --------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, lengths: torch.Tensor | None = None,
                num_tokens: int | None = None) -> TokenizerOutput:
        """images [B, 3, H, W] in [0, 1]. By default the length mechanism draws the keep lengths while training,
        and all K tokens are decoded in eval mode. `num_tokens=k` decodes the first k tokens of every sample (a
        slice: the cheap way to evaluate one k); `lengths` [B] gives each sample its own keep length (tail drop
        masks the rest, nested dropout fills them with the mask token). With `cross_length_joint`, a training
        forward that draws its lengths decodes twice from one encoding: all K tokens (`recon`) and the drawn
        prefix (`prefix_recon`, `prefix_lengths`); with one-k-per-batch tail drop that second pass costs k/K of
        the latent tokens."""
        b = images.shape[0]
        joint = self.training and self.config.cross_length_joint and lengths is None and num_tokens is None
        if lengths is not None and num_tokens is not None:
            raise ValueError("pass either lengths (one per sample) or num_tokens (one for the batch), not both")
        if num_tokens is not None:
            keep = KeepLengths(self._check_num_tokens(num_tokens), None)
        elif lengths is not None:
            keep = KeepLengths(self.max_tokens, lengths)
        elif self.training:
            keep = draw_keep_lengths(self.config, b, images.device)
        else:
            keep = KeepLengths(self.max_tokens, None)
        z = self.encoder(self._to_model_range(images))  # [B, K, D]
        q = self.quantizer(z)
        tokens = q.quantized.to(z.dtype)  # [B, K, D]
        recon = self._to_signed(self.decoder(tokens[:, : keep.num_tokens], keep.lengths))  # [B, 3, H, W]
        out_lengths = _as_lengths(keep, b, images.device)
        if not joint:
            return TokenizerOutput(recon, q.ids, q.aux_loss, q.stats, out_lengths)
        full = self._to_signed(self.decoder(tokens))  # [B, 3, H, W] all K tokens
        k_all = _as_lengths(KeepLengths(self.max_tokens, None), b, images.device)
        return TokenizerOutput(full, q.ids, q.aux_loss, q.stats, k_all, prefix_recon=recon, prefix_lengths=out_lengths)

    # ---- inference API (contract) ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, num_tokens: int | None = None, *, check_inputs: bool = True) -> torch.Tensor:
        """images [B, 3, H, W] float in [0, 1] -> ids int64 [B, k], k = num_tokens or K.
        Tokens are ordered: encode(x, num_tokens=k) == encode(x)[:, :k].
        check_inputs=False skips the checks of `images` (type, shape, finite and in [0, 1]: host syncs on a GPU),
        for loops whose images are valid by construction (e.g. uint8 / 255); invalid images then give wrong ids,
        not an error."""
        if check_inputs:
            self._check_images(images)
        k = self._check_num_tokens(num_tokens)
        with self._inference():
            z = self.encoder(self._to_model_range(images.to(self._dtype())))
            return self.quantizer(z).ids[:, :k]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, lengths: torch.Tensor | None = None, *,
               check_inputs: bool = True) -> torch.Tensor:
        """ids int64 [B, k], 1 <= k <= K -> images float [B, 3, H, W] in [0, 1].
        lengths int [B] (1..k): image b is decoded from its first lengths[b] tokens only, in the same batch
        (equal to decoding ids[b:b+1, :lengths[b]] alone); the ids past a length are ignored (padding).
        check_inputs=False skips the checks of `ids` and `lengths` (their value ranges are host syncs on a GPU),
        for loops whose ids come from `encode` and whose lengths are in 1..k by construction."""
        if check_inputs:
            self._check_ids(ids)
        if lengths is not None:
            lengths = self._check_lengths(lengths, ids.shape) if check_inputs else lengths.long()
        with self._inference():
            tokens = self.quantizer.codes_from_ids(ids.long()).to(self._dtype())  # [B, k, D]
            return self._to_unit(self.decoder(tokens, lengths)).clamp(0, 1).float()

    @torch.no_grad()
    def encode_adaptive(self, images: torch.Tensor, min_psnr: float | None = None, max_lpips: float | None = None,
                        min_tokens: int = 1, max_tokens: int | None = None, lpips_model=None) -> AdaptiveTokens:
        """Per image, the fewest tokens whose reconstruction meets the target (tokenizer/adaptive.py):
        ids [B, max_tokens] (0 past each length) and lengths [B]. Exactly one of min_psnr (dB, on the uint8
        reconstruction) or max_lpips; about log2(K) + 1 batched decode passes."""
        return encode_adaptive(self, images, min_psnr, max_lpips, min_tokens, max_tokens, lpips_model)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        return self.decode(self.encode(images, num_tokens))

    # ---- persistence (contract): safetensors + JSON, atomic, strict (tokenizer/persistence.py) ------------
    def save_pretrained(self, directory: str | Path, provenance: dict | None = None) -> Path:
        """config.json + model.safetensors in `directory`; `provenance` (JSON-able: how it was trained) is kept
        in config.json for `onedtok info`."""
        return save_model_dir(directory, self, self.config.to_dict(), FORMAT, provenance)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> OneDTokenizer:
        config = read_model_config(directory, FORMAT)
        model = cls.empty(TokenizerConfig.from_dict(config))
        state = load_model_state(directory, config, map_location)
        load_state_strict(model, state, source=Path(directory) / WEIGHTS_NAME)
        return model.eval()

    @classmethod
    def empty(cls, config: TokenizerConfig, device: str | torch.device = "cpu") -> OneDTokenizer:
        """The model of `config` with its encoder and decoder allocated but not initialised, for a strict load to
        fill (from_pretrained, the released-weight converter): their random init costs seconds for B and most of
        a minute for L, and every one of their tensors is persistent, so the load overwrites all of it. The
        quantizer is built normally: it is small and holds a non-persistent buffer that no state dict restores."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        with torch.device(device):
            model._build(config, parts_device="meta")
        if torch.device(device).type != "meta":
            model.encoder.to_empty(device=device)
            model.decoder.to_empty(device=device)
        return model

    def load_state_dict_strict(self, state: dict[str, torch.Tensor], source: object = "state dict") -> None:
        """load_state_dict(strict=True) with one readable error for missing, unexpected or mis-shaped keys."""
        load_state_strict(self, state, source)

    # ---- input validation -----------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [0, 1], got dtype {images.dtype} "
                            "(convert uint8 with images.float() / 255)")
        if images.ndim != 4:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB) in dim 1, got shape {tuple(images.shape)}")
        size = self.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"this tokenizer takes {size}x{size} images, got {tuple(images.shape[-2:])}")
        if images.numel() and (not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1):
            raise ValueError(f"image values must be finite and in [0, 1], got range "
                             f"[{images.min().item():.4g}, {images.max().item():.4g}]")

    def _check_num_tokens(self, num_tokens: int | None) -> int:
        if num_tokens is None:
            return self.max_tokens
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
        if not 1 <= num_tokens <= self.max_tokens:
            raise ValueError(f"num_tokens must be in 1..{self.max_tokens}, got {num_tokens}")
        return num_tokens

    def _check_lengths(self, lengths: torch.Tensor, ids_shape: torch.Size) -> torch.Tensor:
        b, k = ids_shape
        if not isinstance(lengths, torch.Tensor) or lengths.is_floating_point() or lengths.shape != (b,):
            got = f"{lengths.dtype} {tuple(lengths.shape)}" if isinstance(lengths, torch.Tensor) else repr(lengths)
            raise ValueError(f"lengths must be an integer tensor of shape [{b}], got {got}")
        lo, hi = (int(v) for v in lengths.aminmax())
        if lo < 1 or hi > k:
            raise ValueError(f"lengths must be in 1..{k} (the ids' token count), got range [{lo}, {hi}]")
        return lengths.long()

    def _check_ids(self, ids: torch.Tensor) -> None:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor (int64), got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape [B, k], got {tuple(ids.shape)}")
        if not 1 <= ids.shape[1] <= self.max_tokens:
            raise ValueError(f"ids must hold 1..{self.max_tokens} tokens per image, got {ids.shape[1]}")
        if ids.numel():
            # compared as Python ints: in the ids' own dtype (uint8, int8) the codebook size would wrap around
            lo, hi = (int(v) for v in ids.aminmax())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"ids must be in [0, {self.codebook_size}), got range [{lo}, {hi}]")

    # ---- helpers --------------------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return self.decoder.token_in.weight.dtype

    # The public API is [0, 1] images in and a [-1, 1]-space reconstruction out of forward (what the losses
    # compare); the networks work in config.pixel_range ([0, 1] for converted TiTok weights).
    def _to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1 if self.config.pixel_range == "[-1, 1]" else images

    def _to_signed(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.config.pixel_range == "[-1, 1]" else out * 2 - 1

    def _to_unit(self, out: torch.Tensor) -> torch.Tensor:
        return (out + 1) / 2 if self.config.pixel_range == "[-1, 1]" else out

    @contextlib.contextmanager
    def _inference(self):
        """Eval mode for the duration (no codebook EMA updates, no dead-code resets), then restore."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode
