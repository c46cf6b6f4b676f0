"""Token shards: the tokenizer ids of a data set, written once and read by the generator's DataModule.

Format (one directory, version 1)
---------------------------------
    <root>/meta.json             what produced the shards and how many records there are (see below)
    <root>/tokens-000000.npz     uncompressed numpy archives, written atomically (tokenizer.atomic)
    <root>/tokens-000001.npz     ...

Every shard holds three arrays with the same first dimension N (records in that shard):
    ids     int16 when codebook_size <= 32767, else int32;  [N, K] or [N, A, K] (A views per image, e.g. A=2
            for the original and its horizontal flip; `num_views` in meta.json)
    labels  int64 [N]  class index (-1 when the data set has none)
    keys    unicode [N] the source image keys; each key appears exactly once over all shards

meta.json:
    {"format": "onedtok-token-shards", "version": 1, "num_tokens": K, "codebook_size": V, "dtype": "int16",
     "num_views": A, "flip": true|false, "num_classes": C|null, "tokenizer_dir": "...", "image_size": 256,
     "num_records": N_total, "num_shards": S, "complete": true|false, ...extra fields given to the writer}
    data.extract_tokens adds "skipped": {"count": images it could not read, "paths": the first 100
    [{"path", "reason"}]}.

Reading checks every shard: a damaged file (truncated, overwritten) is a TokenShardError naming it and what to
do, and ids outside [0, codebook_size) of meta.json are rejected at load, naming the file and the range.
Keys are file names and may hold non-UTF-8 bytes (as lone surrogates); they are hashed through `key_bytes`.

`complete` is false while an extraction runs (or after a crash); `TokenShardWriter` on the same root resumes:
finished shards are kept and their keys are skipped, a leftover temp file is removed.
Multi-process extraction: give each process its own `prefix` (e.g. "tokens-r03") and, when all are done,
run `finalize_meta(root)` once; readers glob every `*.npz`.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import warnings
import zipfile
import zlib
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

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
    """One shard's arrays {"ids", "labels", "keys"}. A damaged file raises a TokenShardError naming it (never
    numpy's bare BadZipFile/EOFError, nor its advice to load with allow_pickle, which would run code from the
    file). With `codebook_size`, ids outside [0, codebook_size) are an error naming the file and the range."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {"ids": z["ids"], "labels": z["labels"], "keys": z["keys"]}
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
    return out


def finalize_meta(root: str, **updates) -> dict[str, Any]:
    """Count the records of every shard, check keys are unique, and mark meta.json complete."""
    meta = read_meta(root)
    seen: set[str] = set()
    for path in shard_paths(root):
        keys = load_shard(path)["keys"].tolist()
        dup = seen.intersection(keys)
        if dup or len(set(keys)) != len(keys):
            raise ValueError(f"duplicate keys in {path}: {sorted(dup)[:5] or 'within the shard'}")
        seen.update(keys)
    meta.update(num_records=len(seen), num_shards=len(shard_paths(root)), complete=True, **updates)
    write_meta_json(root, meta)
    return meta


