"""gFID at the field's protocol: the ADM reference-batch format, Inception Score and k-NN precision/recall on
synthetic features, and the one-command sweep over k and CFG scales (table + plot). A deterministic stub stands in
for the Inception network (tests/test_fid.py covers the real one)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval import gfid, gfid_sweep
from eval.fidelity import inception_score, knn_radii, precision_recall
from tokenizer import OneDTokenizer
from tokenizer.generator import GPT
from tokenizer.inception import feature_statistics

pytestmark = pytest.mark.usefixtures("one_thread")


def stub_features(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> 12-d features (channel means over a 2x2 grid)."""
    return torch.nn.functional.adaptive_avg_pool2d(images.double() / 255, 2).flatten(1)


def stub_with_logits(images: torch.Tensor) -> dict:
    pool = stub_features(images)
    return {"pool": pool, "logits": 20 * pool[:, :6]}  # 6 "classes"


def images(n: int, seed: int, size: int = 16, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.random((n, size, size, 3)) * 200 + shift, 0, 255).astype(np.uint8)


# ---- Inception Score ---------------------------------------------------------------------------------------
def test_inception_score_definition():
    assert inception_score(torch.zeros(50, 10)) == pytest.approx(1.0)  # every p(y|x) = p(y): no information
    confident = torch.full((40, 8), -1e4)
    confident[torch.arange(40), torch.arange(40) % 8] = 0  # one-hot, classes balanced
    assert inception_score(confident) == pytest.approx(8.0, rel=1e-6)
    assert inception_score(confident, split_size=8) == pytest.approx(8.0, rel=1e-6)  # each chunk of 8 balanced
    logits = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits.double(), 1).numpy()  # guided-diffusion's formula, written out
    ref = np.mean([np.exp(np.mean(np.sum(c * (np.log(c) - np.log(c.mean(0, keepdims=True))), 1)))
                   for c in (p[:20], p[20:])])  # fmt: skip
    assert inception_score(logits, split_size=20) == pytest.approx(ref, rel=1e-9)


# ---- precision / recall ------------------------------------------------------------------------------------
def test_knn_radii_brute_force():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = torch.cdist(x, x)
    expected = d.sort(dim=1).values[:, 3]  # column 0 is the point itself
    torch.testing.assert_close(knn_radii(x, k=3, block=7), expected)


def test_precision_recall_on_synthetic_manifolds():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(600, 6, generator=g)
    same = torch.randn(600, 6, generator=g)
    p, r = precision_recall(real, same, block=128)
    assert p > 0.7 and r > 0.7, (p, r)
    far = torch.randn(600, 6, generator=g) + 20
    assert precision_recall(real, far) == (0.0, 0.0)
    collapsed = 0.1 * torch.randn(600, 6, generator=g)  # realistic but not diverse: mode collapse
    p, r = precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.2, (p, r)
    spread = 3 * torch.randn(600, 6, generator=g)  # diverse but mostly unrealistic
    p, r = precision_recall(real, spread)
    assert p < 0.3 and r > 0.9, (p, r)
    with pytest.raises(ValueError, match=r"same D"):
        precision_recall(real, far[:, :5])


# ---- the ADM reference batch -------------------------------------------------------------------------------
def write_ref_batch(path, arr: np.ndarray, mu=None, sigma=None, with_images: bool = True):
    """guided-diffusion's reference-batch layout: arr_0 uint8 [N, H, W, 3], mu/sigma of the pool features and the
    spatial mu_s/sigma_s (unused by FID)."""
    if mu is None:
        feats = stub_features(torch.from_numpy(arr).permute(0, 3, 1, 2))  # [N, 12]
        mu, sigma = (t.numpy() for t in feature_statistics(feats))
    fields = dict(mu=mu, sigma=sigma, mu_s=np.zeros(4), sigma_s=np.eye(4))
    if with_images:
        fields["arr_0"] = arr
    np.savez(path, **fields)
    return path


