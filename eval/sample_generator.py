"""Sample the AR generator and decode with the frozen tokenizer: a class x k image grid and evaluation sets.

    # grid only (rows = classes, columns = token counts k)
    python -m eval.sample_generator --checkpoint checkpoints/demo-generator/ckpt/last.ckpt \\
        --tokenizer checkpoints/demo/tokenizer --out checkpoints/demo-generator/samples
    # evaluation sets: N samples per k as PNGs and an ADM-evaluator .npz (arr_0 uint8 [N, H, W, 3])
    accelerate launch -m eval.sample_generator --gpt GPT_DIR --tokenizer TOK_DIR --out OUT \\
        --num-samples 50000 --num-tokens 32 64 128 --format npz --cfg-scale 2.0

The generator comes from a GeneratorModule Lightning checkpoint (`--checkpoint`) or a `GPT.save_pretrained`
directory (`--gpt`); the tokenizer from a `save_pretrained` directory (`--tokenizer`; default: the
checkpoint's `tokenizer_dir`).

Grid (`grid.png`): one row per class (`--grid-classes`, default: up to 16 classes spread over the label
range; for an unconditional model `--grid-rows` rows of samples), one column per k. Each row samples K_max =
max(k) tokens once and decodes every prefix of length k. Sampling is left to right, so the first k tokens
of that sample are exactly what sampling k tokens with the same seed gives.

Evaluation sets (`--num-samples N`, per k): sample i has class i % num_classes (balanced; null class when
unconditional). The N indices are cut into chunks of `--batch-size`; chunk c is sampled by process
c % num_processes with a generator seeded by (seed, k, c), so the images do not depend on the number of
processes. Each process writes its PNGs (`k{k:03d}/{i:06d}.png`) and an npz part; after
`wait_for_everyone()` the main process merges the parts into `samples_k{k:03d}.npz` (arr_0 uint8
[N, H, W, 3], arr_1 int64 [N] labels, ordered by i) and checks that it holds exactly N samples.

`--out` is written as a whole (`eval.outputs`): the grid, the sets, lengths.md and sampling.json go into a fresh
directory beside it, swapped in at the end, so the sets of an earlier run with other k never stay beside this
run's sampling.json, and a failed run leaves the earlier output untouched. An `--out` that holds files this
command does not write is refused before sampling (nothing is deleted).

Precision (`--precision fp32|bf16`, default bf16 on CUDA, fp32 on CPU): the GPT's forward passes and the
tokenizer's decoder run under that autocast (`tokenizer.precision`); the sampler itself, the quantizer's code
lookup and the conversion to uint8 (clamp to [0, 1], round) are fp32. bf16 changes the sampled ids (a logit
difference of a few 1e-3 flips a draw now and then), so compare sample sets at equal precision.
Natural lengths (`--num-tokens ... natural`, the default beside 1, 2, 4, .., K for a GPT with an end token): each
sample stops where the GPT draws its end-of-image token and is decoded at that length
(`tok.decode(ids, lengths=...)`); a fixed k never stops early. Every sample npz holds `lengths` [N], and
`lengths.md` / sampling.json's "lengths" give their mean, median and histogram per k
(eval/generated_lengths.py). The grid shows the fixed k only.
`--compile-step` runs tokens 1.. through the compiled static decode step (tokenizer/generator/decode_step.py):
the same computation, so the same ids up to kernel-level rounding; worth it on a GPU, where each token of an
eager step is a few hundred small kernel launches.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.processes import SingleProcess, process_state  # noqa: E402
from eval.generated_lengths import NATURAL, k_name, k_order, length_report, lengths_markdown, parse_num_tokens  # noqa: E402
from eval.outputs import check_out_dir, owned_by, shared_output_directory  # noqa: E402
from tokenizer.atomic import atomic_open, write_json, write_text  # noqa: E402
from tokenizer.errors import run_command  # noqa: E402
from tokenizer.generator import GPT, generate, preset_config  # noqa: E402
from tokenizer.precision import add_precision_arg, autocast, resolve_precision  # noqa: E402

# Every file and folder a sampling run writes in --out (PNG folders k008/ or natural/), and the gFID results of
# eval.gfid on these sets (they describe the old sets): what the next sampling run replaces.
SAMPLING_OUTPUT = owned_by(r"grid\.png|sampling\.json|lengths\.md|\.parts|samples_(k\d+|natural)\.npz|k\d+|natural|"
                           r"gfid\.(md|json)")


# ---- loading ---------------------------------------------------------------------------------------------
def load_generator(checkpoint: str | None = None, gpt_dir: str | None = None) -> tuple[GPT, str | None]:
    """(GPT in eval mode on CPU, the tokenizer_dir recorded in the checkpoint or None)."""
    if bool(checkpoint) == bool(gpt_dir):
        raise SystemExit(
            "give exactly one of --checkpoint (GeneratorModule .ckpt) or --gpt (save_pretrained dir)"
        )
    if gpt_dir:
        return GPT.from_pretrained(gpt_dir).eval(), None
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {})
    model = GPT(preset_config(hp.get("preset", "tiny"), **dict(hp.get("overrides") or {})))
    state = {k[len("gpt.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("gpt.")}
    model.load_state_dict(state, strict=True)
    return model.eval(), hp.get("tokenizer_dir")


def load_tokenizer(tokenizer_dir: str):
    from tokenizer import OneDTokenizer

    return OneDTokenizer.from_pretrained(tokenizer_dir).eval().requires_grad_(False)


def check_pair(gpt: GPT, tok) -> None:
    cfg = gpt.cfg
    if tok.codebook_size != cfg.vocab_size or tok.max_tokens < cfg.max_tokens:
        raise SystemExit(
            f"tokenizer (codebook {tok.codebook_size}, K {tok.max_tokens}) does not fit the GPT "
            f"(vocab {cfg.vocab_size}, max_tokens {cfg.max_tokens})"
        )


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (round to nearest, like eval.reconstruction; in fp32:
    bf16 values of x * 255 are too coarse to round to the nearest level)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decode(tok, ids: torch.Tensor, precision: str | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """ids [B, k] -> float32 images [B, 3, H, W] in [0, 1]; the decoder runs under `precision` autocast; with
    lengths [B], image b from its first lengths[b] tokens."""
    with autocast(precision, ids.device):
        images = tok.decode(ids) if lengths is None else tok.decode(ids, lengths=lengths)
    return images.float().clamp(0, 1)


def sample_seed(*parts) -> int:
    """The seed of one sampling batch: a hash of its parts ("eval", seed, k, chunk), whatever the process count."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                compile_step=args.compile_step)  # fmt: skip


