"""Adaptive-length token records for `data.extract_tokens`: each image keeps the fewest tokens that meet a
quality target (`tok.encode_adaptive`, tokenizer/adaptive.py), stored padded with per-record lengths.

    python -m data.extract_tokens --tokenizer TOK --out OUT --source photos --min-psnr 18
    python -m data.extract_tokens --tokenizer TOK --out OUT --source folder --root DIR --max-lpips 0.3 --flip

`--num-tokens` is then the largest length allowed (default K). meta.json records the target
({"min_psnr": 18.0} or {"max_lpips": 0.3}) and the length statistics (data/token_format.py); a generator trained
on these shards learns an end-of-image token (tokenizer/generator/end_token.py). `--max-lpips` needs the
real LPIPS-VGG weights (`make weights`): LPIPS from a random network would choose meaningless lengths.
With `--flip` the flipped view gets its own search, so lengths are [N, 2] like the ids [N, 2, K].
"""

from __future__ import annotations

import argparse

import torch

from tokenizer.adaptive import check_targets
from tokenizer.precision import autocast


def add_adaptive_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--min-psnr", type=float, help="adaptive lengths: fewest tokens with PSNR >= this (dB)")
    group.add_argument("--max-lpips", type=float, help="adaptive lengths: fewest tokens with LPIPS <= this")


def length_target(args: argparse.Namespace) -> dict | None:
    """{"min_psnr": X} or {"max_lpips": Y} from the flags (None: fixed-length records); a target out of range
    is refused here, before any image is read."""
    if args.min_psnr is not None or args.max_lpips is not None:
        try:
            check_targets(args.min_psnr, args.max_lpips)
        except ValueError as e:
            raise SystemExit(f"--min-psnr/--max-lpips: {e}") from None
    if args.min_psnr is not None:
        return {"min_psnr": float(args.min_psnr)}
    if args.max_lpips is not None:
        return {"max_lpips": float(args.max_lpips)}
    return None


@torch.no_grad()
def encode_adaptive_batch(tokenizer, images: torch.Tensor, max_tokens: int, flip: bool, target: dict,
                          precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """images [B, 3, S, S] -> (ids [B, max_tokens] padded with 0, lengths [B]), or ([B, 2, max_tokens], [B, 2])
    with flip (the image, then its horizontal flip). The encoder and the search's decodes run under
    `precision` autocast, as `extract_tokens.encode_batch` (None: bf16 on CUDA, fp32 on CPU)."""
    batch = torch.cat([images, images.flip(-1)]) if flip else images  # [B or 2B, 3, S, S]
    with autocast(precision, images.device):
        ids, lengths = tokenizer.encode_adaptive(batch, max_tokens=max_tokens, **target)  # [B', k], [B']
    if not flip:
        return ids, lengths
    b = len(images)
    return torch.stack([ids[:b], ids[b:]], dim=1), torch.stack([lengths[:b], lengths[b:]], dim=1)


__all__ = ["add_adaptive_args", "length_target", "encode_adaptive_batch"]
