"""A tiny tokenizer trained for a few seconds on the embedded photographs, for tests that compare precisions.

A randomly initialised decoder outputs near-constant grey (std ~0.007), so fp32 vs bf16 comparisons of its
reconstructions would pass whatever bf16 did. 60 Adam steps of pixel MSE give image-dependent
reconstructions (per-image std ~20/255, PSNR ~18 dB on held-out crops) and an encoder that uses many codes,
in a few CPU seconds.
"""

from __future__ import annotations

import torch

from tokenizer import OneDTokenizer


def briefly_trained_tokenizer(steps: int = 60, seed: int = 0) -> OneDTokenizer:
    """Tiny preset (64 px, K=32, 1024 codes, one encoder and one decoder block), eval mode, deterministic."""
    from data.sources import PhotoCrops

    torch.manual_seed(seed)
    tok = OneDTokenizer.from_preset("tiny", enc_depth=1, dec_depth=1, max_tokens=32)
    crops = PhotoCrops(tok.image_size, 128, seed=seed)  # training photographs only (tests use held-out ones)
    data = torch.stack([crops.crop(i) for i in range(len(crops))])  # [128, 3, 64, 64] in [0, 1]
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    full = torch.full((16,), tok.max_tokens)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: two threads on a shared 2-core machine are ~10x slower than one
    try:
        tok.train()
        for _ in range(steps):
            x = data[torch.randint(0, len(data), (16,), generator=g)]
            out = tok(x, lengths=full)
            loss = (out.recon - (x * 2 - 1)).pow(2).mean() + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return tok.eval().requires_grad_(False)
