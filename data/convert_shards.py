"""Convert an ImageFolder-style tree (``src/<class>/<image>``) to webdataset tar shards.

    python -m data.convert_shards --src /data/imagenet/train --out /data/shards --split train \
        --shard-size 1000 --workers 8

Output in ``--out``:

- ``{split}-000000.tar ...``: samples ``{__key__, jpg|png|..., cls}``. The image member holds the
  ORIGINAL file bytes, never re-encoded. Its extension is the format PIL detects from the content, not the
  file name: JPEG -> ``.jpg``; PNG -> ``.png``; other formats keep their bytes under their own extension
  (``webp``, ``bmp``, ``gif``, ``tif``, ``ppm``...). (ImageNet has a PNG and CMYK JPEGs named ``.JPEG``.)
  ``tokenizer.images.decode_image`` decodes any of them to RGB. ``cls`` is the class index as ASCII text.
  ``__key__`` is the path relative to ``src`` without extension, with characters other than
  ``[A-Za-z0-9_-]`` replaced by ``_`` (made unique with a ``_dupN`` suffix if needed).
- ``{split}-meta.json``: classes, per-shard sample counts, totals, the brace pattern (used by
  ``WebDatasetDataModule`` to size epochs), and the conversion settings.
- ``classes.json``: sorted class-folder names (index = label); shared by the splits of one ``--out``.
- ``{split}-skipped.json``: files that were skipped, with the reason (``tokenizer.images.decode_error``: a file
  PIL cannot fully decode, a decompression bomb, or an extreme aspect ratio, which every reader would skip).
- ``.{split}-state/``: per-shard bookkeeping that makes reruns resumable.

Determinism and resume: files are listed in sorted order, shuffled with ``--seed`` (unless
``--no-shuffle``; shuffling mixes classes across shards, which a streaming shuffle buffer relies on), then
cut into shards of at most ``--shard-size`` files (and ``--max-shard-bytes`` of source bytes) BEFORE
anything is decoded, so the file -> shard assignment does not depend on which files turn out corrupt
(a shard may hold fewer samples than ``--shard-size``). Each shard (and every json file) is written to a
temp file in ``--out`` and atomically renamed (``tokenizer.atomic``); a rerun keeps every shard whose final
``.tar`` exists and writes only the missing ones. Tar headers use fixed mtime/owner so a regenerated shard is
byte-identical. A rerun with a different file list or settings is refused (use a new ``--out`` or ``--force``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import sys
import tarfile
import time
from collections.abc import Callable

from data.folder import scan_image_folder
from data.tar_shards import count_shard_samples
from tokenizer import atomic
from tokenizer.directory_lock import LOCK_NAME, lock_directory
from tokenizer.errors import run_command
from tokenizer.images import decode_error, image_format

FORMAT_EXT = {
    "JPEG": "jpg",
    "MPO": "jpg",  # multi-picture JPEG (some cameras); the first frame is a plain JPEG
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tif",
    "PPM": "ppm",
}
STATE_VERSION = 1


def _write_json(path: str, obj) -> None:
    atomic.write_json(path, obj, indent=1)  # temp file beside `path`, then rename (tokenizer.atomic)


def _sanitize_key(rel: str) -> str:
    stem = os.path.splitext(rel)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def parse_size(text: str | None) -> int | None:
    """'1000', '512M', '2G' -> bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"bad size: {text!r}")
    mult = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def plan_shards(
    src: str, shard_size: int, max_shard_bytes: int | None = None, shuffle: bool = True, seed: int = 0
) -> tuple[list[str], list[list[tuple[str, str, int]]]]:
    """Deterministic file -> shard plan ``(classes, shards)``; a shard is a list of (rel, key, label)."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    classes, items = scan_image_folder(src)
    keyed: list[tuple[str, str, int]] = []
    seen: set[str] = set()
    for rel, label in items:  # sorted order -> deterministic de-duplication
        key = base = _sanitize_key(rel)
        n = 1
        while key in seen:
            key = f"{base}_dup{n}"
            n += 1
        seen.add(key)
        keyed.append((rel, key, label))
    if shuffle:
        random.Random(seed).shuffle(keyed)
    shards: list[list[tuple[str, str, int]]] = []
    cur: list[tuple[str, str, int]] = []
    cur_bytes = 0
    for item in keyed:
        size = os.path.getsize(os.path.join(src, item[0])) if max_shard_bytes else 0
        if cur and (len(cur) >= shard_size or (max_shard_bytes and cur_bytes + size > max_shard_bytes)):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(item)
        cur_bytes += size
    if cur:
        shards.append(cur)
    return classes, shards


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def brace_pattern(out: str, split: str, num_shards: int) -> str:
    last = max(num_shards - 1, 0)
    return os.path.join(out, f"{split}-{{{0:06d}..{last:06d}}}.tar")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata -> byte-identical shards on regeneration
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    src: str,
    out: str,
    split: str,
    index: int,
    items: list[tuple[str, str, int]],
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write one shard (temp file in `out` + atomic rename, tokenizer.atomic) and its state file; returns the
    shard's stats."""
    final = os.path.join(out, shard_name(split, index))
    stats = {"index": index, "shard": shard_name(split, index), "count": 0, "skipped": [], "formats": {}}
    with atomic.atomic_path(final) as tmp:  # renamed to `final` (the commit point) when the block ends cleanly
        _write_tar(src, tmp, items, stats, progress)
        stats["bytes"] = os.path.getsize(tmp)
        _write_json(os.path.join(out, f".{split}-state", f"{index:06d}.json"), stats)
    return stats