class TokenShardWriter:
    """Buffers records and writes fixed-size shards atomically; resumes an interrupted extraction.

        with TokenShardWriter(root, num_tokens=128, codebook_size=4096, tokenizer_dir=tok_dir) as w:
            for images, labels, keys in loader:
                todo = [i for i, k in enumerate(keys) if not w.is_done(k)]   # optional: skip encoding work
                w.write(tok.encode(images[todo]), labels[todo], [keys[i] for i in todo])

    `write` also drops records whose key is in a finished shard (resume) and raises on a key repeated within
    this run. Records still buffered when the process dies are lost and re-extracted on resume.
    """

    def __init__(
        self,
        root: str,
        num_tokens: int,
        codebook_size: int,
        shard_size: int = 10000,
        prefix: str = "tokens",
        num_views: int = 1,
        flip: bool = False,
        num_classes: int | None = None,
        tokenizer_dir: str | None = None,
        image_size: int | None = None,
        write_meta: bool = True,
        **extra_meta,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root, self.prefix, self.shard_size = root, prefix, shard_size
        self.num_tokens, self.codebook_size, self.num_views = num_tokens, codebook_size, num_views
        self.dtype = ids_dtype(codebook_size)
        self.write_meta = write_meta
        os.makedirs(root, exist_ok=True)
        # this prefix's shard that was being written when the last run died (tokenizer.atomic's temp name, or
        # ".<prefix>-NNNNNN.npz.tmp" from writers before it)
        legacy = re.compile(re.escape(f".{prefix}-") + r"\d{6,}\.npz\.tmp")
        for name in os.listdir(root):
            if (atomic.is_partial(name) and name.startswith(f".{prefix}-")) or legacy.fullmatch(name):
                os.remove(os.path.join(root, name))
        self.meta = dict(
            format=FORMAT,
            version=VERSION,
            num_tokens=num_tokens,
            codebook_size=codebook_size,
            dtype=self.dtype.name,
            num_views=num_views,
            flip=flip,
            num_classes=num_classes,
            tokenizer_dir=tokenizer_dir,
            image_size=image_size,
            num_records=None,
            num_shards=None,
            complete=False,
            **extra_meta,
        )
        meta_path = os.path.join(root, "meta.json")
        if os.path.exists(meta_path):
            old = read_meta(root)
            for field in ("num_tokens", "codebook_size", "num_views", "flip"):
                if old.get(field) != self.meta[field]:
                    raise ValueError(
                        f"{root} holds shards with {field}={old.get(field)!r}, this writer has "
                        f"{self.meta[field]!r}; use a new directory"
                    )
        if write_meta:
            write_meta_json(root, self.meta)
        self.done_keys: set[str] = set()
        pattern = re.compile(re.escape(prefix) + r"-(\d{6,})\.npz")
        mine = {
            int(m.group(1)): p for p in shard_paths(root) if (m := pattern.fullmatch(os.path.basename(p)))
        }
        for path in mine.values():
            self.done_keys.update(load_shard(path)["keys"].tolist())
        self.next_index = 1 + max(mine, default=-1)
        self.num_resumed = len(self.done_keys)
        self.num_written = 0
        self.num_skipped = 0
        self._new_keys: set[str] = set()
        self._buf: dict[str, list[np.ndarray]] = {"ids": [], "labels": [], "keys": []}
        self._buffered = 0

    def is_done(self, key: str) -> bool:
        return key in self.done_keys or key in self._new_keys

    def write(self, ids, labels, keys) -> int:
        """ids [N, K] or [N, A, K] (tensor or array), labels [N], N string keys. Returns records accepted."""
        ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        keys = [str(k) for k in keys]
        want = (self.num_tokens,) if self.num_views == 1 else (self.num_views, self.num_tokens)
        if ids.shape[1:] != want or len(labels) != len(ids) or len(keys) != len(ids):
            raise ValueError(
                f"expected ids [N, {', '.join(map(str, want))}], labels [N], N keys; got ids "
                f"{ids.shape}, labels {labels.shape}, {len(keys)} keys"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.codebook_size):
            raise ValueError(f"ids must be in [0, {self.codebook_size}), got [{ids.min()}, {ids.max()}]")
        keep = []
        for i, key in enumerate(keys):
            if key in self._new_keys:
                raise ValueError(f"key {key!r} written twice in this run")
            if key in self.done_keys:
                self.num_skipped += 1
                continue
            self._new_keys.add(key)
            keep.append(i)
        if keep:
            self._buf["ids"].append(ids[keep].astype(self.dtype))
            self._buf["labels"].append(labels[keep].astype(np.int64))
            self._buf["keys"].append(np.array([keys[i] for i in keep], dtype=str))
            self._buffered += len(keep)
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)
        return len(keep)

    def _flush(self, n: int) -> None:
        arrays = {name: np.concatenate(parts) for name, parts in self._buf.items()}
        out = {name: a[:n] for name, a in arrays.items()}
        self._buf = {name: [a[n:]] if len(a) > n else [] for name, a in arrays.items()}
        self._buffered -= n
        name = f"{self.prefix}-{self.next_index:06d}.npz"
        with atomic.atomic_open(os.path.join(self.root, name), "wb") as f:  # a file object: numpy adds no ".npz"
            np.savez(f, **out)
        self.next_index += 1
        self.num_written += n

    def close(self) -> dict[str, Any] | None:
        """Write the last (partial) shard and, if this writer owns meta.json, mark it complete."""
        if self._buffered:
            self._flush(self._buffered)
        return finalize_meta(self.root) if self.write_meta else None

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()  # on an error, keep the finished shards and leave meta incomplete for a resume


