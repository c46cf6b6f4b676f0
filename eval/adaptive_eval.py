"""The report's adaptive section: each image gets the fewest tokens that meet a quality target.

For each target (PSNR >= t dB, or LPIPS <= t), every image is encoded with ``tok.encode_adaptive`` (a batched
per-image bisection over k = 1..K, ``tokenizer/adaptive.py``; K where no k meets the target), decoded from its
own k tokens (``tok.decode(ids, lengths=...)``), quantised to uint8 and scored exactly like the fixed-k
reconstructions (``eval.recon_eval.image_metrics``; rFID against the same reference crops). Per target the
section gives the mean and median tokens per image, the fraction whose scored reconstruction meets the target,
the mean metrics, a histogram of the chosen k, and the fixed k at which the tokenizer's fixed-k curve reaches the
same mean quality (so the token savings at equal quality).

This is a second pass over the images, after the fixed-k pass: the default targets are placed along the range
that pass measured (25, 50 and 75 % of the way from the mean PSNR at the smallest evaluated k to that at the
largest), which is only known once it has run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from eval.gather import FidReference, broadcast_object, fids_against_reference, gather_rows
from eval.metrics import FeatureSet, LPIPSReference, lpips_model
from eval.recon_eval import FID_MAX_ROWS, Row, add_features, batches, image_metrics, uint8_reconstruction
from tokenizer.adaptive import check_targets
from tokenizer.precision import autocast

ADAPTIVE_FIELDS = ("psnr", "ssim", "lpips")  # per-image metrics of an adaptive reconstruction (image_metrics)
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)  # default PSNR targets: these fractions of the fixed-k range

PROTOCOL_ADAPTIVE = (
    "per image, the fewest tokens k in 1..K whose uint8 reconstruction meets the target (PSNR >= t dB or "
    "LPIPS <= t), found by tok.encode_adaptive (batched bisection; it assumes quality rises with k, and an image "
    "whose quality dips gets a k that meets the target while k - 1 does not), K where no k does; each image is "
    "then decoded from its own k tokens and scored like the fixed-k reconstructions. met: the fraction whose "
    "scored reconstruction meets the target. Fixed k at equal quality: where the tokenizer's fixed-k mean curve "
    "(the table) first reaches the adaptive mean of the target's metric, linear in log2 k between evaluated k; "
    "savings = that k / mean tokens. Fixed k for the same fraction met: the smallest evaluated k at which as "
    "many images meet the target with a fixed k (the comparison for a quality guarantee). bits: mean tokens "
    "* log2(V), the length itself not counted. Default "
    "targets: 25/50/75 % of the way from the mean PSNR at the smallest evaluated k to that at the largest, "
    "rounded to 0.1 dB"
)


@dataclass(frozen=True)
class Target:
    metric: str  # "psnr": at least `value` dB; "lpips": at most `value`
    value: float

    @property
    def name(self) -> str:
        return f"adaptive_{self.metric}@{self.value:g}"

    @property
    def label(self) -> str:
        return f"PSNR >= {self.value:g} dB" if self.metric == "psnr" else f"LPIPS <= {self.value:g}"

    def met(self, values: torch.Tensor) -> torch.Tensor:
        """Per-image metric values [N] -> bool [N]: the target is met."""
        return values >= self.value if self.metric == "psnr" else values <= self.value

    def search(self, tokenizer, images: torch.Tensor, lpips_fn):
        """tok.encode_adaptive of float images [b, 3, S, S] in [0, 1] for this target."""
        if self.metric == "psnr":
            return tokenizer.encode_adaptive(images, min_psnr=self.value)
        return tokenizer.encode_adaptive(images, max_lpips=self.value, lpips_model=lpips_fn)


def make_targets(min_psnr: list[float] | None, max_lpips: list[float] | None) -> list[Target]:
    """Targets from the command line (``--adaptive-psnr``, ``--adaptive-lpips``), each checked by
    ``tokenizer.adaptive.check_targets`` (its error names the bad value); sorted, duplicates dropped."""
    targets = []
    for value in min_psnr or []:
        check_targets(float(value), None)
        targets.append(Target("psnr", float(value)))
    for value in max_lpips or []:
        check_targets(None, float(value))
        targets.append(Target("lpips", float(value)))
    return sorted(set(targets), key=lambda t: (t.metric, t.value))


def default_targets(rows: list[Row] | None, accelerator) -> list[Target]:
    """PSNR targets spread over the range the fixed-k pass measured (DEFAULT_FRACTIONS of the way from the mean
    PSNR at the smallest evaluated k to the largest); [] with fewer than two evaluated k (no range, and no curve
    to match against). Decided on the main process (the only one with rows) and sent to all."""
    targets: list[Target] = []
    if accelerator.is_main_process:
        curve = sorted((r.num_tokens, r.psnr) for r in rows if r.method == "tokenizer" and math.isfinite(r.psnr))
        if len(curve) >= 2:
            lo, hi = curve[0][1], curve[-1][1]
            values = sorted({round(lo + f * (hi - lo), 1) for f in DEFAULT_FRACTIONS})
            targets = [Target("psnr", v) for v in values if 0 < v <= 100]  # check_targets' range
    return broadcast_object(accelerator, targets)


@torch.no_grad()
def evaluate_adaptive(accelerator, tokenizer, loader, total: int, targets: list[Target], fid: bool = True,
                      precision: str | None = None, fid_reference: FidReference | None = None):
    """The second pass, on every process. Returns (per_image, fids) on the main process, (None, None) elsewhere:
    per_image {"index": [N], "targets": [T] names, "lengths": int64 [N, T], "metrics": float64 [N, T, 3]
    (ADAPTIVE_FIELDS)}; fids {target name: rFID} ({} without fid). precision: the tokenizer's autocast, as in
    ``eval.recon_eval.evaluate``; the search's LPIPS (an LPIPS target) runs in fp32 like every metric.
    fid_reference: the fixed-k pass's reference features over the same images, reused (filled here if empty)."""
    from eval.metrics import load_fid_inception

    device = accelerator.device
    tokenizer = tokenizer.to(device).eval()
    names = [t.name for t in targets]
    inception = load_fid_inception(device) if fid else None
    need_reference = fid and (fid_reference is None or fid_reference.needed)
    feats = ({name: FeatureSet(FID_MAX_ROWS, device) for name in (["reference"] if need_reference else []) + names}
             if fid else {})  # fmt: skip
    lpips_net = lpips_model(device) if any(t.metric == "lpips" for t in targets) else None

    def lpips_fp32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast("fp32", x.device):
            return lpips_net(x.float(), y.float())

    indices, lengths_all, metrics = [], [], []
    for index, _, refs_dev in batches(accelerator, loader, total, "adaptive"):
        b = len(index)
        lpips_ref = LPIPSReference(refs_dev)
        if need_reference:
            add_features(feats["reference"], refs_dev, index, inception)
        lengths = torch.zeros(b, len(targets), dtype=torch.long)
        row = torch.zeros(b, len(targets), len(ADAPTIVE_FIELDS), dtype=torch.float64)
        for t, target in enumerate(targets):
            with autocast(precision, device):
                ids, chosen = target.search(tokenizer, refs_dev.float() / 255, lpips_fp32)  # [b, K], [b]
                # ids from the tokenizer, lengths in 1..K from its search: no value checks (host syncs)
                images = tokenizer.decode(ids, lengths=chosen, check_inputs=False)  # [b, 3, S, S], own prefixes
            rec = uint8_reconstruction(images.float(), f"adaptive target {target}")
            lengths[:, t] = chosen.cpu()
            row[:, t] = image_metrics(rec, refs_dev, lpips_ref)  # psnr, ssim, lpips
            if fid:
                add_features(feats[target.name], rec, index, inception)
        indices.append(index.long())
        lengths_all.append(lengths)
        metrics.append(row)

    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    lengths = torch.cat(lengths_all) if lengths_all else torch.zeros(0, len(targets), dtype=torch.long)
    per = torch.cat(metrics) if metrics else torch.zeros(0, len(targets), len(ADAPTIVE_FIELDS), dtype=torch.float64)
    index, (lengths, per) = gather_rows(accelerator, index, lengths, per)
    fids = fids_against_reference(accelerator, feats, names, len(index), reference=fid_reference) if fid else {}
    if not accelerator.is_main_process:
        return None, None
    return {"index": index.numpy(), "targets": np.array(names), "lengths": lengths.numpy(),
            "metrics": per.numpy()}, fids