def test_gfid_reads_the_adm_reference_batch(tmp_path):
    arr = images(40, seed=0)
    ref = write_ref_batch(tmp_path / "VIRTUAL_tiny_labeled.npz", arr)
    np.savez(tmp_path / "samples_k008.npz", arr_0=arr)
    np.savez(tmp_path / "samples_k016.npz", arr_0=images(40, seed=1, shift=50))
    out = tmp_path / "out"
    res = gfid.main(["--samples", str(tmp_path / "samples_k008.npz"), str(tmp_path / "samples_k016.npz"),
                     "--ref-batch", str(ref), "--out", str(out)], extractor=stub_features)  # fmt: skip
    rows = res["rows"]
    assert abs(rows[8]["fid"]) < 1e-6 < rows[16]["fid"]  # the file's own mu/sigma of the same images
    assert rows[8]["precision"] == rows[8]["recall"] == 1.0  # identical sets: every point inside its own ball
    assert rows[16]["precision"] < 1.0
    assert rows[8]["inception_score"] is None and "no logits layer" in (out / "gfid.md").read_text()
    assert "reference batch" in res["reference"] and "k = 3" in res["protocol"]
    assert json.loads((out / "gfid.json").read_text())["rows"]["16"]["recall"] == rows[16]["recall"]

    # mu/sigma are taken as given (not recomputed from arr_0); without images there is no precision/recall
    shifted = write_ref_batch(tmp_path / "stats_only.npz", arr, mu=np.full(12, 0.9), sigma=np.eye(12) * 1e-3,
                              with_images=False)  # fmt: skip
    res = gfid.main(["--samples", str(tmp_path / "samples_k008.npz"), "--ref-batch", str(shifted)],
                    extractor=stub_with_logits)  # fmt: skip
    row = res["rows"][8]
    assert row["fid"] > 1.0 and row["precision"] is None and row["recall"] is None
    assert row["inception_score"] > 1.0  # the extractor gives logits: IS is reported
    np.savez(tmp_path / "bad.npz", images=arr)
    with pytest.raises(ValueError, match=r"arr_0.*mu.*sigma.*\['images'\]"):
        gfid.main(["--samples", str(tmp_path / "samples_k008.npz"), "--ref-batch", str(tmp_path / "bad.npz")],
                  extractor=stub_features)  # fmt: skip


def test_folder_reference_is_the_eval_transformed_tree(tmp_path):
    """--ref-source folder: every readable image of the ImageFolder tree once, through the eval transform as
    uint8 (data.sources, the same images extraction encodes); --ref-num keeps the first N."""
    from _data_helpers import make_awkward_tree

    from data.folder import scan_image_folder
    from tokenizer.images import eval_transform, read_image

    root = tmp_path / "tree"
    special = make_awkward_tree(str(root))
    _, items = scan_image_folder(str(root))
    want = torch.stack([eval_transform(16, uint8=True)(read_image(str(root / rel))) for rel, _ in items
                        if rel != special["corrupt"]])  # fmt: skip
    got = torch.cat(list(gfid.folder_images(str(root), 16, batch_size=4)))
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert sum(len(b) for b in gfid.folder_images(str(root), 16, limit=3)) == 3
    res = gfid.main(["--samples", str(_npz(tmp_path, images(8, seed=0))), "--ref-source", "folder", "--ref-root",
                     str(root), "--image-size", "16"], extractor=stub_features)  # fmt: skip
    assert res["rows"][8]["num_samples"] == 8 and "folder" in res["reference"]


def _npz(tmp_path, arr: np.ndarray):
    path = tmp_path / "samples_k008.npz"
    np.savez(path, arr_0=arr)
    return path


# ---- the sweep command -------------------------------------------------------------------------------------
def test_sweep_writes_table_and_plot_and_resumes(tmp_path):
    torch.manual_seed(0)
    tok = OneDTokenizer.from_preset("tiny", enc_depth=1, dec_depth=1, max_tokens=8)
    tok.save_pretrained(tmp_path / "tok")
    GPT.from_preset("tiny", vocab_size=tok.codebook_size, max_tokens=8, num_classes=3, dim=32, depth=1,
                    heads=2).save_pretrained(str(tmp_path / "gpt"))  # fmt: skip
    ref = write_ref_batch(tmp_path / "ref.npz", images(12, seed=3, size=tok.image_size))
    out = tmp_path / "sweep"
    args = ["--gpt", str(tmp_path / "gpt"), "--tokenizer", str(tmp_path / "tok"), "--cpu", "--num-tokens", "2", "8",
            "--cfg-scales", "1.0", "2.0", "--num-samples", "6", "--batch-size", "4", "--ref-batch", str(ref),
            "--out", str(out), "--no-progress"]  # fmt: skip
    res = gfid_sweep.main(args, extractor=stub_features)
    assert set(res["rows"]) == {1.0, 2.0} and all(set(by_k) == {2, 8} for by_k in res["rows"].values())
    for by_k in res["rows"].values():
        for row in by_k.values():
            assert row["num_samples"] == 6 and row["fid"] > 0 and 0 <= row["precision"] <= 1
    table = (out / "sweep.md").read_text().splitlines()
    assert sum(line.startswith("| 2 | ") or line.startswith("| 1 | ") for line in table) == 4
    assert (out / "gfid_vs_k.png").stat().st_size > 1000
    assert json.loads((out / "sweep.json").read_text())["rows"]["2.0"]["8"]["num_samples"] == 6
    stamp = (out / "cfg2" / "samples_k008.npz").stat().st_mtime_ns
    again = gfid_sweep.main(args, extractor=stub_features)  # complete sample files are kept, not resampled
    assert (out / "cfg2" / "samples_k008.npz").stat().st_mtime_ns == stamp
    assert again["rows"][2.0][8]["fid"] == pytest.approx(res["rows"][2.0][8]["fid"])
