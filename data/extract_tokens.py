"""Extract token shards: encode a data set with a frozen tokenizer, once, for the AR generator.

    # single process (CPU or one GPU)
    python -m data.extract_tokens --tokenizer checkpoints/demo/tokenizer --out checkpoints/tokens/demo \\
        --source sample --num-crops 3000 --flip
    # every process of a node (or several nodes) encodes its share
    accelerate launch -m data.extract_tokens --tokenizer TOK --out OUT --source folder \\
        --root /data/train --flip
    accelerate launch -m data.extract_tokens --tokenizer TOK --out OUT --source webdataset \\
        --shards '/data/shards/train-{000000..001281}.tar'

Sources (all images go through the eval transform at the tokenizer's image_size: shorter side resized,
center crop; no random augmentation except the optional stored flip):
- ``sample``: the embedded photographs (``data.sample.TRAIN_IMAGES``): ``--num-crops`` random crops of the
  training photos (random scale, random position), label = photo index. Crop ``i`` is a pure function of
  ``(--seed, i)``, so any process computes any crop and a rerun reproduces the same crops for the same keys.
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
the remaining images are split deterministically by ``process_index`` (image ``j`` of the remaining list goes
to process ``j % num_processes``: disjoint, complete, no padding, any number of images). Each process writes
its own shards (prefix ``tokens-r{process_index:03d}``); after ``wait_for_everyone()`` the main process runs
``finalize_meta`` (which also rejects duplicate keys). An interrupted run keeps its finished shards; rerunning
the same command skips their keys, even with a different number of processes. Webdataset sources split
whole shards between processes when there are at least as many shards as processes (each process reads only
its shards), else every process reads all shards and keeps every ``num_processes``-th sample.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.adaptive_records import add_adaptive_args, encode_adaptive_batch, length_target  # noqa: E402
from data.skips import SkipCounter, Skipped, merge_reports  # noqa: E402
from data.tokens import (  # noqa: E402
    TokenShardWriter,
    finalize_meta,
    load_shard,
    read_meta,
    shard_paths,
    write_meta_json,
)
from tokenizer.precision import add_precision_arg, autocast, resolve_precision  # noqa: E402

log = logging.getLogger("extract_tokens")


# ---- distributed state -----------------------------------------------------------------------------------
class _Single:
    """Stand-in for accelerate's PartialState when accelerate is unavailable (one process)."""

    process_index, num_processes = 0, 1
    is_main_process = is_local_main_process = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wait_for_everyone(self) -> None:
        pass


