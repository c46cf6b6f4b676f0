"""What the evaluation passes collect from every process, merged so that each image counts exactly once.

Process r of W evaluates the images with global index i % W == r (``eval.sources``: no padding, no repeats).
Per-image rows (metrics, token ids, FID features) travel with their global index: padded with index -1 for
the collective, trimmed, sorted, so every number is over exactly N images whatever W. FID features above
``FeatureSet.max_rows`` images are all-reduced as sums instead. Works on an ``accelerate.Accelerator`` (or the
tests' one-process stand-in, which has only ``device``, ``num_processes``, ``is_main_process``,
``pad_across_processes``, ``gather`` and ``reduce``).
"""

from __future__ import annotations

import torch

from data.skips import merge_reports
from eval.metrics import FeatureSet

FID_DIM = 2048  # InceptionV3 pool features


def gather_rows(accelerator, index: torch.Tensor, *tensors: torch.Tensor):
    """Gather per-image rows from all processes; pad with index -1, trim, sort by global index.
    index int64 [b] and tensors [b, ...] of this process -> (index [N], [tensors [N, ...]]) on every process."""
    device = accelerator.device
    index = accelerator.pad_across_processes(index.to(device), dim=0, pad_index=-1)
    padded = [accelerator.pad_across_processes(t.to(device), dim=0, pad_index=0) for t in tensors]
    all_index = accelerator.gather(index).cpu()
    gathered = [accelerator.gather(t).cpu() for t in padded]
    keep = torch.nonzero(all_index >= 0).flatten()
    order = keep[torch.argsort(all_index[keep])]
    out_index = all_index[order]
    if len(torch.unique(out_index)) != len(out_index):
        raise RuntimeError("an image index was evaluated by more than one process")
    return out_index, [g[order] for g in gathered]


def merge_features(accelerator, fs: FeatureSet, total: int) -> FeatureSet:
    """The global FeatureSet (exact: rows when total <= fs.max_rows, else all-reduced sums)."""
    if total <= fs.max_rows and not fs.n_folded:
        rows = torch.cat(fs.rows) if fs.rows else torch.zeros(0, FID_DIM, dtype=torch.float64)
        index = torch.cat(fs.index) if fs.index else torch.zeros(0, dtype=torch.long)
        index, (rows,) = gather_rows(accelerator, index, rows)
        merged = FeatureSet(max_rows=max(total, 2))
        merged.add(rows, index)
        return merged
    fs.fold()
    device = accelerator.device
    s = fs.sum if fs.sum is not None else torch.zeros(FID_DIM, dtype=torch.float64)
    o = fs.outer if fs.outer is not None else torch.zeros(FID_DIM, FID_DIM, dtype=torch.float64)
    n = torch.tensor([fs.n_folded], dtype=torch.float64)
    merged = FeatureSet()
    merged.sum = accelerator.reduce(s.to(device), reduction="sum")
    merged.outer = accelerator.reduce(o.to(device), reduction="sum")
    merged.n_folded = int(accelerator.reduce(n.to(device), reduction="sum").item())
    return merged


class FidReference:
    """The reference images' merged Inception features, shared by the passes over the same images (the fixed-k
    report and its adaptive section read the same loader): the first pass merges them, later passes reuse them
    instead of running Inception over the references again. Every process holds the merged set (the merge is a
    collective), so every process takes the same branch in ``fids_against_reference``."""

    def __init__(self) -> None:
        self.merged: FeatureSet | None = None
        self.num_images = 0  # N of the pass that merged them: a later pass over other images is refused

    @property
    def needed(self) -> bool:
        """True until a pass has merged the reference features: that pass must compute them."""
        return self.merged is None


def fids_against_reference(accelerator, feats: dict[str, FeatureSet], names: list[str], n: int,
                           empty: set[str] = frozenset(), reference: FidReference | None = None) -> dict[str, float]:
    """rFID of each named FeatureSet against the reference features over the N images ({} off the main process;
    NaN for a name in ``empty``, a setting without output, and below 2 images). Every process must call it
    with the same names: the merges are collectives. Pops what it merged from ``feats``.

    The reference is ``feats["reference"]``, merged here, unless ``reference`` already holds it from an earlier
    pass over the same images (then ``feats`` has no "reference"); a ``reference`` still empty is filled."""
    if reference is not None and not reference.needed:
        if n != reference.num_images:
            raise ValueError(f"the shared reference features are of {reference.num_images} images, this pass has {n}:"
                             " a FidReference is shared only by passes over the same images")
        ref = reference.merged
    else:
        if "reference" not in feats:
            raise ValueError("no reference features: this pass must compute them (its FidReference is empty)")
        ref = merge_features(accelerator, feats.pop("reference"), n)
        if reference is not None:
            reference.merged, reference.num_images = ref, n
    fids: dict[str, float] = {}
    for name in names:
        if name in empty:
            fids[name] = float("nan")
            continue
        merged = merge_features(accelerator, feats.pop(name), n)
        if accelerator.is_main_process:
            fids[name] = merged.fid(ref) if n >= 2 else float("nan")
    return fids if accelerator.is_main_process else {}


def gather_skips(accelerator, report: dict) -> dict:
    """Every process's skip report (``data.skips``) merged: the total and the first 100 paths."""
    from accelerate.utils import gather_object

    reports = gather_object([report]) if accelerator.num_processes > 1 else [report]
    return merge_reports(reports)


def gather_grid(accelerator, grid: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{global index: {name: uint8 [3, S, S]}} of each process -> {name: uint8 [n, 3, S, S]} in index order."""
    from accelerate.utils import gather_object

    items = gather_object(sorted(grid.items())) if accelerator.num_processes > 1 else sorted(grid.items())
    items = sorted(items, key=lambda it: it[0])
    if not items:
        return {}
    return {name: torch.stack([d[name] for _, d in items]) for name in items[0][1]}


def broadcast_object(accelerator, obj):
    """The main process's `obj` (picklable) on every process: a decision every process must take alike."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


__all__ = ["FID_DIM", "gather_rows", "merge_features", "FidReference", "fids_against_reference", "gather_skips",
           "gather_grid", "broadcast_object"]