def matched_k(curve: list[tuple[int, float]], quality: float, higher_is_better: bool = True):
    """(k, None) where the fixed-k curve [(k, mean quality)] (ascending k) first reaches `quality`, linear in
    log2 k between the evaluated k around it; (None, why) where no evaluated k range holds it: the first k is
    already better (the adaptive images are worse than the smallest fixed k), or no k gets there."""
    sign = 1.0 if higher_is_better else -1.0
    pts = [(k, sign * v) for k, v in curve if math.isfinite(v)]
    q = sign * quality
    for i, (k, v) in enumerate(pts):
        if v < q:
            continue
        if v == q:
            return float(k), None
        if i == 0:
            return None, f"worse than the smallest evaluated k = {k}"
        (k0, v0) = pts[i - 1]
        frac = (q - v0) / (v - v0)
        return 2 ** (math.log2(k0) + frac * (math.log2(k) - math.log2(k0))), None
    return None, f"better than every evaluated k (up to k = {pts[-1][0]})" if pts else "no fixed-k curve"


def guarantee_k(fixed: dict | None, target: Target, fraction: float) -> int | None:
    """The smallest evaluated fixed k at which at least `fraction` of the images meet `target` (from the fixed-k
    pass's per-image metrics): what a fixed token count must spend to give as many images the target quality.
    This, not the k at equal *mean* quality, is the comparison for a quality target: a per-image target evens
    out the worst images, a fixed k the average."""
    if fixed is None:
        return None
    col = list(fixed["fields"]).index(target.metric)
    ks = sorted(int(name.split("@")[1]) for name in fixed["settings"] if str(name).startswith("tokenizer@"))
    names = [str(n) for n in fixed["settings"]]
    for k in ks:
        values = torch.as_tensor(fixed["metrics"][:, names.index(f"tokenizer@{k}"), col])  # [N]
        if len(values) and float(target.met(values).double().mean()) >= fraction - 1e-12:
            return k
    return None


