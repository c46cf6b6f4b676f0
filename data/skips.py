"""Skipped records, counted end to end: one counter type for every reader that drops an unreadable image.

A reader that cannot use a record (an image that does not decode, a decompression bomb, an extreme aspect ratio, a
tar member cut off by a truncated shard) skips it, and calls a ``SkipCounter`` with the record's path and the
reason. The counter

- counts each path ONCE: training meets a corrupt file again every epoch (and a shard stream every pass over its
  shards), and one bad file is one skipped image, not one per visit;
- logs a warning naming the path and the running total the first time (so a user sees *which* file and *how many*);
- counts in this process, and optionally in a ``SkipTally`` shared with the DataLoader workers (the DataModules'
  ``num_skipped``, read by the main process), which remembers the paths any worker has counted: a file that
  worker 0 skipped in epoch 1 and worker 1 meets in epoch 2 is still one;
- keeps the first ``MAX_LISTED`` records (path + reason) for reports: token-shard ``meta.json`` and the
  reconstruction report give the total and these paths.

Where the skip happens in a DataLoader worker and the *paths* must reach the main process (extraction,
evaluation), the dataset returns a ``Skipped`` record in place of the item and the collate function passes
the records along with the batch; the main process then ``record``s them here.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from data.worker_context import worker_context

log = logging.getLogger(__name__)

MAX_LISTED = 100  # paths kept for reports; the count is always the full total
TALLY_SLOTS = 1 << 16  # distinct paths a SkipTally remembers (512 KiB of shared memory)
TALLY_PROBES = 64  # slots tried per path; past them (a table nearly full) a path is counted without being remembered


@dataclass(frozen=True)
class Skipped:
    """A record a reader could not use: where it was (file path, or ``shard.tar:key``) and why."""

    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


class SkipTally:
    """The distinct paths skipped by several processes (a DataModule's DataLoader workers), in shared memory: a
    count, and an open-addressing table of 64-bit path hashes (0 = empty slot) under one lock. Created before the
    workers start (they inherit it). Exact up to about TALLY_SLOTS distinct paths; past that, a path whose probes
    find no free slot is counted each time it is met again."""

    def __init__(self, slots: int = TALLY_SLOTS):
        self._lock = worker_context().Lock()
        self._count = worker_context().RawValue("q", 0)
        self._hashes = worker_context().RawArray("q", slots)  # zero-filled

    @staticmethod
    def _hash(path: str) -> int:
        digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True) or 1  # 0 marks an empty slot

    def add(self, path: str) -> tuple[bool, int]:
        """(whether no process had counted ``path`` before, the total after this call)."""
        h, n = self._hash(path), len(self._hashes)
        with self._lock:
            new = True
            for i in range(min(TALLY_PROBES, n)):
                slot = (h + i) % n
                if self._hashes[slot] == h:
                    new = False
                    break
                if self._hashes[slot] == 0:
                    self._hashes[slot] = h
                    break
            self._count.value += int(new)
            return new, int(self._count.value)

    @property
    def total(self) -> int:
        return int(self._count.value)


class SkipCounter:
    """Counts skipped records, each path once (see the module docstring). ``shared``: a ``SkipTally`` shared with
    worker processes, or None for a count of this process only."""

    def __init__(self, shared: SkipTally | None = None, max_listed: int = MAX_LISTED):
        self.shared = shared
        self.max_listed = max_listed
        self.count = 0  # distinct paths recorded by this process
        self.listed: list[dict[str, str]] = []  # the first max_listed of them
        self.seen: set[str] = set()  # every path recorded by this process

    def __call__(self, path: str, reason: str) -> None:
        self.add(Skipped(str(path), str(reason)))

    def add(self, item: Skipped) -> None:
        if item.path in self.seen:  # met again (the next epoch, the next pass over a shard): already counted
            return
        self.seen.add(item.path)
        self.count += 1
        new, total = (True, self.count) if self.shared is None else self.shared.add(item.path)
        if len(self.listed) < self.max_listed:
            self.listed.append(item.as_dict())
        if new:  # else another worker counted and named it already
            log.warning("skipping %s: %s (%d skipped so far)", item.path, item.reason, total)

    def record(self, items) -> None:
        """Add the ``Skipped`` records a collate function passed along with a batch."""
        for item in items:
            self.add(item)

    @property
    def total(self) -> int:
        """All skips: over every process sharing ``shared`` when there is one, else this process's."""
        return self.shared.total if self.shared is not None else self.count

    def report(self) -> dict:
        """``{"count": total, "paths": [{"path", "reason"}, ...first MAX_LISTED]}``: what reports store."""
        return {"count": self.total, "paths": list(self.listed)}


def merge_reports(reports: list[dict], max_listed: int = MAX_LISTED) -> dict:
    """Several processes' ``SkipCounter.report()`` -> one (counts added, paths concatenated and capped). The
    processes must have read disjoint records (the split rule of ``data.sources``), as a path counted by two of
    them is counted twice."""
    paths = [p for r in reports for p in r.get("paths", [])]
    return {"count": sum(int(r.get("count", 0)) for r in reports), "paths": paths[:max_listed]}


def report_line(report: dict, where: str = "metrics.json") -> str:
    """One human line for a report: the total and the first few paths (the rest are listed in `where`)."""
    n = int(report.get("count", 0))
    if not n:
        return "Skipped: none (every listed image was read)."
    first = ", ".join(f"{p['path']} ({p['reason']})" for p in report.get("paths", [])[:5])
    more = f" (first {len(report.get('paths', []))} listed in {where})" if n > 5 else ""
    return f"Skipped: {n} record(s), e.g. {first}{more}."


__all__ = ["MAX_LISTED", "Skipped", "SkipCounter", "SkipTally", "merge_reports", "report_line"]