# ---- reading -----------------------------------------------------------------------------------------------
def load_token_shards(root: str, check_keys: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """All shards of root in memory: ids [N, (A,) K] (stored dtype), labels int64 [N], keys [N], meta."""
    meta = read_meta(root)
    paths = shard_paths(root)
    if not paths:
        raise FileNotFoundError(f"no *.npz token shards in {root!r}")
    if not meta.get("complete", False):
        warnings.warn(
            f"{root}/meta.json is not marked complete: extraction unfinished or crashed", stacklevel=2
        )
    shards = [load_shard(p, meta["codebook_size"]) for p in paths]  # each named when damaged or out of range
    ids = np.concatenate([s["ids"] for s in shards])
    labels = np.concatenate([s["labels"] for s in shards]).astype(np.int64)
    keys = np.concatenate([s["keys"] for s in shards])
    if check_keys and len(np.unique(keys)) != len(keys):
        raise ValueError(f"{root}: some image keys appear in more than one record")
    if ids.shape[-1] != meta["num_tokens"]:
        raise ValueError(
            f"{root}: shards hold {ids.shape[-1]} tokens per record, meta.json says {meta['num_tokens']}"
        )
    return ids, labels, keys, meta


def key_bytes(key: str) -> bytes:
    """A record key as bytes: UTF-8, with the lone surrogates of non-UTF-8 file names turned back into their
    original bytes (what os.fsencode does on POSIX). Use it wherever a key is hashed or encoded."""
    return key.encode("utf-8", "surrogateescape")


def split_by_key(keys: np.ndarray, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask [N], True = validation. A hash of (seed, key): stable whatever the shard layout.

    Keys are file names, which need not be UTF-8: Python holds a non-UTF-8 byte as a lone surrogate
    ("surrogateescape"), so a key is hashed as the bytes it came from (``key_bytes``), never re-encoded strictly."""
    if val_fraction <= 0:
        return np.zeros(len(keys), dtype=bool)
    salt = f"{seed}:".encode()
    h = np.fromiter((zlib.crc32(salt + key_bytes(k)) for k in keys.tolist()), dtype=np.uint64, count=len(keys))
    return (h % 1_000_000) < int(round(val_fraction * 1_000_000))


class TokenDataset(torch.utils.data.Dataset):
    """(ids int64 [k], label int64) per record; k = num_tokens prefix. With A views per record, training
    picks one at random, evaluation always view 0 (the unflipped image)."""

    def __init__(
        self, ids: np.ndarray, labels: np.ndarray, num_tokens: int | None = None, random_view: bool = True
    ):
        K = ids.shape[-1]
        k = K if num_tokens is None else num_tokens
        if not 1 <= k <= K:
            raise ValueError(f"num_tokens must be in 1..{K}, got {k}")
        self.ids, self.labels, self.k, self.random_view = ids, labels, k, random_view

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.ids[i]  # [K] or [A, K]
        if row.ndim == 2:
            v = int(torch.randint(row.shape[0], ())) if self.random_view else 0
            row = row[v]
        return torch.from_numpy(row[: self.k].astype(np.int64)), torch.tensor(
            self.labels[i], dtype=torch.long
        )


class TokenDataModule(pl.LightningDataModule):
    """Batches (ids int64 [B, k], labels int64 [B]) from token shards (see the module docstring).

    Validation: `val_root` (another shard directory), else a `val_fraction` of the records chosen by a hash of
    their keys, else none. `num_tokens` trains on a prefix k <= K of every sequence.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        val_root: str | None = None,
        num_tokens: int | None = None,
        split_seed: int = 0,
        drop_last: bool = True,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root, self.val_root = root, val_root
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.num_tokens, self.split_seed = val_fraction, num_tokens, split_seed
        self.drop_last, self.pin_memory = drop_last, pin_memory
        self.train_set: TokenDataset | None = None
        self.val_set: TokenDataset | None = None
        self._meta: dict | None = None

    @property
    def meta(self) -> dict:
        """meta.json of the training shards (readable before setup, e.g. to size the model)."""
        if self._meta is None:
            self._meta = read_meta(self.root)
        return self._meta

    @property
    def seq_len(self) -> int:
        return self.meta["num_tokens"] if self.num_tokens is None else self.num_tokens

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        ids, labels, keys, self._meta = load_token_shards(self.root)
        if self.val_root is not None:
            vids, vlabels, _, vmeta = load_token_shards(self.val_root)
            for field in ("num_tokens", "codebook_size"):
                if vmeta[field] != self.meta[field]:
                    raise ValueError(
                        f"val shards have {field}={vmeta[field]}, train shards {self.meta[field]}"
                    )
            self.val_set = TokenDataset(vids, vlabels, self.num_tokens, random_view=False)
        else:
            is_val = split_by_key(keys, self.val_fraction, self.split_seed)
            if is_val.any():
                self.val_set = TokenDataset(ids[is_val], labels[is_val], self.num_tokens, random_view=False)
            ids, labels = ids[~is_val], labels[~is_val]
        self.train_set = TokenDataset(ids, labels, self.num_tokens, random_view=True)

    def _loader(self, ds: TokenDataset, train: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        return [] if self.val_set is None else self._loader(self.val_set, train=False)
