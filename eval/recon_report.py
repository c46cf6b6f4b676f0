"""Reconstruction report files: metrics.md (protocol, table, notes, adaptive section) and metrics.json (strict JSON:
a value that does not exist is null, never NaN), with the figures of ``eval.recon_plots`` and per_image.npz.
The report is written as a whole (``eval.outputs``): every file into a fresh directory beside ``out``, swapped in
when all are written, so a killed or failed run (a full disk) leaves the previous report complete and untouched,
and a report never holds files of another run (figures of another k list beside new metrics).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data.skips import report_line
from eval.codecs import THUMBNAIL, thumbnail_side
from eval.outputs import owned_by
from eval.recon_eval import PROTOCOL, Row
from eval.recon_plots import plot_adaptive_histogram, plot_metrics, plot_usage, save_grid
from tokenizer import atomic

# Every file a report may hold (the codec grids are reconstructions_<codec>.png): what a new report replaces.
REPORT_FILE = owned_by(r"metrics\.(md|json)|metrics_vs_(tokens|bits)\.png|usage_per_position\.png|"
                       r"adaptive_k_hist\.png|reconstructions(_\w+)?\.png|per_image\.npz")


def report_meta(tokenizer, *, num_images: int, source: str, skipped: dict, num_processes: int, device: str,
                precision: str, num_tokens: list[int], codecs: list[str], fid: bool, model_path: str,
                adaptive_protocol: str | None = None) -> dict:
    """The report's "meta": what was evaluated, where and how (the protocol lines that apply to this run)."""
    cfg = tokenizer.config
    n = num_images
    protocol = PROTOCOL if fid else {k: v for k, v in PROTOCOL.items() if k != "rfid"}
    if adaptive_protocol is not None:
        protocol = {**protocol, "adaptive": adaptive_protocol}
    meta = {
        "description": f"{cfg.quantizer.upper()} {tokenizer.codebook_size} codes, K={tokenizer.max_tokens}, "
                       f"{cfg.length_mechanism}, {cfg.image_size}px",
        "num_images": n,
        "source": source,
        "skipped": skipped,  # {"count": unreadable records over all processes, "paths": the first 100}
        "reference_set": f"the same N={n} center crops as uint8 (reconstruction FID, not generation FID)",
        "num_processes": num_processes,
        "device": device,
        "precision": precision,
        "num_tokens": num_tokens,
        "codecs": codecs,
        "protocol": protocol,
        "tokenizer": model_path,
        "tokenizer_config": cfg.to_dict(),
    }
    if n < 2048 and fid:
        meta["protocol"] = {**meta["protocol"], "rfid_note": f"N={n} images: FID is strongly biased "
                            "upwards at this size (50k is the usual protocol); compare only at equal N"}
    return meta


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| k tokens | method | target bits | bits/image | rFID | LPIPS | PSNR (dB) | SSIM "
             "| codebook usage | quality |", "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"tokenizer": 0}
    for r in sorted(rows, key=lambda r: (r.num_tokens, order.get(r.method, 1), r.method)):
        over = "*" if r.method != "tokenizer" and r.bits_per_image > 1.1 * r.target_bits else ""  # NaN: no mark
        lines.append(f"| {r.num_tokens} | {r.method} | {r.target_bits:.0f} | {_fmt(r.bits_per_image, '.0f')}{over} | "
                     f"{_fmt(r.rfid, '.2f')} | {_fmt(r.lpips, '.4f')} | {_fmt(r.psnr, '.2f')} | "
                     f"{_fmt(r.ssim, '.4f')} | {_fmt(r.codebook_usage, '.3f')} | {_fmt(r.quality, '.1f')} |")
    return "\n".join(lines)


def usage_line(usage: dict) -> str:
    """One markdown line: mean, min and max per-position usage (positions 1-based) and the N/V bound."""
    values = usage["values"]
    lo, hi = int(np.argmin(values)) + 1, int(np.argmax(values)) + 1
    return (f"Codebook usage per position (all K = {len(values)} tokens, N = {usage['num_images']} images): "
            f"mean {usage['mean']:.4f}, min {usage['min']:.4f} (position {lo}), max {usage['max']:.4f} "
            f"(position {hi}); at most min(1, N/V) = {usage['bound']:.4f} at this N.")