def _write_tar(src: str, tmp: str, items: list[tuple[str, str, int]], stats: dict,
               progress: Callable[[int], None] | None) -> None:  # fmt: skip
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, key, label in items:
            path = os.path.join(src, rel)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                stats["skipped"].append({"path": rel, "reason": f"read error: {exc}"})
                data = None
            if data is not None:
                reason = decode_error(data)
                fmt = image_format(data) if reason is None else None
                ext = FORMAT_EXT.get(fmt or "", (fmt or "").lower() or None)
                if reason is not None or ext is None:
                    stats["skipped"].append({"path": rel, "reason": reason or f"unsupported format {fmt}"})
                else:
                    _add_member(tar, f"{key}.{ext}", data)
                    _add_member(tar, f"{key}.cls", str(label).encode())
                    stats["count"] += 1
                    stats["formats"][ext] = stats["formats"].get(ext, 0) + 1
            if progress is not None:
                progress(1)


def _write_shard_task(args) -> dict:
    return write_shard(*args)


def _fingerprint(split, shard_size, max_shard_bytes, shuffle, seed, classes, shards) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([STATE_VERSION, split, shard_size, max_shard_bytes, shuffle, seed, classes]).encode())
    for shard in shards:
        h.update(json.dumps(shard).encode())
        h.update(b"|")
    return h.hexdigest()


def convert(
    src: str,
    out: str,
    split: str,
    shard_size: int = 1000,
    max_shard_bytes: int | None = None,
    workers: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
) -> dict:
    """Convert ``src`` into shards under ``out``; returns the meta dict (written to ``{split}-meta.json``).

    One conversion per split and ``out``: the split's state directory is locked for the whole run
    (tokenizer/directory_lock.py), so a second conversion of the same split, which would write shards of the same
    names, is refused at once naming the first one's host and pid. Other splits into the same ``out`` (train and
    val side by side) run in parallel."""
    if not re.fullmatch(r"[A-Za-z0-9_.]+", split):
        raise ValueError(f"split name must match [A-Za-z0-9_.]+, got {split!r}")
    state_dir = os.path.join(out, f".{split}-state")
    with lock_directory(state_dir, f"the '{split}' split's state directory",
                        f"convert split '{split}' into another --out directory"):
        return _convert_locked(src, out, split, state_dir, shard_size, max_shard_bytes, workers, shuffle, seed,
                               force, quiet)


