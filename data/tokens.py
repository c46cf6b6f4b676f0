"""Token shards: the tokenizer ids of a data set, written once and read by the generator's DataModule.

The files (meta.json + .npz shards, fixed or variable length) are described in `data/token_format.py`.
Keys are file names and may hold non-UTF-8 bytes (as lone surrogates); they are hashed through `key_bytes`.

`complete` is false while an extraction runs (or after a crash); `TokenShardWriter` on the same root resumes:
finished shards are kept and their keys are skipped, a leftover temp file is removed. A resume must use the same
tokenizer: meta.json records its weights' sha256 (`tokenizer_sha256`), and a writer with another one is refused
(the ids of two tokenizers of the same shape look alike, but mean different images).
Multi-process extraction: give each process its own `prefix` (e.g. "tokens-r03") and, when all are done,
run `finalize_meta(root)` once; readers glob every `*.npz`.

Variable-length records (`TokenShardWriter(..., variable_length=True, length_target={...})`, `write(ids,
labels, keys, lengths)`): the ids are stored padded to K with the lengths beside them; `TokenDataset` then
yields (ids, label, length) and the generator learns an end-of-image token (tokenizer/generator/end_token.py).
"""

from __future__ import annotations

import os
import re
import warnings
import zlib
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch

from data.loading import check_one_batch, worker_process_kwargs
from data.token_format import (
    FORMAT,
    VERSION,
    TokenShardError,
    finalize_meta,
    ids_dtype,
    length_stats,
    load_shard,
    read_meta,
    shard_paths,
    write_meta_json,
)
from tokenizer import atomic


class TokenShardWriter:
    """Buffers records and writes fixed-size shards atomically; resumes an interrupted extraction.

        with TokenShardWriter(root, num_tokens=128, codebook_size=4096, tokenizer_dir=tok_dir) as w:
            for images, labels, keys in loader:
                todo = [i for i, k in enumerate(keys) if not w.is_done(k)]   # optional: skip encoding work
                w.write(tok.encode(images[todo]), labels[todo], [keys[i] for i in todo])

    `write` also drops records whose key is in a finished shard (resume) and raises on a key repeated within
    this run. Records still buffered when the process dies are lost and re-extracted on resume.
    `variable_length=True`: every `write` also takes lengths [N] (or [N, A]) in 1..K and the ids past them are
    stored as 0; `length_target` (what chose the lengths, e.g. {"min_psnr": 20.0}) goes into meta.json.
    `tokenizer_sha256` (`tokenizer.persistence.weights_sha256(tokenizer_dir)`) names the tokenizer; resuming a
    directory written with another one is refused.
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
        tokenizer_sha256: str | None = None,
        image_size: int | None = None,
        write_meta: bool = True,
        variable_length: bool = False,
        length_target: dict | None = None,
        **extra_meta,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root, self.prefix, self.shard_size = root, prefix, shard_size
        self.num_tokens, self.codebook_size, self.num_views = num_tokens, codebook_size, num_views
        self.dtype = ids_dtype(codebook_size)
        self.write_meta, self.variable_length = write_meta, bool(variable_length)
        if length_target is not None and not variable_length:
            raise ValueError(f"length_target {length_target} given for fixed-length shards: set variable_length")
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
            tokenizer_sha256=tokenizer_sha256,
            image_size=image_size,
            num_records=None,
            num_shards=None,
            complete=False,
            **extra_meta,
        )
        if variable_length:
            self.meta.update(variable_length=True, length_target=length_target)
        meta_path = os.path.join(root, "meta.json")
        if os.path.exists(meta_path):
            old = read_meta(root)
            if old.get("tokenizer_sha256") != tokenizer_sha256:
                raise ValueError(
                    f"{root} holds tokens of another tokenizer (weights sha256 {old.get('tokenizer_sha256')}, from "
                    f"{old.get('tokenizer_dir')}), this writer's is {tokenizer_sha256} (from {tokenizer_dir}); "
                    "resuming would mix two tokenizers' ids in one set. Extract into a new directory (a new --out), "
                    "or resume with the tokenizer that started this one"
                )
            for field in ("num_tokens", "codebook_size", "num_views", "flip", "variable_length", "length_target"):
                if old.get(field) != self.meta.get(field):
                    raise ValueError(
                        f"{root} holds shards with {field}={old.get(field)!r}, this writer has "
                        f"{self.meta.get(field)!r}; use a new directory"
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
        if self.variable_length:
            self._buf["lengths"] = []
        self._buffered = 0

    def is_done(self, key: str) -> bool:
        return key in self.done_keys or key in self._new_keys

    def write(self, ids, labels, keys, lengths=None) -> int:
        """ids [N, K] or [N, A, K] (tensor or array), labels [N], N string keys, lengths [N] or [N, A] (only and
        always for variable-length shards). Returns records accepted."""
        ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if (lengths is None) == self.variable_length:
            raise ValueError("variable-length shards need lengths with every write, fixed-length shards take none; "
                             f"this writer has variable_length={self.variable_length}")  # fmt: skip
        if lengths is not None:
            lengths = np.asarray(lengths.cpu() if isinstance(lengths, torch.Tensor) else lengths)
            K = ids.shape[-1]
            if lengths.shape != ids.shape[:-1] or (lengths.size and not 1 <= lengths.min() <= lengths.max() <= K):
                got = f"{lengths.shape}" + (f" in [{lengths.min()}, {lengths.max()}]" if lengths.size else "")
                raise ValueError(f"lengths must have shape {ids.shape[:-1]} with values in 1..{K}, got {got}")
            ids = np.where(np.arange(ids.shape[-1]) < lengths[..., None], ids, 0)  # padding is 0 whatever came in
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
            if lengths is not None:
                self._buf["lengths"].append(lengths[keep].astype(np.int16 if ids.shape[-1] <= 32767 else np.int32))
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
class TokenRecords(NamedTuple):
    ids: np.ndarray  # [N, (A,) K] in the stored dtype; padded with 0 past each length
    labels: np.ndarray  # int64 [N]
    keys: np.ndarray  # [N]
    lengths: np.ndarray | None  # [N, (A,)] tokens per record (variable-length shards), None when all have K
    meta: dict


def load_token_records(root: str, check_keys: bool = True) -> TokenRecords:
    """All shards of root in memory, with the per-record lengths of variable-length shards."""
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
    lengths = None
    if meta.get("variable_length"):
        if missing := [p for p, s in zip(paths, shards) if "lengths" not in s]:
            raise TokenShardError(f"{root}/meta.json says variable_length but {missing[0]} has no lengths: it was "
                                  "written by another (fixed-length) extraction; move it out of this directory")
        lengths = np.concatenate([s["lengths"] for s in shards]).astype(np.int64)
    if check_keys and len(np.unique(keys)) != len(keys):
        raise ValueError(f"{root}: some image keys appear in more than one record")
    if ids.shape[-1] != meta["num_tokens"]:
        raise ValueError(
            f"{root}: shards hold {ids.shape[-1]} tokens per record, meta.json says {meta['num_tokens']}"
        )
    return TokenRecords(ids, labels, keys, lengths, meta)


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
    """(ids int64 [k], label int64) per record, + length int64 (min(L, k)) when `lengths` are given (variable-
    length shards); k = num_tokens prefix. With A views per record, training picks one at random, evaluation
    always view 0 (the unflipped image)."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, num_tokens: int | None = None, random_view: bool = True,
                 lengths: np.ndarray | None = None):  # fmt: skip
        K = ids.shape[-1]
        k = K if num_tokens is None else num_tokens
        if not 1 <= k <= K:
            raise ValueError(f"num_tokens must be in 1..{K}, got {k}")
        if lengths is not None and lengths.shape != ids.shape[:-1]:
            raise ValueError(f"lengths {lengths.shape} do not match ids {ids.shape} (one per record and view)")
        self.ids, self.labels, self.k, self.random_view, self.lengths = ids, labels, k, random_view, lengths

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        row = self.ids[i]  # [K] or [A, K]
        v = int(torch.randint(row.shape[0], ())) if row.ndim == 2 and self.random_view else 0
        row = row[v] if row.ndim == 2 else row
        out = (torch.from_numpy(row[: self.k].astype(np.int64)), torch.tensor(self.labels[i], dtype=torch.long))
        if self.lengths is None:
            return out
        length = self.lengths[i][v] if self.lengths.ndim == 2 else self.lengths[i]
        return (*out, torch.tensor(min(int(length), self.k), dtype=torch.long))  # L >= k: no end in the window


