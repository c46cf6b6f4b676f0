"""The token-shard files: one directory of meta.json plus uncompressed .npz shards; reading, checking, finalizing.

Format (one directory, version 1)
---------------------------------
    <root>/meta.json             what produced the shards and how many records there are (see below)
    <root>/tokens-000000.npz     uncompressed numpy archives, written atomically (tokenizer.atomic)
    <root>/tokens-000001.npz     ...

Every shard holds these arrays with the same first dimension N (records in that shard):
    ids     int16 when codebook_size <= 32767, else int32;  [N, K] or [N, A, K] (A views per image, e.g. A=2
            for the original and its horizontal flip; `num_views` in meta.json)
    labels  int64 [N]  class index (-1 when the data set has none)
    keys    unicode [N] the source image keys; each key appears exactly once over all shards
    lengths int16 [N] or [N, A], variable-length shards only (`variable_length` in meta.json, e.g. adaptive
            extraction): record n is ids[n, :lengths[n]], 1 <= length <= K; the ids after it are padding (0).
            Shards without `lengths` are fixed length: every record has all K tokens.

meta.json:
    {"format": "onedtok-token-shards", "version": 1, "num_tokens": K, "codebook_size": V, "dtype": "int16",
     "num_views": A, "flip": true|false, "num_classes": C|null, "tokenizer_dir": "...",
     "tokenizer_sha256": "<sha256 of its model.safetensors>", "image_size": 256,
     "num_records": N_total, "num_shards": S, "complete": true|false, ...extra fields given to the writer}
    variable-length shards add "variable_length": true, "length_target" (e.g. {"min_psnr": 20.0}: what chose
    the lengths) and, once finalized, "lengths": {"mean", "median", "min", "max", "histogram": {k: count}}.
    data.extract_tokens adds "skipped": {"count": images it could not read, "paths": the first 100
    [{"path", "reason"}]}.

Reading checks every shard: a damaged file (truncated, overwritten) is a TokenShardError naming it and what to
do, and ids outside [0, codebook_size) of meta.json (or lengths outside 1..K) are rejected at load, naming the
file and the range.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import zipfile
import zlib
from typing import Any

import numpy as np

from tokenizer import atomic

FORMAT = "onedtok-token-shards"
VERSION = 1


def ids_dtype(codebook_size: int) -> np.dtype:
    """The smallest signed integer type the ids are stored in."""
    return np.dtype(np.int16) if codebook_size <= 32767 else np.dtype(np.int32)


def shard_paths(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "*.npz")))


def read_meta(root: str) -> dict[str, Any]:
    path = os.path.join(root, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no token-shard meta.json in {root!r}; write shards with TokenShardWriter")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} meta file")
    return meta


def write_meta_json(root: str, meta: dict) -> None:
    """meta.json, atomically (temp file in `root`, then rename: tokenizer.atomic)."""
    atomic.write_json(os.path.join(root, "meta.json"), meta, indent=2, sort_keys=True)


class TokenShardError(ValueError):
    """A token shard that cannot be used; the message names the file and what to do."""


# what numpy/zipfile raise for a damaged .npz: truncated (BadZipFile, EOFError), flipped bytes (CRC: BadZipFile,
# zlib.error), not an archive at all (ValueError / UnpicklingError: numpy takes unknown bytes for a pickle)
_LOAD_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError)
_REDO = ("delete that file and re-run the same `python -m data.extract_tokens ... --out` command: it keeps the "
         "other shards and re-extracts only the missing records")


def load_shard(path: str, codebook_size: int | None = None) -> dict[str, np.ndarray]:
    """One shard's arrays {"ids", "labels", "keys"} (+ "lengths" in a variable-length shard). A damaged file
    raises a TokenShardError naming it (never numpy's bare BadZipFile/EOFError, nor its advice to load with
    allow_pickle, which would run code from the file). With `codebook_size`, ids outside [0, codebook_size) and
    lengths outside 1..K are an error naming the file and the range."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {"ids": z["ids"], "labels": z["labels"], "keys": z["keys"]}
            if "lengths" in z.files:
                out["lengths"] = z["lengths"]
    except _LOAD_ERRORS as exc:
        if isinstance(exc, (ValueError, pickle.UnpicklingError)) and "pickle" in str(exc):
            why = "not a numpy .npz archive (unknown bytes)"  # numpy's own text recommends allow_pickle: unsafe
        else:
            why = f"{type(exc).__name__}: {exc}"
        raise TokenShardError(f"token shard {path} is damaged or not a token shard ({why}); {_REDO}") from None
    ids = out["ids"]
    if codebook_size is not None and ids.size:
        lo, hi = int(ids.min()), int(ids.max())  # python ints: no wrap-around in the ids' own dtype
        if lo < 0 or hi >= int(codebook_size):
            raise TokenShardError(
                f"token shard {path} holds ids in [{lo}, {hi}], outside the codebook [0, {codebook_size}) of "
                f"meta.json: the shard was written by another tokenizer or is damaged; {_REDO}"
            )
    lengths = out.get("lengths")
    if codebook_size is not None and lengths is not None and lengths.size:
        lo, hi, K = int(lengths.min()), int(lengths.max()), ids.shape[-1]
        if lengths.shape != ids.shape[:-1] or lo < 1 or hi > K:
            raise TokenShardError(f"token shard {path} holds lengths {lengths.shape} in [{lo}, {hi}], not "
                                  f"{ids.shape[:-1]} in 1..{K}: the shard is damaged; {_REDO}")  # fmt: skip
    return out