# ---- grid ------------------------------------------------------------------------------------------------
def grid_classes(gpt: GPT, classes: list[int] | None, max_rows: int = 16) -> list[int] | None:
    cfg = gpt.cfg
    if cfg.is_unconditional:
        return None
    if classes:
        return classes
    n = cfg.num_classes
    if n <= max_rows:
        return list(range(n))
    return sorted({round(i * (n - 1) / (max_rows - 1)) for i in range(max_rows)})


@torch.no_grad()
def sample_grid(
    gpt: GPT,
    tok,
    ks: list[int],
    classes: list[int] | None,
    rows_per_class: int = 1,
    num_rows: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: str | None = None,
    **sampling,
) -> tuple[torch.Tensor, list[int | None]]:
    """Images float [R, C, 3, H, W]: row r = one sample (of class classes[r // rows_per_class]), column j =
    its first ks[j] tokens decoded. Returns (rows, row labels; None for unconditional)."""
    k_max = max(ks)
    if classes is None:
        labels, row_labels = None, [None] * num_rows
        batch = num_rows
    else:
        row_labels = [c for c in classes for _ in range(rows_per_class)]
        labels = torch.tensor(row_labels, dtype=torch.long)  # on the CPU: generate checks, then moves them
        batch = len(row_labels)
    gen = torch.Generator(device=device).manual_seed(sample_seed("grid", seed))
    ids = generate(gpt, labels, num_tokens=k_max, generator=gen, batch_size=batch, precision=precision,
                   stop_at_end=False, **sampling)  # [R, k_max]  # fmt: skip
    cols = [decode(tok, ids[:, :k], precision).cpu() for k in sorted(ks)]  # each [R, 3, H, W]
    return torch.stack(cols, dim=1), row_labels


def save_grid_png(rows: torch.Tensor, path: str | Path, scale: int = 2) -> Path:
    from PIL import Image

    from tokenizer.images import make_grid

    grid = make_grid(rows)  # [3, H', W']
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ---- evaluation sets -------------------------------------------------------------------------------------
def sample_labels(gpt: GPT, indices: np.ndarray) -> torch.Tensor | None:
    """Balanced classes for global sample indices: i % num_classes (None when unconditional)."""
    if gpt.cfg.is_unconditional:
        return None
    return torch.as_tensor(indices % gpt.cfg.num_classes, dtype=torch.long)


