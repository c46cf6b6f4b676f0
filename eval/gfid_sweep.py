"""gFID against k and the CFG scale, in one command: sample N images per (cfg, k), score them, write a table and a plot.

    accelerate launch -m eval.gfid_sweep --checkpoint checkpoints/generator-B/ckpt/last.ckpt \\
        --tokenizer checkpoints/onedpiece-B-256/tokenizer --ref-batch data/adm/VIRTUAL_imagenet256_labeled.npz \\
        --num-tokens 16 32 64 128 256 --cfg-scales 1.0 1.5 2.0 --num-samples 50000 --batch-size 125 \\
        --out checkpoints/generator-B/gfid_sweep

Every flag of `eval.gfid` applies (reference, sampling settings, --precision); `--cfg-scales` replaces its single
`--cfg-scale`. For each scale the samples are written by `eval.sample_generator.sample_eval_sets` (every process
samples its share; exact N) to OUT/cfg<scale>/samples_k<k>.npz, and an existing file with exactly N samples is
kept, not resampled (an interrupted sweep resumes). The main process then computes the reference once and,
per (cfg, k), gFID, Inception Score (when the Inception has logits) and precision/recall (`eval.gfid`).
With `--compile-step` the one-token step compiles once per batch size and CFG on/off, whatever the scales and k
(tokenizer/generator/decode_step.py): at most 4 graphs per process (scale 1 and the others, a smaller last
batch), under Dynamo's recompile limit of 8 (tests/test_decode_step.py).

Writes OUT/sweep.json (every row and the protocol), OUT/sweep.md (one table, rows cfg x k) and OUT/gfid_vs_k.png
(gFID against k, log2 axis, one line per cfg scale), the three as a set (`eval.outputs`: a failed sweep leaves the
previous three; the sample folders and anything else in OUT stay). With `--num-tokens ... natural` (a GPT with an
end token) the "natural" row scores samples that stopped at their own end token; the plot marks it with a star at
its mean length.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval import gfid  # noqa: E402
from eval.generated_lengths import NATURAL, k_name, k_order  # noqa: E402
from eval.outputs import owned_by  # noqa: E402
from tokenizer.atomic import atomic_directory, atomic_open, write_json, write_text  # noqa: E402
from tokenizer.errors import run_command  # noqa: E402
from tokenizer.precision import resolve_precision  # noqa: E402

SWEEP_FILES = owned_by(r"sweep\.(md|json)|gfid_vs_k\.png")  # the sweep's summary, replaced as a set


def complete(path: Path, num_samples: int) -> bool:
    """True when `path` is a sample npz holding exactly `num_samples` images."""
    if not path.exists():
        return False
    with np.load(path) as z:
        return "arr_0" in z and len(z["arr_0"]) == num_samples


def sample_all(args, scales: list[float]) -> tuple[dict[float, dict[int, Path]], int, object]:
    """{cfg: {k: samples npz}} (complete on the main process), the image size, the distributed state."""
    from eval.sample_generator import sample_eval_sets, sampling_kwargs, setup

    state, gpt, tok, ks = setup(args)
    precision = resolve_precision(args.precision, state.device)
    out, sets = Path(args.out), {}
    for scale in scales:
        folder = out / f"cfg{scale:g}"
        todo = [k for k in ks if not complete(folder / f"samples_{k_name(k)}.npz", args.num_samples)]
        sampling = {**sampling_kwargs(args), "cfg_scale": scale}
        if todo:
            sample_eval_sets(gpt, tok, todo, args.num_samples, folder, state, args.batch_size, args.seed, ("npz",),
                             not args.no_progress, precision, **sampling)  # fmt: skip
        sets[scale] = {k: folder / f"samples_{k_name(k)}.npz" for k in ks}
    return sets, tok.image_size, state


def markdown(rows: dict[float, dict[int | str, dict]], reference: str) -> str:
    lines = [f"gFID against {reference}", "", "| cfg | k tokens | samples | gFID | IS | precision | recall |",
             "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for scale, by_k in sorted(rows.items()):
        for k, r in sorted(by_k.items(), key=lambda kv: k_order(kv[0])):
            lines.append(f"| {scale:g} | {gfid.k_label(k, r)} | {r['num_samples']} | {r['fid']:.2f} | "
                         f"{gfid.fmt_metric(r['inception_score'], 1)} | {gfid.fmt_metric(r['precision'], 3)} | "
                         f"{gfid.fmt_metric(r['recall'], 3)} |")  # fmt: skip
    if any(r["inception_score"] is None for by_k in rows.values() for r in by_k.values()):
        lines += ["", f"IS: -, {gfid.NO_LOGITS}."]
    return "\n".join(lines)


def plot(rows: dict[float, dict[int, dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for scale, by_k in sorted(rows.items()):
        ks = sorted(k for k in by_k if k != NATURAL)
        (line,) = ax.plot(ks, [by_k[k]["fid"] for k in ks], marker="o", label=f"cfg {scale:g}")
        natural = by_k.get(NATURAL)
        if natural and natural.get("lengths"):  # samples that stopped by themselves, at their mean length
            ax.plot([natural["lengths"]["mean"]], [natural["fid"]], marker="*", markersize=12, linestyle="none",
                    color=line.get_color(), label=f"cfg {scale:g}, natural length")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens k")
    ax.set_ylabel("gFID (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None, extractor: gfid.FeatureExtractor | None = None) -> dict:
    """Returns {"reference", "protocol", "rows": {cfg: {k: row}}} on the main process ({} elsewhere). `extractor`
    replaces the Inception features (tests)."""
    p = gfid.build_parser()
    p.description = __doc__
    p.add_argument("--cfg-scales", type=float, nargs="+", help="guidance scales (default: --cfg-scale)")
    args = p.parse_args(argv)
    if not (args.checkpoint or args.gpt) or not args.out:
        raise SystemExit("eval.gfid_sweep needs a generator (--checkpoint or --gpt) and --out")
    if args.samples:
        raise SystemExit("eval.gfid_sweep samples its own sets; score existing files with eval.gfid --samples")
    scales = args.cfg_scales or [args.cfg_scale]
    sets, image_size, state = sample_all(args, scales)
    if not state.is_main_process:
        return {}
    if extractor is None:
        extractor = gfid.inception_extractor(state.device)
    ref = gfid.reference(args, extractor, args.image_size or image_size, need_features=not args.no_precision_recall)
    rows = {scale: gfid.gfid(by_k, ref, extractor) for scale, by_k in sets.items()}
    out = Path(args.out)
    table = markdown(rows, ref.description)
    print(table)
    result = {"reference": ref.description, "protocol": gfid.PROTOCOL, "num_samples": args.num_samples,
              "precision": resolve_precision(args.precision, state.device), "rows": rows}  # fmt: skip
    # the three summary files replace an earlier sweep's together; the cfg<scale>/ sample folders stay
    with atomic_directory(out, SWEEP_FILES) as staging:
        write_text(staging / "sweep.md", table + "\n")
        write_json(staging / "sweep.json", result, default=str)
        plot(rows, staging / "gfid_vs_k.png")
    result["plot"] = str(out / "gfid_vs_k.png")
    return result


if __name__ == "__main__":
    run_command("eval.gfid_sweep", main)
