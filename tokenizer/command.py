"""`onedtok`: images <-> tokens from the command line (installed with the package).

    onedtok encode photos/ cat.jpg --tokenizer DIR --num-tokens 32 --out tokens.npz
    onedtok encode photos/ --tokenizer DIR --min-psnr 26 --out tokens.npz    # per image, the fewest tokens for 26 dB
    onedtok decode tokens.npz --tokenizer DIR --out recon/ [--num-tokens 16]
    onedtok info DIR
    onedtok export checkpoints/<run>/ckpt/last.ckpt --out DIR    # what the end of training exports (EMA if on)
    onedtok convert one-d-piece turing-motors/One-D-Piece-S-256 --out DIR   # a released tokenizer (or a folder)

Images are read as in evaluation: any mode to RGB, shorter side resized to the tokenizer's image size (bicubic,
antialiased), centre crop. Folders are walked recursively (symlink loops are safe); unreadable files, decompression
bombs and images with an extreme aspect ratio (over 16:1) are skipped, listed at the end with the reason and
recorded in the token file. The token file (`tokens.npz`, format
`onedtok-tokens/1`) holds ids [N, k] (0 past each image's length), lengths [N], keys [N] (paths relative to the
folder given, or the file name for a file given directly), and a JSON header with the SHA-256 of the
tokenizer's weights: `decode` with another tokenizer is refused.

Expected errors (a missing or unreadable input, a bad value, a full disk) end the command with one line,
`onedtok <command>: error: ...`, and status 1; ONEDTOK_DEBUG=1 shows the traceback (tokenizer/errors.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import run_command

TOKENS_FORMAT = "onedtok-tokens/1"


def collect_images(inputs: list[str]) -> list[tuple[str, str]]:
    """(key, path) for every image file named or found below a folder, in argument order then sorted."""
    from .images import IMAGE_EXTENSIONS, walk_image_files

    found: dict[str, str] = {}
    for item in inputs:
        if os.path.isdir(item):
            pairs = [(rel, os.path.join(item, rel)) for rel in walk_image_files(item)]
        elif os.path.isfile(item):
            pairs = [(os.path.basename(item), item)]
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
        for key, path in pairs:
            if key in found and os.path.realpath(found[key]) != os.path.realpath(path):
                raise ValueError(f"two inputs map to the key {key!r}: {found[key]} and {path}; encode them into "
                                 "separate token files")
            found.setdefault(key, path)
    if not found:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {inputs}")
    return list(found.items())


def encode_files(tok, files: list[tuple[str, str]], *, num_tokens: int | None = None, min_psnr: float | None = None,
                 max_lpips: float | None = None, batch_size: int = 32, device: str = "cpu", progress: bool = True):
    """(ids [N, k] int64, lengths [N] int64, keys, skipped [(path, reason)]) for the readable files."""
    from tqdm import tqdm

    from .images import eval_transform, read_image_or_reason

    transform = eval_transform(tok.image_size)
    adaptive = min_psnr is not None or max_lpips is not None
    ids, lengths, keys, skipped = [], [], [], []
    bar = tqdm(total=len(files), unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(files), batch_size):
        batch, batch_keys = [], []
        for key, path in files[start : start + batch_size]:
            img, why = read_image_or_reason(path)
            if img is None:  # unreadable, a decompression bomb, an extreme aspect ratio: the reason says which
                skipped.append((path, why))
            else:
                batch.append(transform(img))
                batch_keys.append(key)
        bar.update(len(files[start : start + batch_size]))
        if not batch:
            continue
        x = torch.stack(batch).to(device)  # [B, 3, S, S] in [0, 1]
        if adaptive:
            out = tok.encode_adaptive(x, min_psnr=min_psnr, max_lpips=max_lpips)
            ids.append(out.ids.cpu())
            lengths.append(out.lengths.cpu())
        else:
            ids.append(tok.encode(x, num_tokens).cpu())
            lengths.append(torch.full((len(batch),), ids[-1].shape[1], dtype=torch.long))
        keys += batch_keys
    bar.close()
    if not keys:
        raise ValueError(f"none of the {len(files)} files could be read as an image")
    return torch.cat(ids), torch.cat(lengths), keys, skipped


def save_tokens(path: str | Path, ids: torch.Tensor, lengths: torch.Tensor, keys: list[str], header: dict) -> None:
    from .atomic import atomic_open

    dtype = np.uint16 if int(ids.max()) < 1 << 16 else np.int32  # 2 bytes per token for every codebook <= 2^16
    with atomic_open(path, "wb") as f:
        np.savez(f, ids=ids.numpy().astype(dtype), lengths=lengths.numpy().astype(np.int32),
                 keys=np.array(keys, dtype=str), header=np.array(json.dumps({"format": TOKENS_FORMAT, **header})))


def load_tokens(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(ids int64 [N, k], lengths int64 [N], keys, header) of a token file, with errors that name it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, lengths, keys = z["ids"], z["lengths"], [str(k) for k in z["keys"]]
            header = json.loads(str(z["header"]))
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"{path} is not a readable {TOKENS_FORMAT} file ({type(e).__name__}: {e}); write it "
                         "again with `onedtok encode`") from e
    if header.get("format") != TOKENS_FORMAT:
        raise ValueError(f"{path}: format {header.get('format')!r}, expected {TOKENS_FORMAT!r}")
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(lengths.astype(np.int64)), keys, header


def _png_path(out: Path, key: str) -> Path:
    rel = Path(key).with_suffix(".png")
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"key {key!r} would write outside {out}")
    return out / rel


def _distinct_png_paths(out: Path, keys: list[str], tokens) -> list[Path]:
    """The PNG path of every key, refusing two keys that share one (a.jpg and a.png both decode to a.png: the
    second would overwrite the first while the count still said both were written)."""
    paths, claimed = [], {}
    for key in keys:
        path = _png_path(out, key)
        if path in claimed:
            raise ValueError(f"{tokens}: keys {claimed[path]!r} and {key!r} would both decode to {path}; nothing "
                             "was written. Give those images distinct names (besides the extension) and encode again")
        claimed[path] = key
        paths.append(path)
    return paths


def cmd_encode(a) -> int:
    from .adaptive import check_targets
    from .model import OneDTokenizer
    from .persistence import weights_sha256

    if a.num_tokens is None:  # argparse ensures exactly one of the three
        check_targets(a.min_psnr, a.max_lpips)
    tok = OneDTokenizer.from_pretrained(a.tokenizer, map_location=a.device)
    files = collect_images(a.inputs)
    ids, lengths, keys, skipped = encode_files(tok, files, num_tokens=a.num_tokens, min_psnr=a.min_psnr,
                                               max_lpips=a.max_lpips, batch_size=a.batch_size, device=a.device,
                                               progress=not a.quiet)
    target = {"num_tokens": a.num_tokens} if a.num_tokens is not None else {"min_psnr": a.min_psnr,
                                                                              "max_lpips": a.max_lpips}
    header = {"tokenizer_sha256": weights_sha256(a.tokenizer), "tokenizer": str(a.tokenizer),
              "max_tokens": tok.max_tokens, "codebook_size": tok.codebook_size, "image_size": tok.image_size,
              "target": target, "skipped": [{"path": p, "reason": r} for p, r in skipped]}
    save_tokens(a.out, ids, lengths, keys, header)
    print(f"{len(keys)} images -> {a.out}: {float(lengths.float().mean()):.1f} tokens per image on average "
          f"(min {int(lengths.min())}, max {int(lengths.max())})")
    if skipped:
        print(f"skipped {len(skipped)} file(s):", file=sys.stderr)
        for path, reason in skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 0


def cmd_decode(a) -> int:
    from .atomic import atomic_path
    from .model import OneDTokenizer
    from .persistence import weights_sha256

    ids, lengths, keys, header = load_tokens(a.tokens)
    made_by, this = header.get("tokenizer_sha256"), weights_sha256(a.tokenizer)
    if made_by != this:
        raise ValueError(f"{a.tokens} was encoded by the tokenizer with weights sha256 {str(made_by)[:16]}... "
                         f"({header.get('tokenizer')}), but {a.tokenizer} has {this[:16]}...: decode with the "
                         "tokenizer that made the tokens")
    tok = OneDTokenizer.from_pretrained(a.tokenizer, map_location=a.device)
    if a.num_tokens is not None:
        if not 1 <= a.num_tokens <= tok.max_tokens:
            raise ValueError(f"--num-tokens must be in 1..{tok.max_tokens}, got {a.num_tokens}")
        lengths = lengths.clamp(max=a.num_tokens)  # an image stored with fewer tokens keeps its own length
    out = Path(a.out)
    paths = _distinct_png_paths(out, keys, a.tokens)  # checked before anything is written
    from PIL import Image

    from .metrics import to_uint8

    for start in range(0, len(keys), a.batch_size):
        rows = slice(start, start + a.batch_size)
        k = int(lengths[rows].max())
        images = to_uint8(tok.decode(ids[rows, :k].to(a.device), lengths=lengths[rows].to(a.device))).cpu()
        for path, image in zip(paths[rows], images):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    print(f"{len(keys)} images -> {out}/")
    return 0


def cmd_info(a) -> int:
    from .model import OneDTokenizer
    from .persistence import read_provenance, weights_sha256

    tok = OneDTokenizer.from_pretrained(a.tokenizer)
    cfg = tok.config
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    info = {
        "tokenizer": str(a.tokenizer),
        "max_tokens (K)": tok.max_tokens,
        "codebook_size": tok.codebook_size,
        "bits_per_token": round(float(np.log2(tok.codebook_size)), 3),
        "image_size": tok.image_size,
        "patch_size": cfg.patch_size,
        "quantizer": cfg.quantizer,
        "length_mechanism": cfg.length_mechanism,
        "parameters": {"encoder": count(tok.encoder), "quantizer": count(tok.quantizer),
                       "decoder": count(tok.decoder), "total": count(tok)},
        "weights_sha256": weights_sha256(a.tokenizer),
        "provenance": read_provenance(a.tokenizer) or "none recorded (exported without training provenance)",
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_export(a) -> int:
    from .persistence import weights_sha256
    from .training.export import export_checkpoint

    out = export_checkpoint(a.checkpoint, a.out)
    print(f"{a.checkpoint} -> {out}/ (weights sha256 {weights_sha256(out)[:16]}...)")
    return 0


def cmd_convert(a) -> int:
    from .persistence import weights_sha256
    from .released import convert

    out = convert(a.family, a.source, a.out, variant=a.variant)
    print(f"{a.family} {a.source} -> {out}/ (weights sha256 {weights_sha256(out)[:16]}...)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onedtok", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="images or folders -> a token file")
    enc.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    enc.add_argument("--tokenizer", required=True, help="a save_pretrained directory")
    target = enc.add_mutually_exclusive_group(required=True)
    target.add_argument("--num-tokens", type=int, help="the same k for every image")
    target.add_argument("--min-psnr", type=float, help="per image, the fewest tokens reaching this PSNR (dB)")
    target.add_argument("--max-lpips", type=float, help="per image, the fewest tokens reaching this LPIPS")
    enc.add_argument("--out", required=True, help="the token file to write (.npz)")
    dec = sub.add_parser("decode", help="a token file -> PNG images")
    dec.add_argument("tokens", help="a token file written by `onedtok encode`")
    dec.add_argument("--tokenizer", required=True, help="the tokenizer that made the tokens")
    dec.add_argument("--out", required=True, help="folder for the PNGs (keys become relative paths)")
    dec.add_argument("--num-tokens", type=int, help="decode at most the first k tokens of each image")
    for s in (enc, dec):
        s.add_argument("--batch-size", type=int, default=32)
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    enc.add_argument("--quiet", action="store_true", help="no progress bar")
    info = sub.add_parser("info", help="what a tokenizer is and how it was trained")
    info.add_argument("tokenizer", help="a save_pretrained directory")
    export = sub.add_parser("export", help="a training checkpoint -> a save_pretrained directory (as training ends)")
    export.add_argument("checkpoint", help="a TokenizerModule checkpoint (e.g. checkpoints/<run>/ckpt/last.ckpt)")
    export.add_argument("--out", required=True, help="the directory to write (config.json + model.safetensors)")
    convert = sub.add_parser("convert", help="a released TiTok / One-D-Piece tokenizer -> a save_pretrained directory")
    convert.add_argument("family", choices=["titok", "one-d-piece"])
    convert.add_argument("source", help="a snapshot folder (model.safetensors or pytorch_model.bin, + config.json), "
                         "a weights file, or a Hugging Face hub id (fetched where the network allows)")
    convert.add_argument("--out", required=True, help="the directory to write (config.json + model.safetensors)")
    convert.add_argument("--variant", help="e.g. L-32, BL-64-VQ, S-256: needed when the source has no config.json")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if getattr(a, "batch_size", 1) < 1:
        raise SystemExit(f"onedtok: --batch-size must be >= 1, got {a.batch_size}")
    command = {"encode": cmd_encode, "decode": cmd_decode, "info": cmd_info, "export": cmd_export,
               "convert": cmd_convert}[a.command]
    if argv is not None:  # from Python (tests): the caller sees the exception
        return command(a)
    return run_command(f"onedtok {a.command}", lambda: command(a))  # expected errors: one line (errors.py)


__all__ = ["main", "collect_images", "encode_files", "save_tokens", "load_tokens", "TOKENS_FORMAT"]
