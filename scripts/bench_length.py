"""Length-mechanism ablation: the same small tokenizer, the same data, steps and seed, under each way of learning
variable length; held-out quality and per-position codebook usage at every evaluated k.

    python scripts/bench_length.py --steps 1000 --out checkpoints/length_ablation        # ~17 min on 2 cores
    python scripts/bench_length.py --steps 50 --out /tmp/ablation --mechanisms fixed tail_token_drop   # smoke

Mechanisms (`--mechanisms`, default all five): `fixed` (TiTok), `tail_token_drop` (One-D-Piece, one k per batch),
`nested_dropout` (FlexTok, k per sample), and `tail_token_drop+joint` / `nested_dropout+joint` (cross-length
joint training, NesTok: every step decodes all K tokens and one drawn prefix). The model, objective, data and
schedule are those of `--config` (default: the `make demo` config), with the steps set by `--steps`.

Evaluation, on the held-out crops of the embedded photographs: for every k (1, 2, 4, ..., K), PSNR and LPIPS of
the uint8-quantised k-token reconstructions (eval.recon_eval, as in the report). Usage per position, the
fraction of the codebook each token position uses, is measured by encoding `USAGE_CROPS` random training crops
(a fixed seed) with the trained tokenizer: over the few held-out crops it could not exceed N / V.
Writes DIR/length_ablation.json and DIR/length_ablation.md (one row per mechanism and k, with the train time),
and each trained tokenizer to DIR/<mechanism>/ (save_pretrained).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from data.photos import PhotosDataModule  # noqa: E402
from eval.metrics import LPIPSReference, to_uint8  # noqa: E402
from eval.recon_eval import image_metrics, reconstruct  # noqa: E402
from tokenizer.atomic import write_text  # noqa: E402
from tokenizer.length import powers_of_two_upto  # noqa: E402
from tokenizer.quantizer import position_histogram, usage_per_position  # noqa: E402
from tokenizer.training import TokenizerModule  # noqa: E402
from tokenizer.training.config_files import load_config  # noqa: E402

USAGE_CROPS = 4096  # training crops (fixed seed, no jitter) over which usage per position is measured
MECHANISMS = ("fixed", "tail_token_drop", "nested_dropout", "tail_token_drop+joint", "nested_dropout+joint")


def mechanism_overrides(name: str) -> dict:
    if name not in MECHANISMS:
        raise ValueError(f"unknown mechanism {name!r}; choose from {MECHANISMS}")
    mechanism, _, joint = name.partition("+")
    return {"length_mechanism": mechanism, "cross_length_joint": joint == "joint"}


def train(config: dict, mechanism: str, steps: int, seed: int) -> tuple[TokenizerModule, float]:
    args = dict(config["model"]["init_args"])
    args["overrides"] = {**(args.get("overrides") or {}), **mechanism_overrides(mechanism)}
    pl.seed_everything(seed, verbose=False)
    module = TokenizerModule(**args)
    datamodule = PhotosDataModule(**config["data"]["init_args"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=config["trainer"].get("precision", "32-true"),
                         max_steps=steps * module.optimizers_per_batch, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, log_every_n_steps=50)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return module, time.perf_counter() - start


def usage_crops(image_size: int, n: int = USAGE_CROPS) -> torch.Tensor:
    """n random training crops (a fixed seed, no colour jitter), uint8 [n, 3, S, S]."""
    from data.photos import TRAIN_IMAGES, RandomCrops, load_photo

    crops = RandomCrops([load_photo(name) for name in TRAIN_IMAGES], list(range(len(TRAIN_IMAGES))), image_size, n,
                        uint8=True)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return torch.stack([crops[i][0] for i in range(n)])


@torch.no_grad()
def evaluate(module: TokenizerModule, refs: torch.Tensor, crops: torch.Tensor) -> tuple[list[dict], list[float]]:
    tokenizer = module.eval_tokenizer.eval()
    ks = powers_of_two_upto(tokenizer.max_tokens)
    ids, recs = reconstruct(tokenizer, refs, ks, precision="fp32")
    crop_ids = torch.cat([tokenizer.encode(c.float() / 255) for c in crops.split(256)])  # [n, K]
    usage = usage_per_position(position_histogram(crop_ids, tokenizer.codebook_size))  # [K]
    lpips_ref = LPIPSReference(refs)
    rows = []
    for k, rec in zip(ks, recs):
        metrics = image_metrics(rec, refs, lpips_ref).mean(0)  # psnr, ssim, lpips
        rows.append({"num_tokens": k, "psnr": float(metrics[0]), "ssim": float(metrics[1]),
                     "lpips": float(metrics[2]), "usage_per_position_mean": float(usage.mean()),
                     "usage_per_position_first_k": float(usage[:k].mean())})
    return rows, usage.tolist()


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Length-mechanism ablation",
        "",
        f"Config `{meta['config']}`, {meta['steps']} steps each, seed {meta['seed']}, held-out crops: "
        f"{meta['num_images']} ({meta['image_size']} px), codebook {meta['codebook_size']}. PSNR/LPIPS/SSIM on uint8 "
        "reconstructions of the first k tokens; usage = fraction of the codebook each token position uses over "
        f"{meta['usage_images']} random training crops (fixed seed) encoded by the trained tokenizer; `mean` over "
        "all K positions, `first k` over positions 1..k.",
        "",
        "| mechanism | k | PSNR (dB) | LPIPS | SSIM | usage/position, mean | usage, first k | train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for row in r["rows"]:
            lines.append(f"| {r['mechanism']} | {row['num_tokens']} | {row['psnr']:.2f} | {row['lpips']:.4f} | "
                         f"{row['ssim']:.3f} | {row['usage_per_position_mean']:.3f} | "
                         f"{row['usage_per_position_first_k']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, required=True, help="training batches per mechanism")
    p.add_argument("--out", required=True, help="output directory (created; existing ablation files replaced)")
    p.add_argument("--config", default="configs/tokenizer/tiny.yaml")
    p.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=MECHANISMS)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    config = load_config(a.config)
    datamodule = PhotosDataModule(**config["data"]["init_args"])
    datamodule.setup()
    refs = to_uint8(datamodule.val_batch())  # [N, 3, S, S] uint8, the held-out crops
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    crops = usage_crops(refs.shape[-1])
    for mechanism in a.mechanisms:
        module, seconds = train(config, mechanism, a.steps, a.seed)
        rows, usage = evaluate(module, refs, crops)
        module.eval_tokenizer.save_pretrained(out / mechanism)
        results.append({"mechanism": mechanism, "train_seconds": seconds, "rows": rows, "usage_per_position": usage})
        print(f"{mechanism}: {seconds:.0f} s, PSNR " + " ".join(f"k={r['num_tokens']}:{r['psnr']:.2f}" for r in rows)
              + f", usage/position {rows[0]['usage_per_position_mean']:.3f}", flush=True)
    tok = module.eval_tokenizer
    meta = {"config": a.config, "steps": a.steps, "seed": a.seed, "num_images": int(refs.shape[0]),
            "usage_images": int(crops.shape[0]),
            "image_size": tok.image_size, "codebook_size": tok.codebook_size, "max_tokens": tok.max_tokens}
    report = {"meta": meta, "results": results}
    for name, text in (("length_ablation.json", json.dumps(report, indent=2)), ("length_ablation.md",
                                                                               markdown(results, meta))):
        write_text(out / name, text)  # atomic: a killed run never leaves a half-written report
    print(markdown(results, meta))
    return report


if __name__ == "__main__":
    main()
