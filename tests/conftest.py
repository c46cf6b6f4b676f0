"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread than on two contended ones (shared 2-core CI machines). Use it per
    module: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    """A random tiny tokenizer (64 px, K = 32, 1024 codes, one block each side), saved; its directory."""
    from tokenizer import OneDTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    OneDTokenizer.from_preset("tiny", enc_depth=1, dec_depth=1, max_tokens=32).save_pretrained(path)
    return str(path)
