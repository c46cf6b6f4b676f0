"""An outside reviewer's check: a released TiTok / One-D-Piece checkpoint, run by ITS OWN reference code and by this
project after conversion, on your images; prints how far apart the two are.

    python scripts/check_interop.py --reference-repo ~/src/1d-tokenizer --weights ~/hf/tokenizer_titok_l32_imagenet \
        --variant titok-L-32 --images ~/imagenet/val_subset
    python scripts/check_interop.py --reference-repo ~/src/One-D-Piece --weights ~/hf/One-D-Piece-S-256 \
        --variant one-d-piece-S-256 --images DIR --num-tokens 1 64 128 256

--reference-repo is your checkout of github.com/bytedance/1d-tokenizer (family titok) or
github.com/turingmotors/One-D-Piece (family one-d-piece); its `modeling` package is imported from there (it needs
omegaconf and einops). --weights is a snapshot folder (config.json + model.safetensors or pytorch_model.bin; a .bin
is read with torch.load(weights_only=True)) or one weights file; without a config.json, --variant names the model
(tokenizer.released.VARIANTS). The family comes from --variant, or --family.

Both models run in fp32, eval mode, no_grad, TF32 off, on --device (cpu by default). Every image of --images is
read and cropped as this project evaluates (tokenizer.images.eval_transform: shorter side resized to the model's
size, centre crop, [0, 1]); the reference takes those [0, 1] images as they are. It prints:
  - ids: the fraction of ids equal between the reference encode and this project's encode, and the count of
    near-ties: tokens whose two nearest codes are closer than 1e-4 apart by the reference quantizer's own distance
    formula (there a flip is rounding, not a bug), and the mismatches that are not near-ties (should be 0);
  - reconstructions: both decode the REFERENCE ids (so an id flip does not count twice); the max abs difference and
    the PSNR (dB) between the two, on [0, 1]-clamped images (this project's decode clamps; the reference's does not,
    its callers do). For One-D-Piece per k (default 1, K/2, K): the reference's decode_tokens(ids, length=k)
    against this project's decode(ids[:, :k]). TiTok only decodes all K tokens (its reference code nothing else).
The last line is one JSON object with every number (psnr_db null where the two are bit-identical).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizer.images import eval_transform, read_image, walk_image_files  # noqa: E402
from tokenizer.released import VARIANTS, Snapshot, convert_state, reference_config, variant_by_name  # noqa: E402

NEAR_TIE = 1e-4  # top-2 distance margin below which an id flip between two implementations is rounding
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_reference_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor], dict | None]:
    """(weights file, state dict, config.json or None) of a snapshot folder or a weights file, read here rather
    than by the converter's reader, so the reference side depends on nothing of this project."""
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise SystemExit(f"{path}: holds none of {WEIGHT_FILES}")
        weights = found[0]
    else:
        weights = path
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    config_path = weights.with_name("config.json")
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    return weights, state, config