def adaptive_markdown(section: dict) -> str:
    """The adaptive section of metrics.md: one table row per target (``eval.adaptive_eval.summarize``), or why
    the section was not run."""
    if "skipped" in section:
        return f"## Adaptive token counts\n\nNot run: {section['skipped']}."
    lines = ["| target | mean tokens | median tokens | met | bits/image | rFID | LPIPS | PSNR (dB) | SSIM "
             "| fixed k at equal mean | savings | fixed k, as many met | savings |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|---:|:---|"]
    notes = []
    for r in section["rows"]:
        what = "PSNR" if r["metric"] == "psnr" else "LPIPS"
        s = r["savings"]
        if s is None:
            saving = "—"
        elif round(s, 2) == 1 or round(1 / s, 2) == 1:
            saving = f"as many tokens at equal mean {what}"
        else:
            saving = f"{s:.2f}x fewer" if s > 1 else f"{1 / s:.2f}x more"
            saving += f" tokens at equal mean {what}"
        g = r.get("guarantee_savings")
        guarantee = "—" if g is None else (f"{g:.2f}x fewer tokens" if g >= 1 else f"{1 / g:.2f}x more tokens")
        if r["unmet_at_k_max"]:  # why adaptive can cost tokens: what nothing satisfies takes everything
            notes.append(f"{r['label']}: {r['unmet_at_k_max']} of {r['num_images']} images meet it at no k and "
                         f"use all K = {section['k_max']} tokens.")
        if r["matched_k"] is None:
            notes.append(f"{r['label']}: no fixed k has its mean {what} ({r['match_note']}).")
        lines.append(f"| {r['label']} | {_fmt(r['mean_tokens'], '.2f')} | {_fmt(r['median_tokens'], 'g')} | "
                     f"{_fmt(r['fraction_met'], '.1%')} | {_fmt(r['bits_per_image'], '.0f')} | "
                     f"{_fmt(r['rfid'], '.2f')} | {_fmt(r['lpips'], '.4f')} | {_fmt(r['psnr'], '.2f')} | "
                     f"{_fmt(r['ssim'], '.4f')} | {_fmt(r['matched_k'], '.2f')} | {saving} | "
                     f"{_fmt(r.get('guarantee_k'), 'd')} | {guarantee} |")
    origin = ("spread over the fixed-k PSNR range of the table above" if section["default_targets"]
              else "given on the command line")
    text = (f"## Adaptive token counts\n\nPer image the fewest of the K = {section['k_max']} tokens whose "
            f"reconstruction meets the target (`tok.encode_adaptive`), K where none does; targets {origin}. "
            "Metrics are those of the adaptive reconstructions; the fixed k at equal mean quality is read off "
            "the tokenizer's rows above (linear in log2 k); the fixed k with as many images meeting the target "
            "is the smallest evaluated k that does so (the comparison for a quality target, which evens out the "
            "worst images rather than the average). Chosen k per image: `adaptive_k_hist.png`.\n\n")
    return text + "\n".join(lines) + "".join(f"\n\n{n}" for n in notes)


def _nan_to_none(row: dict) -> dict:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def write_report(rows: list[Row], grid: dict[str, torch.Tensor], out: Path, meta: dict,
                 per_image: dict | None = None, usage: dict | None = None, adaptive: dict | None = None) -> str:
    """Writes every output file into ``out``, as a whole (module docstring): the files of an earlier report there
    (REPORT_FILE) are replaced together, anything else in ``out`` is kept. Returns the markdown table. usage:
    position_usage(ids, V). adaptive: ``eval.adaptive_eval.adaptive_section`` ({"rows", "default_targets",
    "k_max"} or {"skipped"}); None leaves the section out."""
    with atomic.atomic_directory(out, owned=REPORT_FILE) as staging:
        return _write_files(rows, grid, staging, meta, per_image, usage, adaptive)


def _write_files(rows, grid, out: Path, meta, per_image, usage, adaptive) -> str:
    table = markdown_table(rows)
    protocol = "\n".join(f"- **{k}**: {v}" for k, v in meta["protocol"].items())
    notes = ("`*`: the codec could not get down to the target bits (even its lowest quality is larger); "
             "the achieved bits are shown.")
    no_thumb = [r for r in rows if r.method == THUMBNAIL and thumbnail_side(r.target_bits) == 0]
    if no_thumb:
        ks = ", ".join(f"{r.num_tokens} ({r.target_bits:.0f} bits)" for r in no_thumb)
        notes += (f"\n\nthumbnail: not even a 1x1 thumbnail (24 bits) fits the budget at k = {ks}; those rows "
                  "are — (null in metrics.json).")
    if usage is not None:
        notes += "\n\n" + usage_line(usage)
    skip_text = f"{report_line(meta['skipped'])}\n\n" if "skipped" in meta else ""  # unreadable images, if any
    header = (f"# Reconstruction per token count\n\n{meta['description']}\n\n"
              f"Images: N = {meta['num_images']} ({meta['source']}), evaluated by {meta['num_processes']} "
              f"process(es).\n\n{skip_text}Protocol:\n{protocol}\n\n")
    section = "" if adaptive is None else "\n\n" + adaptive_markdown(adaptive)
    atomic.write_text(out / "metrics.md", header + table + "\n\n" + notes + section + "\n")
    report = {"meta": meta, "rows": [_nan_to_none(asdict(r)) for r in rows]}
    if usage is not None:
        report["usage_per_position"] = usage
    if adaptive is not None:
        report["adaptive"] = {**adaptive, "rows": [_nan_to_none(r) for r in adaptive.get("rows", [])]}
    # strict JSON (jq, JavaScript): a value that does not exist (no thumbnail fits, no FID) is null, never NaN
    atomic.write_json(out / "metrics.json", report, indent=2, allow_nan=False)
    title = f"{meta['description']} (N={meta['num_images']})"
    plot_metrics(rows, out, title)
    if usage is not None:
        # short: the figure is 6 inches wide and usage_curve_figure appends the mean
        plot_usage(usage, out / "usage_per_position.png", f"codebook usage per position, N={usage['num_images']}")
    if adaptive is not None and adaptive.get("rows"):
        plot_adaptive_histogram(adaptive["rows"], out / "adaptive_k_hist.png", f"chosen k per image, {title}")
    if grid:
        for method in dict.fromkeys(r.method for r in rows):
            save_grid(grid, method, out / ("reconstructions.png" if method == "tokenizer"
                                           else f"reconstructions_{method}.png"))
    if per_image is not None:
        with atomic.atomic_open(out / "per_image.npz", "wb") as f:  # a file object: numpy adds no ".npz"
            np.savez(f, **per_image)
    return table
