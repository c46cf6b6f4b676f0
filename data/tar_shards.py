"""Webdataset tar shards: listing, counting and reading them; the one shard reader of the project.

Used by the training DataModule (``data.webdataset``), token extraction (``data.extract_tokens``) and
evaluation (``eval.sources``). A sample is the run of consecutive tar members sharing a key (the member path
up to the first ``.`` of its file name): ``{"__key__", "__url__", "<ext>": bytes, ...}`` (extensions lower
case, webdataset's convention), as ``data.convert_shards`` writes them.

Damaged shards. A shard cut short (a copy that died, a full disk) ends with ``tarfile.ReadError: unexpected end
of data`` somewhere in its tail. ``iter_shard`` yields every sample that was complete before the damage, then
reports the tail as ONE skipped record naming the shard (the number of samples lost is unknown without the
converter's meta.json) and stops; ``count_shard_samples`` counts the same complete samples (a warning names the
shard), so sample offsets and epoch sizes agree with what the reader yields.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator

from tokenizer.images import decode_image_or_reason

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "img", "image")
# errors a damaged tar stream raises while it is read (zlib/EOFError: compressed .tar.gz shards)
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # member path -> (key, extension), as webdataset's
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not samples


def sample_image(sample: dict) -> tuple[object | None, str]:
    """A webdataset sample's first image member (IMAGE_KEYS order) decoded to an RGB PIL image, as (image, "");
    or (None, why) when there is no image member or it is skipped (``tokenizer.images.decode_image_or_reason``:
    unreadable, a decompression bomb, an extreme aspect ratio)."""
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        return None, "no image member"
    return decode_image_or_reason(data)


def sample_label(sample: dict) -> int:
    """The sample's integer class from its `cls` member, or -1 when it has none or it is not an integer."""
    try:
        return int(sample["cls"]) if "cls" in sample else -1
    except (ValueError, TypeError):
        return -1


def expand_shards(shards: str | list[str]) -> list[str]:
    """Brace pattern(s) (joined with ``::``) or a list -> list of shard URLs/paths."""
    import braceexpand

    if isinstance(shards, str):
        out: list[str] = []
        for part in shards.split("::"):
            out.extend(braceexpand.braceexpand(os.path.expanduser(part)))
        return out
    out = []
    for s in shards:
        out.extend(expand_shards(s))
    return out


def _split_member(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, lower-case extension) of a sample member; None for directories, links and metadata members."""
    if not member.isreg() or _META_MEMBER.match(member.name):
        return None
    m = _KEY_EXT.match(member.name)
    return (m.group(1), m.group(2).lower()) if m else None


def count_shard_samples(path: str) -> int:
    """Samples in a local shard, from its tar headers (data is seeked over, not read). A damaged tail is
    left out exactly as ``iter_shard`` leaves it out: the sample in progress at the damage does not count."""
    keys: list[str] = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                split = _split_member(member)
                if split and (not keys or keys[-1] != split[0]):
                    keys.append(split[0])
    except TAR_ERRORS as exc:
        if keys:
            keys.pop()  # the sample whose members were being read when the data ended
        log.warning("%s is damaged (%s): counting the %d complete samples before the damage; re-create the "
                    "shard (python -m data.convert_shards) to get the rest back", path, exc, len(keys))
    return len(set(keys))


def shard_sample_counts(shards: list[str]) -> list[int]:
    """Samples per shard, from ``*-meta.json`` beside the shards, else by scanning local tar headers."""
    known: dict[str, int] = {}
    for d in sorted({os.path.dirname(s) for s in shards}):
        for meta_path in sorted(glob.glob(os.path.join(d, "*-meta.json"))):
            try:
                with open(meta_path) as f:
                    meta = json.load(f)
                for entry in meta.get("shards", []):
                    known[os.path.join(d, entry["name"])] = int(entry["count"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable %s: %s", meta_path, exc)
    counts = []
    missing = [s for s in shards if s not in known]
    if missing:
        log.warning(
            "no meta.json entry for %d shard(s) (e.g. %s): counting samples from tar headers",
            len(missing),
            missing[0],
        )
    for s in shards:
        if s in known:
            counts.append(known[s])
        elif os.path.isfile(s):
            counts.append(count_shard_samples(s))
        else:
            raise ValueError(
                f"cannot count the samples of {s} (no meta.json, not a local file): "
                "pass epoch_length explicitly"
            )
    return counts


def _open(url: str):
    if os.path.exists(url):
        return open(url, "rb")
    from webdataset.gopen import gopen  # pipe:, http(s):, ... as webdataset opens them

    return gopen(url)


def iter_shard(url: str, skips: Callable[[str, str], None]) -> Iterator[dict]:
    """The samples of one shard, in order. ``skips(path, reason)`` (e.g. a ``data.skips.SkipCounter``) is
    called for what cannot be read: a shard that does not open, a damaged tail (once, naming the shard; the
    samples before it are yielded), a member repeated within a sample."""
    try:
        stream = _open(url)
    except OSError as exc:
        skips(url, f"cannot open the shard ({exc})")
        return
    current: dict | None = None
    complete = 0
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                split = _split_member(member)
                if split is None:
                    continue
                key, ext = split
                if current is None or current["__key__"] != key:
                    if current is not None:  # the next key started: the previous sample is whole
                        complete += 1
                        yield current
                    current = {"__key__": key, "__url__": url}
                data = tar.extractfile(member).read()
                tar.members = []  # streaming: do not keep every header of a large shard in memory
                if ext in current:
                    skips(f"{url}:{member.name}", "member repeated within a sample; the first one is used")
                    continue
                current[ext] = data
    except TAR_ERRORS as exc:
        lost = f", and the sample {current['__key__']!r} being read" if current is not None else ""
        skips(url, f"shard damaged after {complete} complete samples ({type(exc).__name__}: {exc}); its tail"
                   f"{lost} is skipped. Re-create it (python -m data.convert_shards) or leave it out of the "
                   "pattern")  # fmt: skip
        return
    if current is not None:
        yield current


__all__ = ["IMAGE_KEYS", "TAR_ERRORS", "count_shard_samples", "expand_shards", "iter_shard", "sample_image",
           "sample_label", "shard_sample_counts"]