def reference_model(repo: Path, family: str, config: dict, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    sys.path.insert(0, str(repo))
    if family == "one-d-piece":
        from modeling.one_d_piece import OneDPiece as Reference
    else:
        from modeling.titok import TiTok as Reference
    torch.manual_seed(0)  # the constructor draws a random init, which the strict load then overwrites
    model = Reference(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def reference_margins(ref: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, K], top-2 margins [B, K]) by the reference VectorQuantizer.forward's own distance formula."""
    z = ref.encoder(pixel_values=images, latent_tokens=ref.latent_tokens)  # [B, C, 1, K]
    b = z.shape[0]
    z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # 'b c h w -> (b h w) c'
    codes = ref.quantize.embedding.weight
    if ref.quantize.use_l2_norm:
        z_flat = torch.nn.functional.normalize(z_flat, dim=-1)
        codes = torch.nn.functional.normalize(codes, dim=-1)
    d = (
        torch.sum(z_flat**2, dim=1, keepdim=True)
        + torch.sum(codes**2, dim=1)
        - 2 * torch.einsum("bd,dn->bn", z_flat, codes.T)
    )  # [B*K, codebook]
    two = d.topk(2, dim=1, largest=False).values
    return d.argmin(1).reshape(b, -1), (two[:, 1] - two[:, 0]).reshape(b, -1)


def load_images(folder: Path, size: int) -> torch.Tensor:
    transform = eval_transform(size)
    names = walk_image_files(str(folder))
    images = [read_image(os.path.join(folder, n)) for n in names]
    kept = [transform(im) for im in images if im is not None]
    if not kept:
        raise SystemExit(f"{folder}: no readable image")
    return torch.stack(kept)  # [N, 3, S, S] in [0, 1]


def psnr_db(mse: float) -> float | None:
    return None if mse == 0 else 10 * math.log10(1 / mse)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-repo", type=Path, required=True, help="your checkout of the reference code")
    p.add_argument("--weights", type=Path, required=True, help="snapshot folder or weights file of a release")
    p.add_argument("--variant", help="the release's name (tokenizer.released.VARIANTS); needed without config.json")
    p.add_argument("--family", choices=("titok", "one-d-piece"), help="default: the family of --variant")
    p.add_argument("--images", type=Path, required=True, help="a folder of images (searched recursively)")
    p.add_argument("--num-tokens", type=int, nargs="+", help="One-D-Piece: the k to decode (default 1, K/2, K)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    if args.family is None and args.variant is None:
        raise SystemExit("name the model with --variant (or at least its --family)")
    family = args.family or (VARIANTS[args.variant].family if args.variant in VARIANTS else None)
    if family is None:
        raise SystemExit(f"unknown --variant {args.variant!r}; known: {sorted(VARIANTS)}")
    if args.variant is not None:
        variant_by_name(args.variant, family)  # refuses a variant of the other family
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device = torch.device(args.device)

    weights, state, config = read_reference_weights(args.weights)
    snapshot = Snapshot(str(args.weights), weights, state, config)
    config, _ = reference_config(snapshot, family, args.variant)  # config.json, or the variant's; must agree
    ref = reference_model(args.reference_repo.resolve(), family, config, state).to(device)
    ours = convert_state(family, config, state, str(args.weights)).to(device)
    del state, snapshot
    k_max = ours.max_tokens
    if family == "titok":
        if args.num_tokens and args.num_tokens != [k_max]:
            raise SystemExit(f"--num-tokens: TiTok's reference code decodes all {k_max} tokens only")
        ks = [k_max]
    else:
        ks = sorted(set(args.num_tokens or [1, max(1, k_max // 2), k_max]))
        if not all(1 <= k <= k_max for k in ks):
            raise SystemExit(f"--num-tokens must be within 1..{k_max}, got {ks}")

    images = load_images(args.images, ours.image_size)
    print(
        f"{family} {args.variant or args.weights.name}: K={k_max}, {ours.codebook_size} codes, "
        f"{ours.image_size}px, {len(images)} images, device {device}, torch {torch.__version__}"
    )
    equal = near = flips_beyond = total = 0
    min_margin = float("inf")
    sq = {k: 0.0 for k in ks}
    worst = {k: 0.0 for k in ks}
    with torch.no_grad():
        for start in range(0, len(images), args.batch_size):
            x = images[start : start + args.batch_size].to(device)  # [b, 3, S, S] in [0, 1]
            _, result = ref.encode(x)
            ids_ref = result["min_encoding_indices"].reshape(x.shape[0], -1).long()  # [b, K]
            argmin, margins = reference_margins(ref, x)
            if not torch.equal(argmin, ids_ref):
                raise SystemExit(
                    "the reference quantizer's distances disagree with its own ids; is this checkout "
                    "the reference code the weights were released with?"
                )
            ids_ours = ours.encode(x)  # [b, K]
            same = ids_ours == ids_ref
            tie = margins < NEAR_TIE
            equal += int(same.sum())
            total += same.numel()
            near += int(tie.sum())
            flips_beyond += int((~same & ~tie).sum())
            min_margin = min(min_margin, float(margins.min()))
            for k in ks:
                if family == "one-d-piece":
                    a = ref.decode_tokens(ids_ref, length=k)
                else:
                    a = ref.decode_tokens(ids_ref)
                a = a.clamp(0, 1).float()  # [b, 3, S, S]
                b = ours.decode(ids_ref[:, :k])  # [b, 3, S, S], clamped
                sq[k] += float(((a - b).double() ** 2).sum())
                worst[k] = max(worst[k], float((a - b).abs().max()))

    pixels = images[0].numel() * len(images)
    recon = [{"k": k, "max_abs_diff": worst[k], "psnr_db": psnr_db(sq[k] / pixels)} for k in ks]
    print(
        f"ids: {equal}/{total} equal ({equal / total:.6f}); near-ties (top-2 margin < {NEAR_TIE:g}): {near}; "
        f"mismatches beyond near-ties: {flips_beyond}; smallest margin {min_margin:.3g}"
    )
    for row in recon:
        psnr = "inf (identical)" if row["psnr_db"] is None else f"{row['psnr_db']:.2f} dB"
        print(f"reconstruction k={row['k']}: max abs diff {row['max_abs_diff']:.3g}, PSNR {psnr}")
    out = {"family": family, "variant": args.variant, "weights": str(args.weights), "images": len(images),
           "max_tokens": k_max, "device": str(device), "torch": torch.__version__,
           "ids_equal_fraction": equal / total, "ids_total": total, "near_ties": near, "near_tie_margin": NEAR_TIE,
           "mismatches_beyond_near_ties": flips_beyond, "min_margin": min_margin, "reconstructions": recon}  # fmt: skip
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