def _convert_locked(src: str, out: str, split: str, state_dir: str, shard_size: int, max_shard_bytes: int | None,
                    workers: int, shuffle: bool, seed: int, force: bool, quiet: bool) -> dict:
    """`convert`, in a process that holds the lock of ``state_dir``."""
    from tqdm import tqdm

    t0 = time.time()
    # temp files this split's writers left when they were killed (only ours: this split's names, its state dir)
    for name in os.listdir(out):
        if atomic.is_partial(name) and name.startswith(f".{split}-"):
            os.remove(os.path.join(out, name))
    atomic.remove_stale_partials(state_dir)
    classes, shards = plan_shards(src, shard_size, max_shard_bytes, shuffle, seed)
    fp = _fingerprint(split, shard_size, max_shard_bytes, shuffle, seed, classes, shards)
    plan_path = os.path.join(state_dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        if old.get("fingerprint") != fp:
            if not force:
                raise ValueError(
                    f"{out}: existing '{split}' shards were made from a different file list or settings; "
                    "use a new --out directory or --force (which deletes the old shards of this split)"
                )
            for name in os.listdir(out):
                if re.fullmatch(re.escape(split) + r"-\d{6}\.tar(\.tmp)?", name):
                    os.remove(os.path.join(out, name))
            for name in os.listdir(state_dir):
                if name != LOCK_NAME:  # ours, held: deleting a held lock file would let a second holder in
                    os.remove(os.path.join(state_dir, name))
    _write_json(plan_path, {"fingerprint": fp, "num_shards": len(shards), "src": os.path.abspath(src)})

    results: dict[int, dict] = {}
    todo = []
    for i in range(len(shards)):
        final = os.path.join(out, shard_name(split, i))
        if os.path.exists(final):
            state = os.path.join(state_dir, f"{i:06d}.json")
            if os.path.exists(state):
                with open(state) as f:
                    results[i] = json.load(f)
            else:  # state lost: recount from the tar itself
                results[i] = {
                    "shard": shard_name(split, i),
                    "count": count_shard_samples(final),
                    "skipped": [],
                    "formats": {},
                    "bytes": os.path.getsize(final),
                }
        else:
            todo.append(i)
    n_done_files = sum(len(shards[i]) for i in results)
    if not quiet:
        print(
            f"{src}: {sum(map(len, shards))} files, {len(classes)} classes -> {len(shards)} shards "
            f"({len(results)} already done, {len(todo)} to write)",
            file=sys.stderr,
        )
    bar = tqdm(
        total=sum(map(len, shards)),
        initial=n_done_files,
        unit="img",
        disable=quiet,
        desc=f"{split} shards",
        smoothing=0.05,
    )
    try:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                results[i] = write_shard(src, out, split, i, shards[i], progress=bar.update)
        else:
            import multiprocessing as mp

            tasks = [(src, out, split, i, shards[i]) for i in todo]
            with mp.get_context("spawn" if sys.platform == "darwin" else None).Pool(workers) as pool:
                for stats in pool.imap_unordered(_write_shard_task, tasks):
                    i = stats["index"]
                    results[i] = stats
                    bar.update(len(shards[i]))
    finally:
        bar.close()

    skipped = [s for i in sorted(results) for s in results[i]["skipped"]]
    formats: dict[str, int] = {}
    for r in results.values():
        for k, v in r["formats"].items():
            formats[k] = formats.get(k, 0) + v
    pattern = brace_pattern(out, split, len(shards))
    meta = {
        "split": split,
        "pattern": pattern,
        "pattern_relative": os.path.basename(pattern),
        "num_shards": len(shards),
        "num_samples": sum(r["count"] for r in results.values()),
        "num_skipped": len(skipped),
        "classes": classes,
        "num_classes": len(classes),
        "shards": [{"name": results[i]["shard"], "count": results[i]["count"]} for i in range(len(shards))],
        "formats": formats,
        "settings": {
            "src": os.path.abspath(src),
            "shard_size": shard_size,
            "max_shard_bytes": max_shard_bytes,
            "shuffle": shuffle,
            "seed": seed,
        },
    }
    _write_json(os.path.join(out, f"{split}-meta.json"), meta)
    _write_json(os.path.join(out, f"{split}-skipped.json"), skipped)
    classes_path = os.path.join(out, "classes.json")
    if os.path.exists(classes_path):
        with open(classes_path) as f:
            if json.load(f) != classes:
                print(
                    f"warning: {classes_path} lists different classes than {src}; left unchanged "
                    f"({split}-meta.json has this split's classes)",
                    file=sys.stderr,
                )
    else:
        _write_json(classes_path, classes)
    if not quiet:
        for s in skipped[:20]:
            print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
        if len(skipped) > 20:
            print(f"... {len(skipped) - 20} more in {split}-skipped.json", file=sys.stderr)
        print(
            f"{meta['num_samples']} samples in {len(shards)} shards, {len(skipped)} skipped, "
            f"{time.time() - t0:.1f}s",
            file=sys.stderr,
        )
        print(pattern)
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--src", required=True, help="ImageFolder root: src/<class>/<image>")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--split", required=True, help="shard name prefix, e.g. train or val")
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (default 1000)")
    p.add_argument(
        "--max-shard-bytes",
        type=parse_size,
        default=None,
        help="also cap the source bytes per shard, e.g. 512M (default: no cap)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the file order shuffle (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep sorted order (shards follow classes)")
    p.add_argument("--force", action="store_true", help="discard existing shards made with other settings")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    convert(
        a.src,
        a.out,
        a.split,
        a.shard_size,
        a.max_shard_bytes,
        a.workers,
        not a.no_shuffle,
        a.seed,
        a.force,
        a.quiet,
    )


if __name__ == "__main__":
    run_command("data.convert_shards", main)  # expected errors (an unreadable --src, a full disk): one line
