"""Skipped records, counted end to end: one counter type for every reader that drops an unreadable image.

A reader that cannot use a record (an image that does not decode, a tar member cut off by a truncated shard)
skips it, and calls a ``SkipCounter`` with the record's path and the reason. The counter

- logs a warning naming the path and the running total (so a user sees *which* file and *how many*);
- counts, in this process, and optionally in a shared ``multiprocessing.Value`` that DataLoader workers
  increment (the DataModules' ``num_skipped``, read by the main process);
- keeps the first ``MAX_LISTED`` records (path + reason) for reports: token-shard ``meta.json`` and the
  reconstruction report give the total and these paths.

Where the skip happens in a DataLoader worker and the *paths* must reach the main process (extraction,
evaluation), the dataset returns a ``Skipped`` record in place of the item and the collate function passes
the records along with the batch; the main process then ``record``s them here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_LISTED = 100  # paths kept for reports; the count is always the full total


@dataclass(frozen=True)
class Skipped:
    """A record a reader could not use: where it was (file path, or ``shard.tar:key``) and why."""

    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


class SkipCounter:
    """Counts skipped records (see the module docstring). ``shared``: a ``multiprocessing.Value("l")`` shared
    with worker processes, or None for a count of this process only."""

    def __init__(self, shared=None, max_listed: int = MAX_LISTED):
        self.shared = shared
        self.max_listed = max_listed
        self.count = 0  # skips recorded by this process
        self.listed: list[dict[str, str]] = []  # the first max_listed of them

    def __call__(self, path: str, reason: str) -> None:
        self.add(Skipped(str(path), str(reason)))

    def add(self, item: Skipped) -> None:
        self.count += 1
        total = self.count
        if self.shared is not None:
            with self.shared.get_lock():
                self.shared.value += 1
                total = int(self.shared.value)
        if len(self.listed) < self.max_listed:
            self.listed.append(item.as_dict())
        log.warning("skipping %s: %s (%d skipped so far)", item.path, item.reason, total)

    def record(self, items) -> None:
        """Add the ``Skipped`` records a collate function passed along with a batch."""
        for item in items:
            self.add(item)

    @property
    def total(self) -> int:
        """All skips: over every process sharing ``shared`` when there is one, else this process's."""
        return int(self.shared.value) if self.shared is not None else self.count

    def report(self) -> dict:
        """``{"count": total, "paths": [{"path", "reason"}, ...first MAX_LISTED]}``: what reports store."""
        return {"count": self.total, "paths": list(self.listed)}


def merge_reports(reports: list[dict], max_listed: int = MAX_LISTED) -> dict:
    """Several processes' ``SkipCounter.report()`` -> one (counts added, paths concatenated and capped)."""
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


__all__ = ["MAX_LISTED", "Skipped", "SkipCounter", "merge_reports", "report_line"]
