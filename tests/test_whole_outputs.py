"""Outputs of several files are written as a whole (issue 25, finding 11): a report rewrite that fails (a full disk,
for real: RLIMIT_FSIZE) leaves the previous report as it was, not new metrics beside old figures of another k list;
a rewrite that succeeds leaves no file of the previous run (a codec grid it did not write); a sampling run with other
k leaves no sample set of the previous one; a directory holding files the tool did not write is refused, and
nothing of it is deleted."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _disk_full import run_with_file_size_limit
from _small_training import SMALL

from tokenizer import OneDTokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
pytestmark = pytest.mark.usefixtures("one_thread")


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_atomic_directory_replaces_its_own_files_as_a_set_and_keeps_the_rest(tmp_path):
    from tokenizer.atomic import atomic_directory

    out = tmp_path / "report"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    (out / "grid_k64.png").write_text("old, of another k list")  # ours, not written again: must go
    (out / "notes.txt").write_text("the user's")  # not ours: must stay
    os.chmod(out, 0o750)
    owned = lambda name: name != "notes.txt"  # noqa: E731
    with atomic_directory(out, owned) as staging:
        assert staging.parent == tmp_path and staging != out
        (staging / "metrics.json").write_text("new")
        assert files(out) == {"grid_k64.png": b"old, of another k list", "metrics.json": b"old",
                              "notes.txt": b"the user's"}  # untouched until the block ends
    assert files(out) == {"metrics.json": b"new", "notes.txt": b"the user's"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # the directory keeps its permissions
    assert os.listdir(tmp_path) == ["report"]  # no staging or replaced directory left

    with pytest.raises(RuntimeError, match="interrupted"), atomic_directory(out, owned) as staging:
        (staging / "metrics.json").write_text("newer, never complete")
        raise RuntimeError("interrupted")
    assert files(out) == {"metrics.json": b"new", "notes.txt": b"the user's"}
    assert os.listdir(tmp_path) == ["report"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return OneDTokenizer.from_preset("tiny", **SMALL).save_pretrained(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.mark.slow
def test_report_rewrite_on_a_full_disk_leaves_the_previous_report_whole(tok_dir, tmp_path):
    out = tmp_path / "report"

    def report(*flags: str, limit: int | None = None):
        args = [sys.executable, "-m", "eval.reconstruction", "--tokenizer", str(tok_dir), "--out", str(out),
                "--no-fid", "--no-adaptive", "--cpu", "--num-workers", "0", "--val-crops-per-scale", "1", *flags]
        return run_with_file_size_limit(args, limit or 1 << 40, cwd=REPO, env=ENV, timeout=600)

    first = report("--num-tokens", "1", "2", "4", "8", "--codecs", "jpeg")
    assert first.returncode == 0, first.stderr[-3000:]
    before = files(out)
    assert "reconstructions_jpeg.png" in before

    # the rewrite (another k list, no codec) has room for its tables (a few KB) but not for its figures
    failed = report("--num-tokens", "1", "2", "--codecs", limit=16384)
    assert sorted(files(out)) == sorted(before)
    assert files(out)["metrics.json"] == before["metrics.json"]  # not new metrics beside the old figures
    assert files(out) == before  # byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # and no half-written staging directory
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"eval.reconstruction: error: {out}: disk full (no space left) while writing "), line
    assert "the previous report is intact" in line

    again = report("--num-tokens", "1", "2", "--codecs")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["meta"]["num_tokens"] == [1, 2]
    assert "reconstructions_jpeg.png" not in files(out)  # the previous run's codec grid is not left beside it


def test_report_refuses_an_out_with_other_files_before_evaluating(tok_dir, tmp_path):
    from eval.reconstruction import main as report_main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds files that the report does not write \(notes\.txt\).*nothing was "
                                         r"deleted"):  # fmt: skip
        report_main(["--tokenizer", str(tok_dir), "--out", str(out), "--no-fid", "--cpu"])
    assert files(out) == {"notes.txt": b"keep me"}


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from tokenizer.generator import GPT

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gen")
    tok = OneDTokenizer.from_preset("tiny", **SMALL)
    tok.save_pretrained(d / "tok")
    GPT.from_preset("tiny", vocab_size=tok.codebook_size, max_tokens=tok.max_tokens, num_classes=2, dim=32, depth=1,
                    heads=2).save_pretrained(str(d / "gpt"))  # fmt: skip
    return ["--gpt", str(d / "gpt"), "--tokenizer", str(d / "tok"), "--cpu", "--no-progress", "--num-samples", "2"]


def test_sampling_again_with_other_k_leaves_no_set_of_the_previous_run(generator, tmp_path):
    from eval import gfid
    from eval.sample_generator import main as sample_main

    out = tmp_path / "samples"
    sample_main([*generator, "--out", str(out), "--num-tokens", "1", "4", "--format", "both"])
    assert {"samples_k001.npz", "samples_k004.npz", "k004", "grid.png"} <= set(os.listdir(out))
    written = sample_main([*generator, "--out", str(out), "--num-tokens", "2", "--no-grid"])
    assert sorted(os.listdir(out)) == ["lengths.md", "samples_k002.npz", "sampling.json"]  # nothing of k = 1, 4
    assert written["samples"] == {2: str(out / "samples_k002.npz")}  # where the set is, not where it was written
    assert json.loads((out / "sampling.json").read_text())["samples"] == {"2": str(out / "samples_k002.npz")}

    # gFID of existing sets writes its two files beside them and keeps the sets
    stub = lambda x: torch.nn.functional.adaptive_avg_pool2d(x.double() / 255, 2).flatten(1)  # noqa: E731
    np.savez(tmp_path / "ref.npz", arr_0=np.load(out / "samples_k002.npz")["arr_0"])
    gfid.main(["--samples", str(out / "samples_k002.npz"), "--ref-npz", str(tmp_path / "ref.npz"),
               "--no-precision-recall", "--out", str(out)], extractor=stub)  # fmt: skip
    assert sorted(os.listdir(out)) == ["gfid.json", "gfid.md", "lengths.md", "samples_k002.npz", "sampling.json"]

    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds files that eval.sample_generator does not write \(notes\.txt\)"):
        sample_main([*generator, "--out", str(out), "--num-tokens", "2"])
    assert (out / "notes.txt").read_text() == "keep me" and (out / "samples_k002.npz").exists()