def length_stats(lengths: np.ndarray) -> dict[str, Any]:
    """{"mean", "median", "min", "max", "histogram": {"k": count}} of token lengths (any shape; JSON-ready)."""
    lengths = np.asarray(lengths).reshape(-1).astype(np.int64)
    if not lengths.size:
        return {"mean": None, "median": None, "min": None, "max": None, "histogram": {}}
    values, counts = np.unique(lengths, return_counts=True)
    return {"mean": float(lengths.mean()), "median": float(np.median(lengths)), "min": int(values[0]),
            "max": int(values[-1]), "histogram": {str(int(v)): int(c) for v, c in zip(values, counts)}}  # fmt: skip


class KeyOwners:
    """{key: the shard that holds it}, filled shard by shard; a key met twice is a TokenShardError (`check`)
    naming both shards and what to do, never a bare "duplicate keys" that every later rerun repeats."""

    def __init__(self, root: str):
        self.root, self.owner, self.clashes = root, {}, {}  # clashes: key -> (first shard, second shard)

    def add(self, path: str, keys: list[str]) -> None:
        """The keys of the shard at `path` (each shard once)."""
        in_this_shard: set[str] = set()
        for key in keys:
            first = self.owner.setdefault(key, path)
            if first != path or key in in_this_shard:
                self.clashes.setdefault(key, (first, path))
            in_this_shard.add(key)

    def check(self) -> None:
        if not self.clashes:
            return
        key, (first, second) = next(iter(self.clashes.items()))
        shards = sorted({os.path.basename(p) for pair in self.clashes.values() for p in pair})  # all: the fix
        raise TokenShardError(
            f"{self.root}: {len(self.clashes)} duplicate key(s) held by more than one record (e.g. {key!r} in "
            f"{os.path.basename(first)} and {os.path.basename(second)}): two extractions wrote into this "
            f"directory at once, or shards were copied in. Delete the {len(shards)} shard(s) holding them "
            f"({' '.join(shards)}) and re-run the same `python -m data.extract_tokens ... --out` command: it "
            "keeps the other shards and re-extracts only the missing records")


def finalize_meta(root: str, **updates) -> dict[str, Any]:
    """Count the records of every shard, check keys are unique, and mark meta.json complete; variable-length
    shards also get the statistics of their lengths ("lengths", over every record and view)."""
    meta = read_meta(root)
    owners = KeyOwners(root)
    lengths = []
    for path in shard_paths(root):
        shard = load_shard(path)
        owners.add(path, shard["keys"].tolist())
        if "lengths" in shard:
            lengths.append(shard["lengths"].reshape(-1))
    owners.check()
    if meta.get("variable_length"):
        updates = {"lengths": length_stats(np.concatenate(lengths) if lengths else np.zeros(0)), **updates}
    meta.update(num_records=len(owners.owner), num_shards=len(shard_paths(root)), complete=True, **updates)
    write_meta_json(root, meta)
    return meta


__all__ = ["FORMAT", "VERSION", "KeyOwners", "TokenShardError", "finalize_meta", "ids_dtype", "length_stats",
           "load_shard", "read_meta", "shard_paths", "write_meta_json"]
