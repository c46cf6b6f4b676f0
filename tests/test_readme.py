"""The README's API example and its `onedtok` commands run as written (on a freshly saved tiny tokenizer instead
of the demo's, and on real photographs saved where the commands expect them)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from data.photos import load_photo
from tokenizer import OneDTokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## The API\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    OneDTokenizer.from_preset("tiny", enc_depth=1, dec_depth=1).save_pretrained(tmp_path / "checkpoints/demo/tokenizer")
    monkeypatch.chdir(tmp_path)
    scope = {"images": torch.rand(2, 3, 64, 64)}
    exec(compile(block, str(README), "exec"), scope)
    assert scope["ids"].shape == (2, 8) and scope["ids"].dtype == torch.int64
    assert scope["recon"].shape == (2, 3, 64, 64) and scope["recon_a"].shape == (2, 3, 64, 64)
    assert scope["adaptive"].lengths.shape == (2,)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_readme_onedtok_commands_run(tmp_path):
    """Every line of the README's `onedtok` block, run by the installed command in a folder holding what the lines
    name: the tokenizer at checkpoints/demo/tokenizer, photos/ and cat.jpg."""
    from PIL import Image

    text = README.read_text()
    block = re.search(r"The same from the shell.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert lines and all(line.startswith("onedtok ") for line in lines)
    OneDTokenizer.from_preset("tiny", enc_depth=1, dec_depth=1).save_pretrained(tmp_path / "checkpoints/demo/tokenizer")
    (tmp_path / "photos").mkdir()
    for name in ("coffee", "astronaut"):
        arr = (load_photo(name).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / "photos" / f"{name}.png")
    Image.fromarray(arr).save(tmp_path / "cat.jpg")
    exe = Path(sys.executable).with_name("onedtok")
    for line in lines:
        done = subprocess.run([str(exe), *shlex.split(line)[1:], *(["--quiet"] if " encode " in f" {line} " else [])],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (line, done.stderr[-2000:])
    assert sorted(p.name for p in (tmp_path / "decoded").iterdir()) == ["astronaut.png", "coffee.png"]
