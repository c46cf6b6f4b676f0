"""Helpers of scripts/multinode_smoke.sh.

python scripts/multinode_check.py shards RUN_DIR [--per-photo N] [--size S] [--num-shards 8]
    RUN_DIR/images: an ImageFolder tree of JPEG crops of the embedded scikit-image photographs (one class
    per photo), converted to webdataset shards RUN_DIR/shards/train-{000000..}.tar by data.convert_shards
python scripts/multinode_check.py check RUN_DIR --world-size 2 --steps 6 12
    (a) ranks consumed disjoint samples (per epoch) and the same number of batches,
    (b) all parameters and buffers (VQ codebook included) are identical on every rank after each fit,
    (c) the resumed fit continued the global step, and the final checkpoint holds the last step,
    (d) DDP all-reduced each tokenizer gradient exactly once per batch, and nothing else (the discriminator
        reduces its own gradients outside DDP), and no tokenizer gradient was all-reduced outside DDP; a record
        without these data fails the check.
    Prints one line per check; exits 1 naming the failed checks.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_images(out: str, per_photo: int, size: int, seed: int = 0) -> int:
    from PIL import Image

    from data.photos import TRAIN_IMAGES, load_photo, resize_shorter_side

    g = torch.Generator().manual_seed(seed)
    n = 0
    for name in TRAIN_IMAGES:
        photo = resize_shorter_side(load_photo(name), 4 * size)
        h, w = photo.shape[-2:]
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for i in range(per_photo):
            top = int(torch.randint(h - size + 1, (), generator=g))
            left = int(torch.randint(w - size + 1, (), generator=g))
            crop = photo[:, top : top + size, left : left + size]
            array = (crop.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            Image.fromarray(array).save(os.path.join(out, name, f"{name}_{i:03d}.jpg"), quality=90)
            n += 1
    return n


class Checks:
    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, name: str, ok: bool, detail: str) -> bool:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        if not ok:
            self.failed.append(name)
        return ok


def load_records(audit: str, world: int) -> dict[int, list[dict]]:
    """{start_step: [record of rank 0, rank 1, ...]} for every fit call that left a complete set."""
    by_start: dict[int, dict[int, dict]] = {}
    for path in glob.glob(os.path.join(audit, "rank*-from*-keys.json")):
        with open(path) as f:
            rec = json.load(f)
        rec["state_path"] = path[: -len("-keys.json")] + "-state.pt"
        by_start.setdefault(rec["start_step"], {})[rec["rank"]] = rec
    return {s: [recs.get(r) for r in range(world)] for s, recs in sorted(by_start.items())}


def compare_states(paths: list[str]) -> tuple[bool, str]:
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    ref = states[0]
    bad: list[str] = []
    for r, st in enumerate(states[1:], start=1):
        if set(st) != set(ref):
            bad.append(f"rank {r} has different tensor names: {sorted(set(st) ^ set(ref))[:5]}")
            continue
        for name in sorted(ref):
            a, b = ref[name], st[name]
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("nan")
                bad.append(f"{name} (rank 0 vs {r}, max |diff| {diff:.3g})")
    n_params = sum(k.startswith("param:") for k in ref)
    n_buffers = sum(k.startswith("buffer:") for k in ref)
    if bad:
        return False, f"{len(bad)} tensors differ across ranks: " + "; ".join(bad[:6]) + (
            " ..." if len(bad) > 6 else ""
        )
    return True, f"{n_params} parameters + {n_buffers} buffers bit-identical on {len(states)} ranks"


DDP_KEYS = ("managed_elements", "tokenizer_elements", "reduced_per_batch", "tokenizer_grad_outside_ddp_per_batch",
            "other_outside_ddp_per_batch", "tokenizer_grad_outside_ddp_between_batches",
            "other_outside_ddp_between_batches")


def check_ddp(c: Checks, recs: list[dict], tag: str) -> bool:
    """Check (d) on one fit's records (see tokenizer/training/callbacks.py for the "ddp" record): fails, rather
    than skips, when a record lacks the data."""
    name = f"(d) DDP reduces each tokenizer gradient once per batch [{tag}]"
    missing = []
    for r, rec in enumerate(recs):
        ddp = rec.get("ddp")
        if not isinstance(ddp, dict):
            missing.append(f"rank {r}: no 'ddp' data (the model was not wrapped in DistributedDataParallel, or the "
                           "record is not DistributedAudit's)")
        elif [k for k in DDP_KEYS if k not in ddp]:
            missing.append(f"rank {r}: 'ddp' lacks {[k for k in DDP_KEYS if k not in ddp]}")
    if missing:
        return c(name, False, "nothing to check: " + "; ".join(missing))
    ddp = [rec["ddp"] for rec in recs]
    problems = []
    counts = [(len(d["reduced_per_batch"]), len(d["tokenizer_grad_outside_ddp_per_batch"]), len(rec["batches"]))
              for d, rec in zip(ddp, recs)]
    uneven = [(r, n) for r, n in enumerate(counts) if len(set(n)) != 1 or n[0] == 0]
    if uneven:
        problems.append(f"entries per batch (rank, (DDP, outside DDP, batches)) {uneven}")
    managed = [d["managed_elements"] for d in ddp]
    if any(m != d["tokenizer_elements"] for m, d in zip(managed, ddp)):
        problems.append(f"DDP manages {managed} elements, the tokenizer has {ddp[0]['tokenizer_elements']}")
    bad = [(r, i, n) for r, d in enumerate(ddp) for i, n in enumerate(d["reduced_per_batch"])
           if n != d["tokenizer_elements"]]
    if bad:
        problems.append(f"DDP reduced other than the tokenizer's gradients (rank, batch, elements) {bad[:4]}")
    twice = [(r, i, n) for r, d in enumerate(ddp) for i, n in enumerate(d["tokenizer_grad_outside_ddp_per_batch"])
             if n] + [(r, "between batches", d["tokenizer_grad_outside_ddp_between_batches"])
                      for r, d in enumerate(ddp) if d["tokenizer_grad_outside_ddp_between_batches"]]
    if twice:
        problems.append(f"tokenizer gradients also all-reduced outside DDP (rank, batch, elements) {twice[:4]}")
    return c(name, not problems,
             f"{ddp[0]['tokenizer_elements']} tokenizer gradient elements; DDP manages {managed}, reduced per batch "
             f"{ddp[0]['reduced_per_batch']}; outside DDP per batch: tokenizer gradients "
             f"{ddp[0]['tokenizer_grad_outside_ddp_per_batch']}, other (codebook statistics, discriminator "
             f"gradients, ...) {ddp[0]['other_outside_ddp_per_batch']}" + "".join(f"; {p}" for p in problems))


def check(run_dir: str, world: int, steps: list[int]) -> int:
    c = Checks()
    audit = os.path.join(run_dir, "audit")
    records = load_records(audit, world)
    expected_starts = [0, *steps[:-1]]
    c(
        "fits recorded",
        sorted(records) == expected_starts and all(all(recs) for recs in records.values()),
        f"fit calls starting at steps {sorted(records)} (expected {expected_starts}), {world} ranks each"
        if records
        else f"no audit records in {audit}",
    )
    for start, end in zip(expected_starts, steps):
        recs = records.get(start)
        if not recs or not all(recs):
            continue
        tag = f"fit {start}->{end}"
        # (a) disjoint data, equal batch counts
        counts = [len(r["batches"]) for r in recs]
        c(
            f"(a) equal batches/rank [{tag}]",
            len(set(counts)) == 1 and counts[0] > 0,
            f"batches per rank {counts}",
        )
        # (b) identical weights and buffers
        ends = [r["end_step"] for r in recs]
        c(
            f"(b) ranks stopped at the same step [{tag}]",
            len(set(ends)) == 1 and ends[0] == end,
            f"end steps {ends} (expected {end})",
        )
        ok, detail = compare_states([r["state_path"] for r in recs])
        c(f"(b) identical parameters and buffers [{tag}]", ok, detail)
        # (d) what DDP reduced: each batch, once the tokenizer's gradients; and nobody else reduced them
        check_ddp(c, recs, tag)
    # (a) over all fits: a resumed fit re-enters its epoch, so merge the fits' batches by epoch
    complete = [recs for recs in records.values() if all(recs)]
    by_epoch: dict[int, list[set]] = {}
    for recs in complete:
        for r, rec in enumerate(recs):
            for epoch, _step, keys in rec["batches"]:
                by_epoch.setdefault(epoch, [set() for _ in range(world)])[r].update(keys)
    overlaps, total = [], 0
    for ep, keysets in sorted(by_epoch.items()):
        total += sum(map(len, keysets))
        for i in range(world):
            for j in range(i + 1, world):
                common = keysets[i] & keysets[j]
                if common:
                    overlaps.append(
                        f"epoch {ep}: ranks {i},{j} share {len(common)} keys e.g. {sorted(common)[:3]}"
                    )
    c(
        "(a) disjoint samples across ranks",
        bool(complete) and not overlaps and total > 0,
        "; ".join(overlaps)
        if overlaps
        else f"{total} distinct (rank, epoch, key) samples in epochs "
        f"{sorted(by_epoch)}; no key was read by two ranks in the same epoch",
    )
    # (c) resume: global step continued, final checkpoint at the last step
    if len(steps) > 1:
        recs = records.get(steps[-2])
        if recs and all(recs):
            first_steps = [r["batches"][0][1] if r["batches"] else None for r in recs]
            c(
                "(c) resumed fit continued the global step",
                all(s == steps[-2] for s in first_steps),
                f"first step of the resumed fit per rank {first_steps} (expected {steps[-2]})",
            )
        lasts = glob.glob(os.path.join(run_dir, "**", "last.ckpt"), recursive=True)
        if c("(c) last.ckpt exists", len(lasts) == 1, f"{lasts}"):
            ckpt = torch.load(lasts[0], map_location="cpu", weights_only=False)
            step = ckpt.get("global_step")
            c(
                "(c) final checkpoint step",
                step == steps[-1],
                f"global_step {step} in {lasts[0]} (expected {steps[-1]})",
            )
            if records.get(steps[-2]) and all(records[steps[-2]]):
                final = torch.load(records[steps[-2]][0]["state_path"], map_location="cpu", weights_only=True)
                sd = ckpt["state_dict"]
                same = [k for k in sd if f"param:{k}" in final or f"buffer:{k}" in final]
                diff = [
                    k
                    for k in same
                    if not torch.equal(sd[k], final.get(f"param:{k}", final.get(f"buffer:{k}")))
                ]
                c(
                    "(c) checkpoint holds the final weights",
                    bool(same) and not diff,
                    f"{len(same)} tensors compared, {len(diff)} differ {diff[:3]}",
                )
    if c.failed:
        print(f"MULTINODE SMOKE FAILED: {len(c.failed)} check(s) failed: " + ", ".join(c.failed))
        return 1
    print("MULTINODE SMOKE PASSED: all checks passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("shards")
    pi.add_argument("run_dir")
    pi.add_argument("--per-photo", type=int, default=12)
    pi.add_argument("--size", type=int, default=48)
    pi.add_argument("--num-shards", type=int, default=8)
    pc = sub.add_parser("check")
    pc.add_argument("run_dir")
    pc.add_argument("--world-size", type=int, default=2)
    pc.add_argument(
        "--steps", type=int, nargs="+", required=True, help="max_steps of each fit call, in order"
    )
    a = p.parse_args(argv)
    if a.cmd == "shards":
        from data import convert_shards

        images = os.path.join(a.run_dir, "images")
        n = make_images(images, a.per_photo, a.size)
        shard_size = -(-n // a.num_shards)
        print(f"{n} JPEG crops in {images} -> {a.num_shards} shards of <= {shard_size}")
        convert_shards.main(
            [
                "--src",
                images,
                "--out",
                os.path.join(a.run_dir, "shards"),
                "--split",
                "train",
                "--shard-size",
                str(shard_size),
                "--quiet",
            ]
        )
        return 0
    return check(a.run_dir, a.world_size, a.steps)


if __name__ == "__main__":
    sys.exit(main())
