"""The README's API example runs as written (on a freshly saved tiny tokenizer instead of the demo's)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tokenizer import OneDTokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## The API in five lines\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    OneDTokenizer.from_preset("tiny", enc_depth=1, dec_depth=1).save_pretrained(tmp_path / "checkpoints/demo/tokenizer")
    monkeypatch.chdir(tmp_path)
    scope = {"images": torch.rand(2, 3, 64, 64)}
    exec(compile(block, str(README), "exec"), scope)
    assert scope["ids"].shape == (2, 8) and scope["ids"].dtype == torch.int64
    assert scope["recon"].shape == (2, 3, 64, 64)
    assert (tmp_path / "out" / "model.safetensors").is_file()