@torch.no_grad()
def sample_eval_sets(
    gpt: GPT,
    tok,
    ks: list[int],
    num_samples: int,
    out: str | Path,
    state=None,
    batch_size: int = 64,
    seed: int = 0,
    formats: tuple[str, ...] = ("npz",),
    show_progress: bool = True,
    precision: str | None = None,
    **sampling,
) -> dict[int, Path]:
    """Write num_samples images per k (see the module docstring). Returns {k: merged npz path} (main process;
    also when only PNGs are written the dict maps k to the PNG folder). Every process must call it."""
    from tqdm.auto import tqdm

    state = state or SingleProcess()
    out = Path(out)
    device = state.device
    rank, world = state.process_index, state.num_processes
    num_chunks = math.ceil(num_samples / batch_size)
    my_chunks = list(range(rank, num_chunks, world))
    parts_dir = out / ".parts"
    result: dict[int, Path] = {}
    for k in ks:
        png_dir = out / k_name(k)
        if "png" in formats:
            png_dir.mkdir(parents=True, exist_ok=True)
        if "npz" in formats:
            parts_dir.mkdir(parents=True, exist_ok=True)
        arrays, all_idx, all_labels, all_lengths = [], [], [], []
        bar = tqdm(my_chunks, desc=f"k={k} (process {rank}/{world})", disable=not (show_progress and
                   state.is_local_main_process), dynamic_ncols=True)  # fmt: skip
        for c in bar:
            idx = np.arange(c * batch_size, min((c + 1) * batch_size, num_samples))
            labels = sample_labels(gpt, idx)
            gen = torch.Generator(device=device).manual_seed(sample_seed("eval", seed, k, c))
            # labels stay on the CPU: generate range-checks them there (no host sync), then moves them
            natural = k == NATURAL  # up to K tokens, each sample stops at its end token
            out_ids = generate(gpt, labels, num_tokens=None if natural else k, generator=gen, batch_size=len(idx),
                               precision=precision, stop_at_end=natural, **sampling)  # fmt: skip
            ids, lengths = out_ids if natural else (out_ids, torch.full((len(idx),), k))
            images = to_uint8_hwc(decode(tok, ids, precision, lengths if natural else None))  # [b, H, W, 3]
            all_lengths.append(lengths.cpu().numpy())
            if "png" in formats:
                from PIL import Image

                for i, img in zip(idx, images):
                    Image.fromarray(img).save(png_dir / f"{i:06d}.png")
            arrays.append(images)
            all_idx.append(idx)
            all_labels.append(np.full(len(idx), -1) if labels is None else labels.numpy())
        if "npz" in formats:
            size = tok.image_size
            part = parts_dir / f"{k_name(k)}-r{rank:05d}.npz"
            with atomic_open(part) as f:
                np.savez(
                    f,
                    arr=np.concatenate(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8),
                    idx=np.concatenate(all_idx) if all_idx else np.zeros(0, np.int64),
                    labels=np.concatenate(all_labels) if all_labels else np.zeros(0, np.int64),
                    lengths=np.concatenate(all_lengths) if all_lengths else np.zeros(0, np.int64),
                )
        state.wait_for_everyone()
        if state.is_main_process:
            if "npz" in formats:
                result[k] = merge_parts(sorted(glob.glob(str(parts_dir / f"{k_name(k)}-r*.npz"))),
                                        out / f"samples_{k_name(k)}.npz", num_samples)  # fmt: skip
            else:
                result[k] = png_dir
        state.wait_for_everyone()
    if state.is_main_process and parts_dir.exists() and not any(parts_dir.iterdir()):
        parts_dir.rmdir()
    return result


def merge_parts(parts: list[str], path: Path, num_samples: int) -> Path:
    """Per-process parts -> one npz ordered by sample index; exactly indices 0..N-1, each once."""
    loaded = [np.load(p) for p in parts]
    idx = np.concatenate([z["idx"] for z in loaded])
    order = np.argsort(idx, kind="stable")
    if len(idx) != num_samples or not np.array_equal(idx[order], np.arange(num_samples)):
        raise RuntimeError(f"parts {parts} hold {len(idx)} samples, not exactly indices 0..{num_samples - 1}")
    arr = np.concatenate([z["arr"] for z in loaded])[order]
    labels = np.concatenate([z["labels"] for z in loaded])[order].astype(np.int64)
    lengths = np.concatenate([z["lengths"] for z in loaded])[order].astype(np.int64)
    with atomic_open(path) as f:
        np.savez(f, arr_0=arr, arr_1=labels, lengths=lengths)  # the ADM evaluator reads arr_0 (uint8 [N, H, W, 3])
    for p in parts:
        os.remove(p)
    return path


