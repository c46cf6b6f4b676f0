"""Reconstruction quality per token count: a table (markdown + JSON), plots and an image grid.

    python -m eval.reconstruction --tokenizer checkpoints/demo/tokenizer --out checkpoints/demo/report
    python -m eval.reconstruction --checkpoint checkpoints/demo/ckpt/last.ckpt --num-tokens 1 4 16 32

The tokenizer comes from a `save_pretrained` directory or a training checkpoint (EMA weights when present).
Images: the embedded held-out crops (default). For every k it reconstructs from the first k tokens,
quantises the reconstruction to uint8 exactly like the references, and reports PSNR, SSIM, codebook usage and
bits per image (k * log2(codebook size)).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizer import OneDTokenizer  # noqa: E402
from tokenizer.training.module import default_eval_tokens, make_grid, tokenizer_from_checkpoint  # noqa: E402


@dataclass
class RowMetrics:
    num_tokens: int
    bits_per_image: float
    psnr: float
    ssim: float
    codebook_usage: float  # fraction of codes used by these images' first k tokens


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8, rounding to nearest (how reconstructions become image files)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def psnr_uint8(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of uint8 images [B, 3, H, W]. [B]"""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0**2 / mse)


def ssim_uint8(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Gaussian window 11, sigma 1.5; torchmetrics) of uint8 images. scalar"""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(x.float() / 255, y.float() / 255, data_range=1.0)


def load_tokenizer(tokenizer_dir: str | None, checkpoint: str | None) -> OneDTokenizer:
    if bool(tokenizer_dir) == bool(checkpoint):
        raise ValueError("give exactly one of --tokenizer (a save_pretrained directory) or --checkpoint")
    return OneDTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else tokenizer_from_checkpoint(checkpoint)


@torch.no_grad()
def evaluate(tokenizer: OneDTokenizer, images: torch.Tensor, num_tokens: list[int], batch_size: int = 64):
    """images float [N, 3, S, S] in [0, 1]. Returns (rows, {k: uint8 reconstructions [N, 3, S, S]})."""
    tokenizer.eval()
    refs = to_uint8(images)
    ids = torch.cat([tokenizer.encode(refs[i:i + batch_size].float() / 255) for i in range(0, len(refs), batch_size)])
    rows, recons = [], {}
    for k in num_tokens:
        rec = torch.cat([to_uint8(tokenizer.decode(ids[i:i + batch_size, :k])) for i in range(0, len(ids), batch_size)])
        recons[k] = rec
        used = torch.unique(ids[:, :k]).numel() / tokenizer.codebook_size
        rows.append(RowMetrics(
            num_tokens=k,
            bits_per_image=k * math.log2(tokenizer.codebook_size),
            psnr=psnr_uint8(rec, refs).mean().item(),
            ssim=ssim_uint8(rec, refs).item(),
            codebook_usage=used,
        ))  # fmt: skip
    return rows, recons


def markdown_table(rows: list[RowMetrics]) -> str:
    lines = ["| k tokens | bits/image | PSNR (dB) | SSIM | codebook usage |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.num_tokens} | {r.bits_per_image:.0f} | {r.psnr:.2f} | {r.ssim:.4f} | "
                     f"{r.codebook_usage:.3f} |")
    return "\n".join(lines)


def plot_metrics(rows: list[RowMetrics], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ks = [r.num_tokens for r in rows]
    for ax, key, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        ax.plot(ks, [getattr(r, key) for r in rows], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens k (log2 scale)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_grid(originals: torch.Tensor, recons: dict[int, torch.Tensor], path: Path, max_images: int = 8) -> None:
    """Rows: originals, then the reconstruction from k tokens for each k (ascending)."""
    from PIL import Image

    n = min(max_images, len(originals))
    rows = torch.stack([originals[:n].float() / 255] + [recons[k][:n].float() / 255 for k in sorted(recons)])
    grid = make_grid(rows)
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).resize((array.shape[1] * 2, array.shape[0] * 2), Image.NEAREST).save(path)


def write_report(rows: list[RowMetrics], originals: torch.Tensor, recons: dict[int, torch.Tensor], out: Path,
                 meta: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    header = (f"# Reconstruction per token count\n\n{meta['description']}\n\n"
              f"Images: {meta['num_images']} ({meta['source']}). Metrics on uint8 reconstructions.\n\n")
    (out / "metrics.md").write_text(header + table + "\n")
    (out / "metrics.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    plot_metrics(rows, out / "metrics_vs_tokens.png", meta["description"])
    refs = to_uint8(originals) if originals.is_floating_point() else originals
    save_grid(refs, recons, out / "reconstructions.png")
    return table


def main(argv: list[str] | None = None) -> list[RowMetrics]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="save_pretrained directory")
    parser.add_argument("--checkpoint", help="TokenizerModule Lightning checkpoint (EMA weights used if present)")
    parser.add_argument("--num-tokens", type=int, nargs="+", help="token counts (default 1, 2, 4, ..., K)")
    parser.add_argument("--out", required=True, help="report directory")
    parser.add_argument("--val-crops-per-scale", type=int, default=4)
    args = parser.parse_args(argv)

    from data.sample import SampleImagesDataModule

    tokenizer = load_tokenizer(args.tokenizer, args.checkpoint)
    ks = args.num_tokens or default_eval_tokens(tokenizer.max_tokens)
    dm = SampleImagesDataModule(image_size=tokenizer.image_size, val_crops_per_scale=args.val_crops_per_scale)
    images = dm.val_batch()
    rows, recons = evaluate(tokenizer, images, ks)
    cfg = tokenizer.config
    meta = {
        "description": f"{cfg.quantizer.upper()} {tokenizer.codebook_size} codes, K={tokenizer.max_tokens}, "
                       f"{cfg.length_mechanism}, {cfg.image_size}px",
        "num_images": len(images),
        "source": "embedded held-out crops (data.sample VAL_IMAGES)",
        "tokenizer_config": cfg.to_dict(),
    }
    table = write_report(rows, images, recons, Path(args.out), meta)
    print(table)
    print(f"report written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