def summarize(per_image: dict, fids: dict[str, float], targets: list[Target], rows: list[Row], k_max: int,
              codebook_size: int, fixed_per_image: dict | None = None) -> list[dict]:
    """One JSON-able row per target (None where a number does not exist: no FID, no matching fixed k).
    k_histogram[k - 1]: images that chose k tokens (k = 1..K); median_tokens: the usual median (the mean of the
    two middle lengths for even N); unmet_at_k_max: images that miss the target and use all K tokens."""
    tok = sorted((r for r in rows if r.method == "tokenizer"), key=lambda r: r.num_tokens)
    out = []
    for t, target in enumerate(targets):
        lengths = torch.as_tensor(per_image["lengths"][:, t])  # [N]
        values = torch.as_tensor(per_image["metrics"][:, t])  # [N, 3]
        n = len(lengths)
        mean = values.mean(0).tolist() if n else [float("nan")] * len(ADAPTIVE_FIELDS)
        metric = dict(zip(ADAPTIVE_FIELDS, mean))
        mean_tokens = float(lengths.double().mean()) if n else float("nan")
        met = target.met(values[:, ADAPTIVE_FIELDS.index(target.metric)])  # [N] bool
        curve = [(r.num_tokens, getattr(r, target.metric)) for r in tok]
        k_eq, why = matched_k(curve, metric[target.metric], higher_is_better=target.metric == "psnr")
        out.append({
            "metric": target.metric, "target": target.value, "label": target.label, "num_images": n,
            "mean_tokens": mean_tokens, "median_tokens": float(np.median(lengths.numpy())) if n else None,
            "fraction_met": float(met.double().mean()) if n else None,
            "unmet_at_k_max": int((~met & (lengths == k_max)).sum()),  # nothing met it: the search gave K
            **metric, "rfid": fids.get(target.name),
            "bits_per_image": mean_tokens * math.log2(codebook_size),
            "matched_k": k_eq, "match_note": why,
            "savings": k_eq / mean_tokens if k_eq is not None and mean_tokens > 0 else None,
            "guarantee_k": (k_g := guarantee_k(fixed_per_image, target, float(met.double().mean()) if n else 1.0)),
            "guarantee_savings": k_g / mean_tokens if k_g is not None and mean_tokens > 0 else None,
            "k_histogram": torch.bincount(lengths.long() - 1, minlength=k_max).tolist() if n else [0] * k_max,
        })  # fmt: skip
    return out


def adaptive_section(accelerator, tokenizer, loader, total: int, rows: list[Row] | None,
                     targets: list[Target] | None, fid: bool = True, precision: str | None = None,
                     fixed_per_image: dict | None = None, fid_reference: FidReference | None = None):
    """The whole section, on every process: targets (None: ``default_targets`` from the fixed-k rows), the
    second pass and its summary. Returns (section, per-image arrays) on the main process, (None, None)
    elsewhere: section {"targets", "default_targets", "k_max", "rows"} (``summarize``), or {"skipped": why}
    when there is no target; per-image {"adaptive_targets": [T], "adaptive_lengths": [N, T],
    "adaptive_metrics": [N, T, 3]} for per_image.npz (same image order as the fixed-k arrays). fid_reference:
    the fixed-k pass's reference Inception features (``evaluate_adaptive``)."""
    given = targets is not None
    targets = targets if given else default_targets(rows, accelerator)
    if not targets:
        why = "no default target without a fixed-k range: evaluate at least two k, or give --adaptive-psnr"
        return ({"skipped": why}, None) if accelerator.is_main_process else (None, None)
    per, fids = evaluate_adaptive(accelerator, tokenizer, loader, total, targets, fid=fid, precision=precision,
                                   fid_reference=fid_reference)
    if not accelerator.is_main_process:
        return None, None
    section = {"targets": [t.label for t in targets], "default_targets": not given, "k_max": tokenizer.max_tokens,
               "rows": summarize(per, fids, targets, rows, tokenizer.max_tokens, tokenizer.codebook_size,
                                 fixed_per_image)}
    return section, {f"adaptive_{key}": per[key] for key in ("targets", "lengths", "metrics")}


__all__ = ["adaptive_section", "guarantee_k", "ADAPTIVE_FIELDS", "PROTOCOL_ADAPTIVE", "Target", "make_targets",
           "default_targets", "evaluate_adaptive", "matched_k", "summarize"]