# ---- CLI --------------------------------------------------------------------------------------------------
def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-step", action="store_true",
                   help="sample through the torch.compile'd one-token step (CUDA graphs on CUDA)")  # fmt: skip


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="GeneratorModule Lightning checkpoint (.ckpt)")
    p.add_argument("--gpt", help="GPT.save_pretrained directory")
    p.add_argument("--tokenizer", help="tokenizer save_pretrained directory (default: the checkpoint's)")
    p.add_argument("--cpu", action="store_true", help="force CPU")
    add_precision_arg(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-tokens", type=parse_num_tokens, nargs="+",
                   help="token counts k and/or 'natural' (default 1, 2, 4, ..., K, + natural with an end token)")
    add_sampling_args(p)
    p.add_argument("--no-grid", action="store_true", help="skip grid.png")
    p.add_argument("--grid-classes", type=int, nargs="+", help="grid rows: these classes")
    p.add_argument("--grid-rows-per-class", type=int, default=1)
    p.add_argument("--grid-rows", type=int, default=8, help="grid rows for an unconditional model")
    p.add_argument("--num-samples", type=int, default=0, help="evaluation samples per k (0: grid only)")
    p.add_argument("--format", choices=("npz", "png", "both"), default="npz", help="evaluation set format")
    p.add_argument("--batch-size", type=int, default=64, help="samples per generate call (per process)")
    p.add_argument("--no-progress", action="store_true")
    return p


def setup(args: argparse.Namespace):
    """(state, gpt, tokenizer, ks) on this process's device."""
    from tokenizer.length import powers_of_two_upto

    state = process_state(cpu=args.cpu)
    gpt, tok_hint = load_generator(args.checkpoint, args.gpt)
    tok_dir = args.tokenizer or tok_hint
    if not tok_dir:
        raise SystemExit("--tokenizer is required (the checkpoint records no tokenizer_dir)")
    tok = load_tokenizer(tok_dir)
    check_pair(gpt, tok)
    gpt, tok = gpt.to(state.device), tok.to(state.device)
    default = [*powers_of_two_upto(gpt.cfg.max_tokens), *([NATURAL] if gpt.cfg.end_token else [])]
    ks = sorted(set(args.num_tokens or default), key=k_order)
    fixed = [k for k in ks if k != NATURAL]
    if fixed and fixed[-1] > gpt.cfg.max_tokens:
        raise SystemExit(f"--num-tokens must be in 1..{gpt.cfg.max_tokens} or '{NATURAL}', got {ks}")
    if NATURAL in ks and not gpt.cfg.end_token:
        raise SystemExit(f"--num-tokens {NATURAL} needs a GPT trained with an end token (overrides.end_token: true "
                         "on variable-length token shards); this one always samples a fixed k")  # fmt: skip
    return state, gpt, tok, ks


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_out_dir(args.out, SAMPLING_OUTPUT, "eval.sample_generator")  # before any sampling
    state, gpt, tok, ks = setup(args)
    out = Path(args.out)
    with shared_output_directory(state, out, SAMPLING_OUTPUT) as staging:  # swapped in as a whole at the end
        return sample_into(args, state, gpt, tok, ks, staging, out)


def sample_into(args, state, gpt: GPT, tok, ks: list, staging: Path, out: Path) -> dict:
    """Write the grid, the evaluation sets and sampling.json into `staging`, recording them under `out` (where
    they will be once it is swapped in)."""
    final = lambda p: str(out / Path(p).relative_to(staging))  # noqa: E731
    sampling = sampling_kwargs(args)
    precision = resolve_precision(args.precision, state.device)
    written: dict = {"num_tokens": ks, **sampling, "seed": args.seed, "precision": precision}
    grid_ks = [k for k in ks if k != NATURAL]  # a grid column is a prefix of one sample: fixed k only
    if not args.no_grid and state.is_main_process and grid_ks:
        classes = grid_classes(gpt, args.grid_classes)
        rows, row_labels = sample_grid(gpt, tok, grid_ks, classes, args.grid_rows_per_class, args.grid_rows,
                                       args.seed, state.device, precision, **sampling)  # fmt: skip
        written["grid"] = final(save_grid_png(rows, staging / "grid.png"))
        written["grid_rows"] = row_labels
        print(f"grid ({len(row_labels)} rows = classes {row_labels}, columns = k {grid_ks}) -> {written['grid']}")
    if args.num_samples > 0:
        formats = ("npz", "png") if args.format == "both" else (args.format,)
        sets = sample_eval_sets(gpt, tok, ks, args.num_samples, staging, state, args.batch_size, args.seed,
                                formats, not args.no_progress, precision, **sampling)  # fmt: skip
        written["samples"] = {k: final(p) for k, p in sets.items()}
        written["num_samples"] = args.num_samples
        if state.is_main_process:
            for k, p in written["samples"].items():
                print(f"k={k}: {args.num_samples} samples -> {p}")
            if report := length_report(sets):
                written["lengths"] = report
                write_text(staging / "lengths.md", lengths_markdown(report) + "\n")
                print(lengths_markdown(report))
    if state.is_main_process:
        write_json(staging / "sampling.json", written)
    return written


if __name__ == "__main__":
    run_command("eval.sample_generator", main)
