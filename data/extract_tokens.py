"""Extract token shards: encode a data set with a frozen tokenizer, once, for the AR generator.

    # single process (CPU or one GPU)
    python -m data.extract_tokens --tokenizer checkpoints/demo/tokenizer --out checkpoints/tokens/demo \\
        --source photos --num-crops 3000 --flip
    # every process of a node (or several nodes) encodes its share
    accelerate launch -m data.extract_tokens --tokenizer TOK --out OUT --source folder \\
        --root /data/train --flip
    accelerate launch -m data.extract_tokens --tokenizer TOK --out OUT --source webdataset \\
        --shards '/data/shards/train-{000000..001281}.tar'

Sources (``data/sources.py``; all images go through the eval transform at the tokenizer's image_size: shorter
side resized, center crop, as uint8, made float on the device; no random augmentation except the optional
stored flip):
- ``sample``: the embedded photographs (``data.photos.TRAIN_IMAGES``): ``--num-crops`` random crops of the
  training photos (random scale, random position), label = photo index. Crop ``i`` is a pure function of
  ``(--seed, i)``, so any process computes any crop and a rerun reproduces the same crops for the same keys.
  Crops are rounded to uint8 like every other image (and like the training loaders' crops).
- ``folder``: an ImageFolder tree (``root/<class>/<image>``); label = index of the sorted class folder,
  key = relative path. Unreadable images are skipped (warned and counted).
- ``webdataset``: tar shards (``data.convert_shards`` format); label = ``cls`` (-1 when absent),
  key = ``__key__``.

``--flip`` stores two views per image, [N, 2, K]: the image and its horizontal flip (``data/tokens.py``).
``--min-psnr X`` / ``--max-lpips Y`` store adaptive lengths: each image's fewest tokens meeting the target
(``data/adaptive_records.py``; ``--num-tokens`` is then the cap).

``--precision fp32|bf16`` (default bf16 on CUDA, fp32 on CPU; recorded in meta.json): the encoder runs under
that autocast (``tokenizer.precision``); the quantizer's nearest-code search stays fp32 inside. bf16 moves
the encoder output slightly, so an id near a tie between two codes can differ from an fp32 extraction (85%
of the ids agree for the briefly trained tiny tokenizer of ``tests/test_extract_tokens.py``, 1024 codes);
a resumed extraction should keep the precision it started with.

Exactly once, resumable
-----------------------
Every process first reads the keys of all finished shards in ``--out`` (whatever process wrote them), then
the remaining images are split by ``data.sources.split_for_process`` (image ``j`` of the remaining list goes
to process ``j % num_processes``: disjoint, complete, no padding, any number of images; tar shards are split
whole when there are at least as many as processes, else by record). Each process writes its own shards
(prefix ``tokens-r{process_index:03d}``); after ``wait_for_everyone()`` the main process runs
``finalize_meta`` (which also rejects duplicate keys). An interrupted run keeps its finished shards; rerunning
the same command skips their keys, even with a different number of processes or another ``--shard-size``
(shards are found by name and their keys read, whatever their size; numbering goes on after the highest).

One extraction per directory: the main process locks ``--out`` (``tokenizer/directory_lock.py``) before any
process reads or writes there; a second extraction into it is refused at once, naming the holder's host and pid.
Two at once used to write shards of the same names with different contents (with different ``--shard-size``),
leaving keys in two shards; a directory already in that state is refused up front, naming the shards to delete.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.adaptive_records import add_adaptive_args, encode_adaptive_batch, length_target  # noqa: E402
from data.processes import gather_objects, process_state  # noqa: E402
from data.skips import merge_reports  # noqa: E402
from data.sources import ImageLoader, PhotoCrops, TarShards, process_dataset, remaining  # noqa: E402
from data.token_format import KeyOwners, TokenShardError  # noqa: E402
from data.tokens import (  # noqa: E402
    TokenShardWriter,
    finalize_meta,
    load_shard,
    read_meta,
    shard_paths,
    write_meta_json,
)
from data.transforms import to_float_images  # noqa: E402
from tokenizer.directory_lock import DirectoryInUse, lock_directory  # noqa: E402
from tokenizer.errors import run_command  # noqa: E402
from tokenizer.precision import add_precision_arg, autocast, resolve_precision  # noqa: E402

log = logging.getLogger("extract_tokens")


# ---- sources --------------------------------------------------------------------------------------------
def open_source(args: argparse.Namespace, image_size: int):
    """(the ``data.sources`` source of the flags, meta.json fields describing it, number of classes or None)."""
    from data.sources import FolderImages

    if args.source == "photos":
        source = PhotoCrops(image_size, args.num_crops, args.seed)
        return source, dict(num_crops=args.num_crops, seed=args.seed, classes=source.classes), len(source.classes)
    if args.source == "folder":
        if not args.root:
            raise SystemExit("--source folder needs --root DIR (root/<class>/<image>)")
        source = FolderImages(args.root, image_size)
        return source, dict(root=os.path.abspath(args.root), classes=source.classes), len(source.classes)
    if not args.shards:
        raise SystemExit("--source webdataset needs --shards PATTERN")
    from data.tar_shards import expand_shards

    urls = expand_shards(args.shards)
    if not urls:
        raise SystemExit(f"no shards match {args.shards!r}: check the --shards pattern")
    return TarShards(urls, image_size, description=f"shards {args.shards}"), dict(shards=args.shards), args.num_classes


# ---- encoding --------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_batch(tokenizer, images: torch.Tensor, num_tokens: int, flip: bool,
                 precision: str | None = None) -> torch.Tensor:  # fmt: skip
    """images [B, 3, S, S] float in [0, 1] -> ids [B, k], or [B, 2, k] (image, horizontal flip) with flip. The
    encoder runs under `precision` autocast (None: bf16 on CUDA, fp32 on CPU). The images are not checked
    again (`check_inputs=False`, no host syncs): the loop makes them in [0, 1] (`to_float_images` of uint8)."""
    with autocast(precision, images.device):
        if not flip:
            return tokenizer.encode(images, num_tokens=num_tokens, check_inputs=False)
        both = tokenizer.encode(torch.cat([images, images.flip(-1)]), num_tokens=num_tokens,
                                check_inputs=False)  # [2B, k]
    b = len(images)
    return torch.stack([both[:b], both[b:]], dim=1)  # [B, 2, k]


def finished_keys(root: str) -> set[str]:
    """Keys of every finished shard in root, whichever process wrote it. A key in two shards, or a damaged shard,
    ends the run here, before any work, with what to do (finalize_meta would only find it at the end)."""
    owners = KeyOwners(root)
    try:
        for path in shard_paths(root):
            owners.add(path, load_shard(path)["keys"].tolist())
        owners.check()
    except TokenShardError as e:
        raise SystemExit(f"data.extract_tokens: {e}") from None
    return set(owners.owner)


@contextlib.contextmanager
def locked_output(state, out: str):
    """The main process holds the lock of the token-set directory `out` for the block. Every process learns
    whether it got it: a refusal ends all of them with its message, none is left waiting in a barrier."""
    lock, refusal = None, None
    if state.is_main_process:
        try:
            lock = lock_directory(out, "token-set directory", "extract into another --out directory")
        except DirectoryInUse as e:
            refusal = str(e)
    refusal = gather_objects(state, refusal)[0]
    if refusal:
        raise SystemExit(f"data.extract_tokens: {refusal}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _labels_num_classes(root: str) -> int | None:
    top = -1
    for path in shard_paths(root):
        labels = load_shard(path)["labels"]
        if len(labels):
            top = max(top, int(labels.max()))
    return top + 1 if top >= 0 else None


def extract(args: argparse.Namespace) -> dict | None:
    """Run the extraction in this process; returns the final meta (main process) or None."""
    state = process_state(cpu=args.cpu)
    with locked_output(state, args.out):  # before anything in --out is read or written
        return extract_locked(args, state)


def extract_locked(args: argparse.Namespace, state) -> dict | None:
    """`extract`, in a process whose main process holds the lock of args.out."""
    from tqdm.auto import tqdm

    from tokenizer import OneDTokenizer
    from tokenizer.persistence import weights_sha256

    pi, n = state.process_index, state.num_processes
    device = state.device
    tokenizer = OneDTokenizer.from_pretrained(args.tokenizer, map_location="cpu").to(device).eval()
    tokenizer.requires_grad_(False)
    k = args.num_tokens or tokenizer.max_tokens
    if not 1 <= k <= tokenizer.max_tokens:
        raise SystemExit(f"--num-tokens must be in 1..{tokenizer.max_tokens}, got {k}")
    precision = resolve_precision(args.precision, device)
    target = length_target(args)  # None: fixed-length records

    # every process validates a pre-existing meta.json (same K / codebook / views / flip) and reads the keys
    # already written; nothing is written before the barrier, so all processes see the same finished set.
    writer = TokenShardWriter(
        args.out,
        num_tokens=k,
        codebook_size=tokenizer.codebook_size,
        shard_size=args.shard_size,
        prefix=f"tokens-r{pi:03d}",
        num_views=2 if args.flip else 1,
        flip=args.flip,
        tokenizer_dir=os.path.abspath(args.tokenizer),
        tokenizer_sha256=weights_sha256(args.tokenizer),  # a resume with another tokenizer is refused
        image_size=tokenizer.image_size,
        write_meta=False,
        variable_length=target is not None,
        length_target=target,
    )
    done = finished_keys(args.out)
    source, described, num_classes = open_source(args, tokenizer.image_size)
    loader = ImageLoader(process_dataset(source, pi, n, done), args.batch_size, args.num_workers)
    state.wait_for_everyone()
    if state.is_main_process:
        meta = dict(writer.meta, num_classes=num_classes, num_processes=n, precision=precision,
                    source=args.source, **described)  # fmt: skip
        if os.path.exists(os.path.join(args.out, "meta.json")):
            meta["resumed_from_records"] = len(done)
        write_meta_json(args.out, meta)
        todo = "" if isinstance(source, TarShards) else f", {len(remaining(source, done))} to do"
        log.warning("extracting %s -> %s: K=%d, codebook %d, flip=%s, lengths %s, %d process(es), %d record(s) "
                    "already done%s", args.source, args.out, k, tokenizer.codebook_size, args.flip, target or "fixed",
                    n, len(done), todo)  # fmt: skip
    state.wait_for_everyone()

    t0, count = time.time(), 0
    bar = tqdm(
        total=None if isinstance(source, TarShards) else len(loader.dataset),  # shards: not known up front
        unit="img",
        disable=not state.is_local_main_process or args.no_progress,
        desc=f"extract (process {pi}/{n})",
        dynamic_ncols=True,
    )
    for batch in loader:
        images = to_float_images(batch.images.to(device, non_blocking=True))  # [B, 3, S, S] in [0, 1]
        if target is None:
            ids, lengths = encode_batch(tokenizer, images, k, args.flip, precision), None
        else:
            ids, lengths = encode_adaptive_batch(tokenizer, images, k, args.flip, target, precision)
        count += writer.write(ids, batch.labels, batch.keys, lengths)
        bar.update(len(batch.keys))
    bar.close()
    writer.close()  # the last partial shard (meta is the main process's job)
    log.info("process %d wrote %d records in %.1fs (%d skipped)", pi, count, time.time() - t0, loader.skips.count)

    state.wait_for_everyone()
    written = gather_objects(state, {"records": count, "skipped": loader.skips.report()})
    meta = None
    if state.is_main_process:
        skipped = merge_reports([w["skipped"] for w in written])
        if not done and not sum(w["records"] for w in written):
            raise SystemExit(
                f"no readable image in {source.description}: {skipped['count']} skipped (e.g. "
                f"{', '.join(p['path'] for p in skipped['paths'][:3])}); nothing extracted, {args.out} is left "
                "incomplete"
            )
        updates: dict[str, Any] = {"skipped": skipped}  # totals of this run, all processes
        if read_meta(args.out).get("num_classes") is None:
            updates["num_classes"] = _labels_num_classes(args.out)
        meta = finalize_meta(args.out, **updates)
        print(
            f"token shards complete: {meta['num_records']} records in {meta['num_shards']} shard(s) "
            f"at {args.out} "
            f"(K={meta['num_tokens']}, views={meta['num_views']}, classes={meta['num_classes']}, "
            f"{skipped['count']} image(s) skipped, {time.time() - t0:.1f}s)",
            flush=True,
        )
    state.wait_for_everyone()
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="save_pretrained directory of the frozen tokenizer")
    p.add_argument("--out", required=True, help="token shard directory (created; resumed if it exists)")
    p.add_argument("--source", choices=("photos", "folder", "webdataset"), default="photos")
    p.add_argument("--root", help="folder source: ImageFolder root")
    p.add_argument("--shards", help="webdataset source: brace pattern(s) joined with '::'")
    p.add_argument(
        "--num-classes", type=int, help="webdataset source: number of classes (default: max label + 1)"
    )
    p.add_argument("--num-crops", type=int, default=3000, help="photos source: number of random crops")
    p.add_argument("--seed", type=int, default=0, help="photos source: crop seed (part of every key)")
    p.add_argument("--num-tokens", type=int, help="tokens per image k (default: the tokenizer's K; adaptive: the cap)")
    add_adaptive_args(p)
    p.add_argument("--flip", action="store_true", help="store [N, 2, k]: the image and its horizontal flip")
    p.add_argument("--batch-size", type=int, default=64, help="images per encode call (per process)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (sample/folder sources)")
    p.add_argument("--shard-size", type=int, default=10000, help="records per shard file")
    p.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is visible")
    add_precision_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.num_crops < 1 and args.source == "photos":
        raise SystemExit("--num-crops must be >= 1")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        return extract(args)


if __name__ == "__main__":
    run_command("data.extract_tokens", main)  # expected errors (a bad tokenizer, a full disk): one line
