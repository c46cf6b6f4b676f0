"""Reconstruction report figures: metrics against k and against bits, per-position codebook usage, image grids,
and the histogram of the adaptive token counts. Every file is written through ``tokenizer.atomic``.

Rows are ``eval.recon_eval.Row``; a metric that does not exist (None, or NaN: no thumbnail fits, no FID) is left
out of a curve, never drawn as a number.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from eval.codecs import THUMBNAIL
from eval.recon_eval import Row
from tokenizer import atomic
from tokenizer.images import make_grid


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    _pyplot().close(fig)


PLOT_METRICS = (("rfid", "rFID (lower is better)"), ("lpips", "LPIPS (lower is better)"),
                ("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("codebook_usage", "codebook usage"))


def plot_metrics(rows: list[Row], out: Path, title: str) -> None:
    """metrics_vs_tokens.png (tokenizer, metric vs k) and metrics_vs_bits.png (all methods, log bits)."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r.method for r in rows))
    tok = [r for r in rows if r.method == "tokenizer"]
    keys = [(k, label) for k, label in PLOT_METRICS if any(getattr(r, k) is not None for r in tok)]
    # against k only the methods that spend at most k * log2(V) bits; JPEG/WebP overshoot small budgets by far,
    # so at "their" k they would look better than what those bits buy (they are in metrics_vs_bits.png)
    per_k = [m for m in ("tokenizer", THUMBNAIL) if m in methods]
    for fname, xs_of, xlabel, panel_keys, which in (
        ("metrics_vs_tokens.png", lambda r: r.num_tokens, "tokens k (log2 scale)", keys, per_k),
        ("metrics_vs_bits.png", lambda r: r.bits_per_image, "bits per image (log scale; codecs: achieved)",
         [kl for kl in keys if kl[0] != "codebook_usage"], methods),
    ):
        fig, axes = plt.subplots(1, len(panel_keys), figsize=(4 * len(panel_keys), 3.8), squeeze=False)
        for ax, (key, label) in zip(axes[0], panel_keys):
            for method in which:
                pts = sorted((xs_of(r), getattr(r, key)) for r in rows if r.method == method
                             and getattr(r, key) is not None and math.isfinite(getattr(r, key)))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method)
            ax.set_xscale("log", base=2 if fname == "metrics_vs_tokens.png" else 10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if len(which) > 1:
                ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        _save(fig, out / fname)


def save_grid(grid: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    """Rows: originals, then the `prefix@k` reconstructions for ascending k."""
    from PIL import Image

    names = sorted((n for n in grid if n.startswith(prefix + "@")), key=lambda n: int(n.split("@")[1]))
    if not names:
        return
    rows = torch.stack([grid["reference"].float() / 255] + [grid[n].float() / 255 for n in names])
    array = (make_grid(rows).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    scale = max(1, 128 // grid["reference"].shape[-1])
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    with atomic.atomic_open(path, "wb") as f:
        image.save(f, format="PNG")


def plot_usage(usage: dict, path: Path, title: str) -> None:
    """usage_per_position.png: usage against position, with the N/V ceiling when it is below 1."""
    from tokenizer.training.codebook import usage_curve_figure

    _pyplot()  # the Agg backend before the figure exists

    fig = usage_curve_figure(torch.tensor(usage["values"]), title=title)
    if usage["bound"] < 1:  # small N: every position is capped here, however diverse the codes
        ax = fig.axes[0]
        ax.axhline(usage["bound"], color="gray", linestyle="--", label=f"N/V = {usage['bound']:.3g}")
        ax.set_ylim(0, max(ax.get_ylim()[1], usage["bound"] * 1.1))
        ax.legend(fontsize=8)
    _save(fig, path)




def plot_adaptive_histogram(rows: list[dict], path: Path, title: str) -> None:
    """adaptive_k_hist.png: one panel per adaptive target, images per chosen k (k = 1..K), with the mean tokens
    (solid) and the fixed k of equal mean quality (dashed) where one exists. rows: eval.adaptive_eval.summarize."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.4), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], rows):
        counts = r["k_histogram"]  # [K]
        ax.bar(range(1, len(counts) + 1), counts, width=1.0, color="tab:blue", alpha=0.8)
        ax.axvline(r["mean_tokens"], color="black", label=f"mean {r['mean_tokens']:.2f}")
        if r["matched_k"] is not None:
            ax.axvline(r["matched_k"], color="tab:red", linestyle="--", label=f"fixed k {r['matched_k']:.2f}")
        ax.set_title(f"{r['label']} (met {r['fraction_met']:.0%})", fontsize=9)
        ax.set_xlabel("tokens k")
        ax.set_xlim(0.5, len(counts) + 0.5)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("images")
    axes[0][0].yaxis.get_major_locator().set_params(integer=True)  # image counts (the axes share y)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