class TokenDataModule(pl.LightningDataModule):
    """Batches (ids int64 [B, k], labels int64 [B]) from token shards (see the module docstring), plus lengths
    int64 [B] from variable-length shards (`variable_length`; the GPT then needs `end_token: true`).

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
    def variable_length(self) -> bool:
        return bool(self.meta.get("variable_length"))

    @property
    def seq_len(self) -> int:
        return self.meta["num_tokens"] if self.num_tokens is None else self.num_tokens

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        ids, labels, keys, lengths, self._meta = load_token_records(self.root)
        if self.val_root is not None:
            val = load_token_records(self.val_root)
            for field in ("num_tokens", "codebook_size", "variable_length"):
                if val.meta.get(field) != self.meta.get(field):
                    raise ValueError(f"val shards have {field}={val.meta.get(field)}, train shards "
                                     f"{self.meta.get(field)}: extract both the same way")  # fmt: skip
            self.val_set = TokenDataset(val.ids, val.labels, self.num_tokens, False, val.lengths)
        else:
            is_val = split_by_key(keys, self.val_fraction, self.split_seed)
            if is_val.any():
                val_lengths = None if lengths is None else lengths[is_val]
                self.val_set = TokenDataset(ids[is_val], labels[is_val], self.num_tokens, False, val_lengths)
            ids, labels = ids[~is_val], labels[~is_val]
            lengths = None if lengths is None else lengths[~is_val]
        self.train_set = TokenDataset(ids, labels, self.num_tokens, True, lengths)

    def _loader(self, ds: TokenDataset, train: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **(worker_process_kwargs() if self.num_workers > 0 else {}),  # start method, stop signals (data.loading)
        )

    def train_dataloader(self):
        if self.drop_last:
            check_one_batch(self, len(self.train_set), f"token shards {self.root}: records",
                            "extract more records (or lower val_fraction), or set drop_last false")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        return [] if self.val_set is None else self._loader(self.val_set, train=False)


# the file-format names are part of this module's interface (tests and tools import them from here)
__all__ = ["FORMAT", "VERSION", "TokenShardError", "finalize_meta", "ids_dtype", "length_stats", "load_shard",
           "read_meta", "shard_paths", "write_meta_json", "TokenShardWriter", "TokenRecords", "load_token_records",
           "key_bytes", "split_by_key", "TokenDataset", "TokenDataModule"]
