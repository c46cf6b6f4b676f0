"""Generator -> tokenizer pipeline: sampled ids at every k decode; the sampling command's grid and exact-N npz
(one process and two); gFID logic with a stub feature extractor (FID of a set against its own stats ~ 0)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from eval import gfid
from eval.sample_generator import main as sample_main
from eval.sample_generator import merge_parts, sample_grid
from tokenizer import OneDTokenizer
from tokenizer.generator import GPT, generate
from tokenizer.length import powers_of_two_upto

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random tiny tokenizer (64 px, K=32, 1024 codes) and a random 1-block GPT over its ids, saved."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models")
    tok = OneDTokenizer.from_preset("tiny", enc_depth=1, dec_depth=1, max_tokens=32)
    tok.save_pretrained(d / "tok")
    gpt = GPT.from_preset("tiny", vocab_size=tok.codebook_size, max_tokens=tok.max_tokens,
                          num_classes=NUM_CLASSES, dim=32, depth=1, heads=2)  # fmt: skip
    gpt.save_pretrained(str(d / "gpt"))
    return tok.eval(), gpt.eval(), str(d / "tok"), str(d / "gpt")


def test_generated_ids_decode_at_every_k(models):
    tok, gpt, _, _ = models
    labels = torch.tensor([0, 2])
    for k in powers_of_two_upto(tok.max_tokens):  # 1, 2, 4, ..., 32
        ids = generate(gpt, labels, num_tokens=k, cfg_scale=2.0, top_k=50,
                       generator=torch.Generator().manual_seed(k))  # fmt: skip
        assert ids.shape == (2, k) and ids.dtype == torch.int64
        images = tok.decode(ids)
        assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1


def test_grid_prefixes_equal_sampling_k_tokens(models):
    """The grid decodes prefixes of one K_max sample: identical to sampling k tokens with the same seed."""
    tok, gpt, _, _ = models
    rows, row_labels = sample_grid(gpt, tok, [2, 8], [1, 2], seed=5, temperature=1.0)
    assert rows.shape == (2, 2, 3, 64, 64) and row_labels == [1, 2]
    from eval.sample_generator import sample_seed

    labels = torch.tensor([1, 2])
    short = generate(gpt, labels, num_tokens=2, generator=torch.Generator().manual_seed(sample_seed("grid", 5)))
    torch.testing.assert_close(rows[:, 0], tok.decode(short))


def test_sample_command_writes_grid_and_exact_npz(models, tmp_path):
    tok, gpt, tok_dir, gpt_dir = models
    out = tmp_path / "samples"
    args = ["--gpt", gpt_dir, "--tokenizer", tok_dir, "--out", str(out), "--cpu", "--num-tokens", "1", "4",
            "32", "--num-samples", "5", "--batch-size", "2", "--format", "both", "--cfg-scale", "1.5",
            "--top-p", "0.9", "--no-progress"]  # fmt: skip
    written = sample_main(args)
    grid = Image.open(out / "grid.png")
    # rows = 3 classes, columns = 3 token counts; 64 px tiles with 2 px padding, saved at 2x
    assert grid.size == (2 * (3 * 66 + 2), 2 * (3 * 66 + 2))
    for k in (1, 4, 32):
        with np.load(out / f"samples_k{k:03d}.npz") as z:
            assert z["arr_0"].shape == (5, 64, 64, 3) and z["arr_0"].dtype == np.uint8
            np.testing.assert_array_equal(z["arr_1"], np.arange(5) % NUM_CLASSES)
            arr = z["arr_0"]
        pngs = sorted(os.listdir(out / f"k{k:03d}"))
        assert pngs == [f"{i:06d}.png" for i in range(5)]
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"k{k:03d}" / "000003.png")), arr[3])
    assert not (out / ".parts").exists()
    assert json.loads((out / "sampling.json").read_text())["num_samples"] == 5
    assert written["samples"][32].endswith("samples_k032.npz")


def test_merge_parts_refuses_missing_or_duplicate(tmp_path):
    a = tmp_path / "a.npz"
    np.savez(a, arr=np.zeros((2, 4, 4, 3), np.uint8), idx=np.array([0, 1]), labels=np.array([0, 1]))
    b = tmp_path / "b.npz"
    np.savez(b, arr=np.zeros((2, 4, 4, 3), np.uint8), idx=np.array([1, 2]), labels=np.array([1, 2]))
    with pytest.raises(RuntimeError, match="not exactly"):
        merge_parts([str(a), str(b)], tmp_path / "m.npz", 4)


@pytest.mark.slow
def test_sample_command_two_processes_exact_n(models, tmp_path):
    """2 CPU processes (torchrun, as accelerate's multi-process launchers): N=5 over chunks of 2 -> 3 chunks
    split 2/1; the merged npz holds exactly N, equal to the single-process result (seeding per chunk)."""
    _, _, tok_dir, gpt_dir = models
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--gpt", gpt_dir, "--tokenizer", tok_dir, "--num-tokens", "2", "8", "--num-samples", "5",
            "--batch-size", "2", "--no-grid", "--no-progress"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", "eval.sample_generator", *args,
           "--out", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sample_main([*args, "--out", str(tmp_path / "one"), "--cpu"])
    for k in (2, 8):
        with np.load(tmp_path / "two" / f"samples_k{k:03d}.npz") as two, \
                np.load(tmp_path / "one" / f"samples_k{k:03d}.npz") as one:  # fmt: skip
            assert two["arr_0"].shape == (5, 64, 64, 3)
            np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
            np.testing.assert_array_equal(two["arr_1"], one["arr_1"])


# ---- gFID -------------------------------------------------------------------------------------------------
def stub_features(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> 12-d features (channel means over a 2x2 grid): a deterministic stand-in for the
    Inception network (tests only)."""
    x = images.double() / 255
    return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def _images_npz(path, seed: int, n: int = 40, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.random((n, 16, 16, 3)) * 200 + shift, 0, 255).astype(np.uint8)
    np.savez(path, arr_0=arr)
    return path


def test_gfid_against_own_stats_is_zero(tmp_path):
    a = _images_npz(tmp_path / "samples_k004.npz", seed=0)
    stats = tmp_path / "ref.npz"
    res = gfid.main(["--ref-npz", str(a), "--save-ref-stats", str(stats)], extractor=stub_features)
    assert res["rows"] == {} and stats.exists()

    same = gfid.main(["--samples", str(a), "--ref-stats", str(stats), "--out", str(tmp_path / "o")],
                     extractor=stub_features)  # fmt: skip
    assert same["rows"][4]["num_samples"] == 40
    assert abs(same["rows"][4]["fid"]) < 1e-6
    assert json.loads((tmp_path / "o" / "gfid.json").read_text())["rows"]["4"]["fid"] < 1e-6

    b = _images_npz(tmp_path / "samples_k008.npz", seed=1)  # same distribution, other draws: small
    c = _images_npz(tmp_path / "samples_k016.npz", seed=2, shift=50)  # brighter: larger
    res = gfid.main(["--samples", str(a), str(b), str(c), "--ref-stats", str(stats)], extractor=stub_features)
    fids = {k: r["fid"] for k, r in res["rows"].items()}
    assert fids[4] < 1e-6 < fids[8] < fids[16]
    mu, sigma = gfid.load_stats(stats)
    assert mu.shape == (12,) and sigma.shape == (12, 12)


def test_gfid_reference_from_sample_crops(tmp_path):
    """--ref-source photos: crops of the embedded photographs at the sample size; the reference path runs."""
    a = _images_npz(tmp_path / "samples_k002.npz", seed=0)
    args = ["--samples", str(a), "--ref-source", "photos", "--ref-num", "20"]
    res = gfid.main(args, extractor=stub_features)
    assert "20 embedded training-photo crops at 16px" in res["reference"]
    assert res["rows"][2]["fid"] > 0
