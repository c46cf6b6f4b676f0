"""The `onedtok` command: encode -> decode reproduces tok.decode(tok.encode(x, k)) exactly, adaptive token files
decode each image from its own length, unreadable inputs are skipped and listed, and a token file refuses to
be decoded by another tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _small_training import SMALL
from PIL import Image

from data.photos import load_photo
from tokenizer import OneDTokenizer
from tokenizer.command import load_tokens, main
from tokenizer.images import eval_transform, read_image
from tokenizer.metrics import to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_256 = {**SMALL, "codebook_size": 256}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    return OneDTokenizer.from_preset("tiny", **SMALL_256).save_pretrained(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture
def images(tmp_path):
    """Real photographs in two folders (PNG and JPEG, different sizes), a corrupt JPEG and a non-image file."""
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "things").mkdir()
    for name, sub, fmt in (("chelsea", "cats", "png"), ("coffee", "things", "jpg"), ("astronaut", "things", "png")):
        arr = (load_photo(name).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(root / sub / f"{name}.{fmt}")
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def reference(tok: OneDTokenizer, paths: list[Path]) -> torch.Tensor:
    """What the library gives for these files: the eval transform, then encode."""
    transform = eval_transform(tok.image_size)
    return torch.stack([transform(read_image(str(p))) for p in paths])


def test_encode_decode_round_trip_equals_the_library(tokenizer_dir, images, tmp_path, capsys):
    tokens, out = tmp_path / "tokens.npz", tmp_path / "decoded"
    assert main(["encode", str(images), "--tokenizer", str(tokenizer_dir), "--num-tokens", "5", "--out",
                 str(tokens), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 file(s)" in err and "broken.jpg: unreadable image" in err
    ids, lengths, keys, header = load_tokens(tokens)
    assert keys == ["cats/chelsea.png", "things/astronaut.png", "things/coffee.jpg"]
    assert ids.shape == (3, 5) and lengths.tolist() == [5, 5, 5]
    assert [s["path"] for s in header["skipped"]] == [str(images / "cats" / "broken.jpg")]

    assert main(["decode", str(tokens), "--tokenizer", str(tokenizer_dir), "--out", str(out)]) == 0
    tok = OneDTokenizer.from_pretrained(tokenizer_dir)
    x = reference(tok, [images / k for k in keys])
    expected = to_uint8(tok.decode(tok.encode(x, 5)))
    for key, image in zip(keys, expected):
        png = torch.from_numpy(np.asarray(Image.open(out / Path(key).with_suffix(".png")))).permute(2, 0, 1)
        assert torch.equal(png, image), key

    assert main(["decode", str(tokens), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "k2"),
                 "--num-tokens", "2"]) == 0
    png = torch.from_numpy(np.asarray(Image.open(tmp_path / "k2" / "cats" / "chelsea.png"))).permute(2, 0, 1)
    assert torch.equal(png, to_uint8(tok.decode(tok.encode(x[:1], 2)))[0])


def test_adaptive_token_file_decodes_each_image_at_its_length(tokenizer_dir, images, tmp_path):
    tok = OneDTokenizer.from_pretrained(tokenizer_dir)
    files = [images / "cats" / "chelsea.png", images / "things" / "astronaut.png", images / "things" / "coffee.jpg"]
    x = reference(tok, files)
    target = float(torch.stack([
        10 * torch.log10(1 / (tok.decode(tok.encode(x, k)) - x).pow(2).mean()) for k in (1, 8)]).mean())
    tokens, out = tmp_path / "adaptive.npz", tmp_path / "decoded"
    main(["encode", *map(str, files), "--tokenizer", str(tokenizer_dir), "--min-psnr", f"{target:.2f}",
          "--out", str(tokens), "--quiet"])
    ids, lengths, keys, header = load_tokens(tokens)
    assert keys == ["chelsea.png", "astronaut.png", "coffee.jpg"] and header["target"]["min_psnr"] is not None
    expected_ids, expected_lengths = tok.encode_adaptive(x, min_psnr=float(f"{target:.2f}"))
    assert torch.equal(lengths, expected_lengths) and torch.equal(ids, expected_ids)
    main(["decode", str(tokens), "--tokenizer", str(tokenizer_dir), "--out", str(out)])
    for b, key in enumerate(keys):
        k = int(lengths[b])
        png = torch.from_numpy(np.asarray(Image.open(out / Path(key).with_suffix(".png")))).permute(2, 0, 1)
        assert torch.equal(png, to_uint8(tok.decode(ids[b : b + 1, :k]))[0]), key


def test_decode_with_another_tokenizer_is_refused(tokenizer_dir, images, tmp_path):
    tokens = tmp_path / "tokens.npz"
    main(["encode", str(images / "things"), "--tokenizer", str(tokenizer_dir), "--num-tokens", "3", "--out",
          str(tokens), "--quiet"])
    other = tmp_path / "other"
    shutil.copytree(tokenizer_dir, other)
    tok = OneDTokenizer.from_pretrained(other)
    with torch.no_grad():
        tok.decoder.to_pixels.weight.add_(0.01)  # same config, other weights
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="encoded by the tokenizer with weights sha256"):
        main(["decode", str(tokens), "--tokenizer", str(other), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_decode_refuses_keys_that_share_a_png_name(tokenizer_dir, images, tmp_path):
    """things/coffee.jpg and things/coffee.png both decode to things/coffee.png: refused before any file is
    written (it used to write one image and report two)."""
    shutil.copy(images / "cats" / "chelsea.png", images / "things" / "coffee.png")
    tokens = tmp_path / "tokens.npz"
    main(["encode", str(images / "things"), "--tokenizer", str(tokenizer_dir), "--num-tokens", "3", "--out",
          str(tokens), "--quiet"])
    with pytest.raises(ValueError, match=r"keys 'coffee.jpg' and 'coffee.png' would both decode to .*coffee.png"):
        main(["decode", str(tokens), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_bad_inputs_are_named(tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or folder"):
        main(["encode", str(tmp_path / "nowhere"), "--tokenizer", str(tokenizer_dir), "--num-tokens", "2",
              "--out", str(tmp_path / "t.npz")])
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 1 files could be read"):
        main(["encode", str(tmp_path / "bad.jpg"), "--tokenizer", str(tokenizer_dir), "--num-tokens", "2",
              "--out", str(tmp_path / "t.npz"), "--quiet"])
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.npz is not a readable onedtok-tokens/1 file"):
        main(["decode", str(tmp_path / "junk.npz"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"max_lpips must be in \(0, 1\]"):
        main(["encode", str(tmp_path), "--tokenizer", str(tokenizer_dir), "--max-lpips", "3", "--out", "x.npz"])


def test_info_and_the_installed_command(tokenizer_dir):
    exe = Path(sys.executable).with_name("onedtok")
    assert exe.is_file(), "`pip install -e .` installs the onedtok command ([project.scripts])"
    done = subprocess.run([str(exe), "info", str(tokenizer_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    tok = OneDTokenizer.from_pretrained(tokenizer_dir)
    assert info["max_tokens (K)"] == 8 and info["codebook_size"] == 256 and info["image_size"] == 32
    assert info["parameters"]["total"] == sum(p.numel() for p in tok.parameters())


def test_encode_names_a_decompression_bomb_and_an_extreme_aspect_ratio(tokenizer_dir, tmp_path, capsys):
    """A 2e8-pixel PNG of 24 KB and PNGs of a few hundred bytes at 200000x1 and 20000x1 are skipped, each with its
    own reason in the token file and on stderr (the bomb used to be 'unreadable or not an image'); the 4000x300
    panorama is encoded."""
    from _data_helpers import make_odd_images

    make_odd_images(str(tmp_path / "odd"))
    tokens = tmp_path / "tokens.npz"
    assert main(["encode", str(tmp_path / "odd"), "--tokenizer", str(tokenizer_dir), "--num-tokens", "3", "--out",
                 str(tokens), "--quiet"]) == 0
    err = capsys.readouterr().err
    _, _, keys, header = load_tokens(tokens)
    assert keys == ["wide_4000x300.png"]
    reasons = {Path(s["path"]).name: s["reason"] for s in header["skipped"]}
    assert sorted(reasons) == ["bomb_20000x10000.png", "thin_200000x1.png", "thin_20000x1.png"]
    assert reasons["bomb_20000x10000.png"].startswith("decompression bomb (Image size (200000000 pixels)")
    assert reasons["thin_200000x1.png"].startswith("extreme aspect ratio 200000x1 ")
    assert reasons["thin_20000x1.png"].startswith("extreme aspect ratio 20000x1 ")
    assert "skipped 3 file(s)" in err and "thin_200000x1.png: extreme aspect ratio 200000x1" in err