def partial_state(cpu: bool = False):
    """accelerate's PartialState. Without a GPU it is asked for CPU processes explicitly: otherwise processes
    started by torchrun / `accelerate launch --multi_gpu` on a CPU-only machine would each believe they are
    alone and all encode everything."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover
        if world > 1:
            raise SystemExit("multi-process extraction needs accelerate (pip install accelerate)") from None
        return _Single()
    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    if world > 1 and state.num_processes != world:
        raise SystemExit(
            f"WORLD_SIZE={world} but accelerate sees {state.num_processes} process(es); refusing "
            "to run (every process would encode every image)"
        )
    return state


def split_for_process(items: list, process_index: int, num_processes: int) -> list:
    """Item j goes to process j % num_processes: disjoint, covering, sizes differ by at most one."""
    return items[process_index::num_processes]


# ---- sources ---------------------------------------------------------------------------------------------
def _crop_seed(seed: int, index: int) -> int:
    return zlib.crc32(f"crop:{seed}:{index}".encode())


class SampleCrops(torch.utils.data.Dataset):
    """Deterministic random crops of the embedded training photographs: item i is a function of (seed, i).

    Returns (image float32 [3, S, S] in [0, 1], label = photo index, key "crop-<seed>-<i>")."""

    def __init__(self, image_size: int, num_crops: int, seed: int = 0, indices: list[int] | None = None):
        from data.sample import TRAIN_IMAGES, RandomCrops, load_photo

        photos = [load_photo(n) for n in TRAIN_IMAGES]
        self.crops = RandomCrops(photos, list(range(len(TRAIN_IMAGES))), image_size, num_crops)  # its pyramid
        self.classes = list(TRAIN_IMAGES)
        self.image_size, self.seed = image_size, seed
        self.indices = list(range(num_crops)) if indices is None else list(indices)

    @staticmethod
    def key(seed: int, index: int) -> str:
        return f"crop-{seed}-{index:07d}"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        g = torch.Generator().manual_seed(_crop_seed(self.seed, i))
        pyramid = self.crops.pyramid
        photo = int(torch.randint(len(pyramid), (), generator=g))
        image = pyramid[photo][int(torch.randint(len(pyramid[photo]), (), generator=g))]
        h, w = image.shape[-2:]
        s = self.image_size
        top = int(torch.randint(h - s + 1, (), generator=g))
        left = int(torch.randint(w - s + 1, (), generator=g))
        crop = image[:, top : top + s, left : left + s].clamp(0, 1)  # antialiased resizing overshoots a bit
        return crop, photo, self.key(self.seed, i)


class FolderImages(torch.utils.data.Dataset):
    """Listed ImageFolder items (relative path, label) -> (image, label, key), or a ``Skipped`` record when
    unreadable (counted and logged in the main process by ``batches_from_dataset``)."""

    def __init__(self, root: str, items: list[tuple[str, int]], image_size: int):
        from tokenizer.images import eval_transform

        self.root, self.items, self.transform = root, items, eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int):
        from tokenizer.images import read_image

        rel, label = self.items[j]
        path = os.path.join(self.root, rel)
        img = read_image(path)
        if img is None:
            return Skipped(path, "unreadable image")
        return self.transform(img), label, rel


def _collate(batch):
    """[(image, label, key) | Skipped] -> ((images [B,3,S,S], labels [B], keys) or None when B = 0, [Skipped])."""
    skipped = [b for b in batch if isinstance(b, Skipped)]
    batch = [b for b in batch if b is not None and not isinstance(b, Skipped)]
    if not batch:
        return None, skipped
    images = torch.stack([b[0] for b in batch])
    labels = torch.as_tensor([int(b[1]) for b in batch], dtype=torch.long)
    return (images, labels, [b[2] for b in batch]), skipped


def batches_from_dataset(ds, batch_size: int, num_workers: int, skips: SkipCounter | None = None) -> Iterator[tuple]:
    """(images, labels, keys) batches of a map-style dataset of (image, label, key) | Skipped items, in order.
    Skipped items travel with the batches to this (main) process and are recorded in `skips` (a new
    SkipCounter when None): logged with their path and counted, also when they came from a worker."""
    skips = SkipCounter() if skips is None else skips
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate
    )
    for batch, skipped in loader:
        skips.record(skipped)
        if batch is not None:
            yield batch




def webdataset_batches(
    shards: list[str],
    process_index: int,
    num_processes: int,
    done: set[str],
    image_size: int,
    batch_size: int,
    skips: SkipCounter | None = None,
) -> Iterator[tuple]:
    """This process's (images, labels, keys) batches from tar shards, skipping keys in `done`; unreadable
    samples and damaged shard tails are recorded in `skips`."""
    from data.tar_shards import iter_shard, sample_image, sample_label
    from tokenizer.images import eval_transform

    transform = eval_transform(image_size)
    skips = SkipCounter() if skips is None else skips
    by_shard = len(shards) >= num_processes
    mine = split_for_process(shards, process_index, num_processes) if by_shard else shards
    index, buf = 0, []
    for url in mine:
        for sample in iter_shard(url, skips):
            j, index = index, index + 1
            if not by_shard and j % num_processes != process_index:
                continue
            key = sample.get("__key__")
            if key is None or key in done:
                continue
            img, why = sample_image(sample)
            if img is None:
                skips(f"{url}:{key}", why)
                continue
            buf.append((transform(img), sample_label(sample), key))
            if len(buf) == batch_size:
                yield _collate(buf)[0]
                buf = []
    if buf:
        yield _collate(buf)[0]


class Source:
    """A data source split for one process: `batches()` yields (images [B,3,S,S], labels [B], keys)."""

    def __init__(self, args, image_size: int, state, done: set[str]):
        self.args, self.image_size, self.state, self.done = args, image_size, state, done
        self.skips = SkipCounter()  # this process's unreadable images (count + first paths, for meta.json)
        self.num_classes: int | None = None
        self.extra: dict[str, Any] = {"source": args.source}
        pi, n = state.process_index, state.num_processes
        self.total_todo: int | None = None  # over all processes, when known up front
        if args.source == "sample":
            keys = [SampleCrops.key(args.seed, i) for i in range(args.num_crops)]
            todo = [i for i, k in enumerate(keys) if k not in done]
            self.total_todo = len(todo)
            self.dataset = SampleCrops(image_size, args.num_crops, args.seed, split_for_process(todo, pi, n))
            self.num_classes = len(self.dataset.classes)
            self.extra.update(num_crops=args.num_crops, seed=args.seed, classes=self.dataset.classes)
        elif args.source == "folder":
            from data.folder import scan_image_folder

            if not args.root:
                raise SystemExit("--source folder needs --root DIR (root/<class>/<image>)")
            classes, items = scan_image_folder(args.root)
            todo = [it for it in items if it[0] not in done]
            self.total_todo = len(todo)
            self.dataset = FolderImages(args.root, split_for_process(todo, pi, n), image_size)
            self.num_classes = len(classes)
            self.extra.update(root=os.path.abspath(args.root), classes=classes)
        elif args.source == "webdataset":
            from data.webdataset import expand_shards

            if not args.shards:
                raise SystemExit("--source webdataset needs --shards PATTERN")
            self.shards = expand_shards(args.shards)
            if not self.shards:
                raise SystemExit(f"no shards match {args.shards!r}")
            self.num_classes = args.num_classes
            self.extra.update(shards=args.shards)
        else:  # pragma: no cover (argparse choices)
            raise ValueError(args.source)

    def num_images(self) -> int | None:
        """Images this process will encode (None when not known before reading: webdataset)."""
        return len(self.dataset) if self.args.source != "webdataset" else None

    def batches(self) -> Iterator[tuple]:
        a = self.args
        if a.source == "webdataset":
            st = self.state
            return webdataset_batches(self.shards, st.process_index, st.num_processes, self.done, self.image_size,
                                      a.batch_size, self.skips)  # fmt: skip
        return batches_from_dataset(self.dataset, a.batch_size, a.num_workers, self.skips)

    def describe(self) -> str:
        a = self.args
        return {"folder": f"folder {a.root}", "webdataset": f"shards {a.shards}"}.get(a.source, a.source)


# ---- encoding --------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_batch(tokenizer, images: torch.Tensor, num_tokens: int, flip: bool,
                 precision: str | None = None) -> torch.Tensor:  # fmt: skip
    """images [B, 3, S, S] -> ids [B, k], or [B, 2, k] (image, horizontal flip) with flip. The encoder runs
    under `precision` autocast (None: bf16 on CUDA, fp32 on CPU)."""
    with autocast(precision, images.device):
        if not flip:
            return tokenizer.encode(images, num_tokens=num_tokens)
        both = tokenizer.encode(torch.cat([images, images.flip(-1)]), num_tokens=num_tokens)  # [2B, k]
    b = len(images)
    return torch.stack([both[:b], both[b:]], dim=1)  # [B, 2, k]


def finished_keys(root: str) -> set[str]:
    """Keys of every finished shard in root, whichever process wrote it."""
    keys: set[str] = set()
    for path in shard_paths(root):
        keys.update(load_shard(path)["keys"].tolist())
    return keys


def _labels_num_classes(root: str) -> int | None:
    top = -1
    for path in shard_paths(root):
        labels = load_shard(path)["labels"]
        if len(labels):
            top = max(top, int(labels.max()))
    return top + 1 if top >= 0 else None


def _gather(state, obj) -> list:
    """`obj` from every process (accelerate's gather_object), in process order."""
    if state.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def extract(args: argparse.Namespace) -> dict | None:
    """Run the extraction in this process; returns the final meta (main process) or None."""
    from tqdm.auto import tqdm

    from tokenizer import OneDTokenizer

    state = partial_state(cpu=args.cpu)
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
        image_size=tokenizer.image_size,
        write_meta=False,
        variable_length=target is not None,
        length_target=target,
    )
    done = finished_keys(args.out)
    source = Source(args, tokenizer.image_size, state, done)
    state.wait_for_everyone()
    if state.is_main_process:
        meta = dict(writer.meta, num_classes=source.num_classes, num_processes=n, precision=precision,
                    **source.extra)  # fmt: skip
        if os.path.exists(os.path.join(args.out, "meta.json")):
            meta["resumed_from_records"] = len(done)
        write_meta_json(args.out, meta)
        todo = f", {source.total_todo} to do" if source.total_todo is not None else ""
        log.warning("extracting %s -> %s: K=%d, codebook %d, flip=%s, lengths %s, %d process(es), %d record(s) "
                    "already done%s", args.source, args.out, k, tokenizer.codebook_size, args.flip, target or "fixed",
                    n, len(done), todo)  # fmt: skip
    state.wait_for_everyone()

    t0, count = time.time(), 0
    bar = tqdm(
        total=source.num_images(),
        unit="img",
        disable=not state.is_local_main_process or args.no_progress,
        desc=f"extract (process {pi}/{n})",
        dynamic_ncols=True,
    )
    for images, labels, keys in source.batches():
        images = images.to(device, non_blocking=True)
        if target is None:
            ids, lengths = encode_batch(tokenizer, images, k, args.flip, precision), None
        else:
            ids, lengths = encode_adaptive_batch(tokenizer, images, k, args.flip, target, precision)
        count += writer.write(ids, labels, keys, lengths)
        bar.update(len(keys))
    bar.close()
    writer.close()  # the last partial shard (meta is the main process's job)
    log.info("process %d wrote %d records in %.1fs (%d skipped)", pi, count, time.time() - t0, source.skips.count)

    state.wait_for_everyone()
    written = _gather(state, {"records": count, "skipped": source.skips.report()})
    meta = None
    if state.is_main_process:
        skipped = merge_reports([w["skipped"] for w in written])
        if not done and not sum(w["records"] for w in written):
            raise SystemExit(
                f"no readable image in {source.describe()}: {skipped['count']} skipped (e.g. "
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
            f"{skipped['count']} unreadable image(s) skipped, {time.time() - t0:.1f}s)",
            flush=True,
        )
    state.wait_for_everyone()
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="save_pretrained directory of the frozen tokenizer")
    p.add_argument("--out", required=True, help="token shard directory (created; resumed if it exists)")
    p.add_argument("--source", choices=("sample", "folder", "webdataset"), default="sample")
    p.add_argument("--root", help="folder source: ImageFolder root")
    p.add_argument("--shards", help="webdataset source: brace pattern(s) joined with '::'")
    p.add_argument(
        "--num-classes", type=int, help="webdataset source: number of classes (default: max label + 1)"
    )
    p.add_argument("--num-crops", type=int, default=3000, help="sample source: number of random crops")
    p.add_argument("--seed", type=int, default=0, help="sample source: crop seed (part of every key)")
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
    if args.num_crops < 1 and args.source == "sample":
        raise SystemExit("--num-crops must be >= 1")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        return extract(args)


if __name__ == "__main__":
    main()
