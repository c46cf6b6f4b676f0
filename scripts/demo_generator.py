"""The generator demo (CPU, a few minutes): tokens of the embedded photographs -> tiny GPT -> sample grid.

    python scripts/demo_generator.py                                   # uses checkpoints/demo/tokenizer
    python scripts/demo_generator.py --tokenizer checkpoints/other/tokenizer --max-steps 200

Needs the tokenizer demo's output (`make demo` writes checkpoints/demo/tokenizer). Steps, all into
checkpoints/demo-generator/ (what an earlier run of this script wrote there is replaced; a directory it did not
create is refused, and foreign files inside its own directory are left alone):
1. `python -m data.extract_tokens`: `--num-crops` random crops of the 14 training photographs (label = photo
   index), each stored with its horizontal flip, encoded at K tokens -> tokens/;
2. `python train.py fit --config configs/generator/tiny.yaml` (GeneratorModule + TokenDataModule) -> ckpt/,
   TensorBoard logs; prints the final train loss next to ln(codebook size), the loss of a uniform guess;
3. `python -m eval.sample_generator`: grid.png with one row per photograph (class) and one column per token
   count k = 1, 2, 4, ..., K (the first k tokens of one sample decoded) -> samples/.
A summary (timings, losses) goes to summary.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # repo-local packages (data, eval) whatever the working directory
CONFIG = "configs/generator/tiny.yaml"
MARKER = ".demo-generator"  # marks a directory this script created
OUTPUTS = ("tokens", "ckpt", "samples", "summary.json", "config.yaml", "hparams.yaml")  # what one run writes


def prepare_out(out: str) -> None:
    """Make `out` ready for a fresh run, deleting only what an earlier run of this script wrote there."""
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"--out {out!r} is a file, not a directory; pass another --out")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MARKER)):
        sys.exit(f"--out {out!r} already holds files that this script did not write; pass a new or empty "
                 "directory (nothing was deleted)")
    os.makedirs(out, exist_ok=True)
    ours = [os.path.join(out, n) for n in os.listdir(out)
            if n in OUTPUTS or n.startswith(("config.", "events.out.tfevents."))]
    for path in ours:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("created by scripts/demo_generator.py; its outputs here are replaced on the next run\n")


def run(cmd: list[str], what: str) -> float:
    print(f"\n=== {what}\n$ {' '.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.time() - t0


def scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar over all event files in log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            points.update({e.step: e.value for e in acc.Scalars(tag)})
    return sorted(points.items())


def adaptive_lengths(out: str) -> dict:
    """The record lengths the GPT trained on (token meta.json) and the lengths it generated (sampling.json)."""
    with open(f"{out}/tokens/meta.json") as f:
        trained = json.load(f).get("lengths")
    with open(f"{out}/samples/sampling.json") as f:
        generated = (json.load(f).get("lengths") or {}).get("natural")
    return {"trained_lengths": trained, "generated_lengths": generated}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tokenizer",
        default=os.environ.get("TOKENIZER_DIR", "checkpoints/demo/tokenizer"),
        help="tokenizer save_pretrained dir (env TOKENIZER_DIR; default checkpoints/demo/tokenizer)",
    )
    p.add_argument("--out", default="checkpoints/demo-generator")
    p.add_argument("--num-crops", type=int, default=2000, help="random crops to extract (x2 with the flip)")
    p.add_argument("--max-steps", type=int, help="override trainer.max_steps of the config")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="guidance scale of the grid")
    p.add_argument("--min-psnr", type=float,
                   help="adaptive lengths: each crop stored with its fewest tokens reaching this PSNR (dB), a GPT "
                        "with an end-of-image token, and samples at their natural lengths (histogram in summary)")
    p.add_argument("--num-samples", type=int, default=280, help="--min-psnr: samples whose lengths are counted")
    args = p.parse_args(argv)
    os.chdir(ROOT)

    tok = args.tokenizer
    if not os.path.isfile(os.path.join(tok, "config.json")):
        sys.exit(f"no tokenizer at {tok!r}: run `make demo` first (it trains the tiny tokenizer and exports "
                 "checkpoints/demo/tokenizer), or pass --tokenizer DIR / TOKENIZER_DIR=DIR")  # fmt: skip
    from tokenizer.config import TokenizerConfig
    from tokenizer.model import FORMAT as TOKENIZER_FORMAT
    from tokenizer.persistence import read_model_config

    tcfg = TokenizerConfig.from_dict(read_model_config(tok, TOKENIZER_FORMAT))
    K, V = tcfg.max_tokens, tcfg.effective_codebook_size

    out = args.out.rstrip("/")
    prepare_out(out)
    py = sys.executable
    times = {}
    times["extract_s"] = run(
        [py, "-m", "data.extract_tokens", "--tokenizer", tok, "--out", f"{out}/tokens", "--source", "photos",
         "--num-crops", str(args.num_crops), "--flip",
         *(["--min-psnr", str(args.min_psnr)] if args.min_psnr is not None else [])],
        "1/3 extract tokens",
    )  # fmt: skip
    from data.photos import TRAIN_IMAGES
    from tokenizer.atomic import write_json

    # the whole dict (a dict flag replaces the config's): the tokenizer's vocabulary and K, 14 photo classes
    overrides = dict(vocab_size=V, max_tokens=K, num_classes=len(TRAIN_IMAGES), class_dropout_prob=0.1,
                     end_token=args.min_psnr is not None)
    train = [py, "train.py", "fit", "--config", CONFIG,
             "--data.init_args.root", f"{out}/tokens",
             "--model.init_args.tokenizer_dir", tok,
             "--model.init_args.overrides", json.dumps(overrides),
             "--trainer.logger.init_args.save_dir", os.path.dirname(out) or ".",
             "--trainer.logger.init_args.name", os.path.basename(out),
             "--trainer.callbacks.init_args.dirpath", f"{out}/ckpt"]  # fmt: skip
    if args.max_steps:
        train += ["--trainer.max_steps", str(args.max_steps)]
    times["train_s"] = run(train, "2/3 train the tiny GPT")
    ks = [1 << i for i in range(K.bit_length()) if (1 << i) < K] + [K]
    natural = ["natural", "--num-samples", str(args.num_samples)] if args.min_psnr is not None else []
    times["sample_s"] = run(
        [py, "-m", "eval.sample_generator", "--checkpoint", f"{out}/ckpt/last.ckpt", "--tokenizer", tok,
         "--out", f"{out}/samples", "--num-tokens", *map(str, ks), *natural, "--cfg-scale", str(args.cfg_scale)],
        "3/3 sample grid",
    )  # fmt: skip

    loss = scalars(out, "train/loss")
    val = scalars(out, "val/loss")
    tail = [v for _, v in loss[-5:]]
    summary = {
        "tokenizer": tok,
        "num_tokens": K,
        "codebook_size": V,
        "ln_codebook_size": math.log(V),
        "first_train_loss": loss[0][1] if loss else None,
        "final_train_loss": loss[-1][1] if loss else None,
        "final_train_loss_mean_last5_logs": sum(tail) / len(tail) if tail else None,
        "final_step": loss[-1][0] if loss else None,
        "final_val_loss": val[-1][1] if val else None,
        "grid": f"{out}/samples/grid.png",
        **(adaptive_lengths(out) if args.min_psnr is not None else {}),
        **{k: round(v, 1) for k, v in times.items()},
        "total_s": round(sum(times.values()), 1),
    }
    write_json(f"{out}/summary.json", summary)
    print("\n=== generator demo done")
    if loss:
        print(f"final train loss {summary['final_train_loss']:.3f} (mean of the last 5 logged "
              f"{summary['final_train_loss_mean_last5_logs']:.3f}, first {summary['first_train_loss']:.3f}) "
              f"vs ln({V}) = {math.log(V):.3f} (uniform guess)")  # fmt: skip
    if val:
        print(f"final val loss {summary['final_val_loss']:.3f}")
    print(
        f"times: extract {times['extract_s']:.0f}s, train {times['train_s']:.0f}s, "
        f"sample {times['sample_s']:.0f}s"
    )
    print(f"grid (rows = photographs, columns = k = {ks}): {summary['grid']}")
    if args.min_psnr is not None:
        print(f"record lengths trained on: {summary['trained_lengths']}")
        print(f"lengths generated at the natural end: {summary['generated_lengths']}")
    return summary


if __name__ == "__main__":
    main()
