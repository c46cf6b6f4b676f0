"""Make tests/data/released/: golden outputs of the REFERENCE TiTok / One-D-Piece code on deterministic weights.

Run once per family, each in its own process (both reference repos have a top-level package named `modeling`):

    PYTHONPATH=/work/refdeps python scripts/make_released_golden.py --reference-repo /path/to/bytedance+1d-tokenizer \
        --family titok-legacy --out tests/data/released/titok-legacy --write-config
    ... --family titok-vq --out tests/data/released/titok-vq --write-config          (same bytedance checkout)
    ... --reference-repo /path/to/turingmotors+One-D-Piece --family one-d-piece --out tests/data/released/one-d-piece

(/work/refdeps holds omegaconf and einops, installed outside the project with `pip install --target`.) Add
`--manifests tests/data/released/manifests` to also write the real-size manifests (keys and shapes of the released
checkpoints' architectures, built on the meta device) of the checkout's family.

For a family, the script builds the reference model from <out>/config.json (with --write-config it first writes that
config: the checkout's own yaml with the small-size fields of SMALL_OVERRIDES, as the reference's _save_pretrained
would), writes <out>/manifest.json (every state-dict key -> shape, dtype), strict-loads
tests/_golden_weights.reference_state_dict(manifest), runs two skimage photographs through the reference encode /
decode_tokens (eval, no_grad, fp32, CPU, one thread, TF32 off) and writes <out>/golden.npz. Running it twice gives the
same arrays. It prints diagnostics of the weight rule (attention peakedness, proxy-code softmax, recon spread).

Tests must not import this script: CI has no reference code. It runs on the reference code only to make the data.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _golden_weights import load_manifest, reference_state_dict  # noqa: E402

# family -> (reference yaml, relative to the checkout; vq_model overrides that make it small; reference class)
SMALL_OVERRIDES = {
    "titok-legacy": (
        "configs/infer/TiTok/titok_l32.yaml",
        {"vit_enc_model_size": "small", "vit_dec_model_size": "small", "num_latent_tokens": 8, "is_legacy": True},
        "titok",
    ),
    "titok-vq": (
        "configs/infer/TiTok/titok_bl64_vq8k.yaml",
        {"vit_enc_model_size": "small", "vit_dec_model_size": "small", "num_latent_tokens": 8},
        "titok",
    ),
    "one-d-piece": ("configs/one-d-piece_s256.yaml", {"num_latent_tokens": 8}, "one_d_piece"),
}
CROP = 64
# real-size variants: name -> (reference yaml, reference class)
REAL_SIZE = {
    "titok": {
        "titok-L-32": "configs/infer/TiTok/titok_l32.yaml",
        "titok-BL-64-VQ": "configs/infer/TiTok/titok_bl64_vq8k.yaml",
    },
    "one_d_piece": {"one-d-piece-S-256": "configs/one-d-piece_s256.yaml"},
}
IMAGES = ("astronaut", "coffee")
ONE_D_PIECE_LENGTHS = (1, 4, 8)


def reference_class(kind: str):
    if kind == "one_d_piece":
        from modeling.one_d_piece import OneDPiece

        return OneDPiece
    from modeling.titok import TiTok

    return TiTok


def load_yaml(repo: Path, rel: str) -> dict:
    from omegaconf import OmegaConf

    # as _save_pretrained writes it: OmegaConf.to_container without resolving interpolations
    return OmegaConf.to_container(OmegaConf.load(repo / rel))


def small_config(repo: Path, family: str) -> dict:
    rel, overrides, _ = SMALL_OVERRIDES[family]
    config = copy.deepcopy(load_yaml(repo, rel))
    config["model"]["vq_model"].update(overrides)
    config["dataset"]["preprocessing"]["crop_size"] = CROP
    if "resize_shorter_edge" in config["dataset"]["preprocessing"]:
        config["dataset"]["preprocessing"]["resize_shorter_edge"] = CROP
    if "length" in config.get("experiment", {}):  # One-D-Piece: the eval token count
        config["experiment"]["length"] = overrides["num_latent_tokens"]
    return config


def manifest_of(model: torch.nn.Module) -> dict:
    state = model.state_dict()
    return {
        k: {"shape": list(state[k].shape), "dtype": str(state[k].dtype).removeprefix("torch.")} for k in sorted(state)
    }


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4) + "\n")


def photographs() -> torch.Tensor:
    """[2, 3, 64, 64] float32 in [0, 1]: skimage photographs, centre-cropped to a square, PIL bicubic to 64."""
    import skimage.data
    from PIL import Image

    out = []
    for name in IMAGES:
        a = getattr(skimage.data, name)()  # [H, W, 3] uint8
        h, w = a.shape[:2]
        s = min(h, w)
        a = a[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        a = np.asarray(Image.fromarray(a).resize((CROP, CROP), Image.BICUBIC), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(a).permute(2, 0, 1))
    return torch.stack(out).contiguous()


def quantizer_distances(quantize, z: torch.Tensor) -> torch.Tensor:
    """[B*K, codebook] distances by the reference VectorQuantizer.forward's own formula, for z [B, C, 1, K]."""
    z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # 'b c h w -> (b h w) c'
    emb = quantize.embedding.weight
    if quantize.use_l2_norm:
        z_flat = torch.nn.functional.normalize(z_flat, dim=-1)
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return (
        torch.sum(z_flat**2, dim=1, keepdim=True)
        + torch.sum(emb**2, dim=1)
        - 2 * torch.einsum("bd,dn->bn", z_flat, emb.T)
    )


class AttentionProbe:
    """Forward pre-hook on the first block of a transformer: the softmax it computes, redone from its input."""

    def __init__(self, block):
        self.stats = None
        block.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x = module.ln_1(args[0])  # [L, B, D]
        attn = module.attn
        q, k, _ = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        L, B, D = x.shape
        h = attn.num_heads
        q = q.reshape(L, B * h, D // h).transpose(0, 1)
        k = k.reshape(L, B * h, D // h).transpose(0, 1)
        p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D // h), dim=-1)  # [B*h, L, L]
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        self.stats = {"L": L, "mean_max_prob": p.max(-1).values.mean().item(), "entropy": entropy.mean().item()}


def run_family(repo: Path, family: str, out: Path, write_config: bool) -> None:
    _, _, kind = SMALL_OVERRIDES[family]
    if write_config:
        write_json(out / "config.json", small_config(repo, family))
    config = json.loads((out / "config.json").read_text())
    model = reference_class(kind)(config).eval()
    manifest = manifest_of(model)
    write_json(out / "manifest.json", manifest)
    model.load_state_dict(reference_state_dict(load_manifest(out / "manifest.json")), strict=True)

    # Whether nn.MultiheadAttention takes its fused fast path (it needs batch_first=True; the reference uses LND).
    fast_calls = []
    native = torch._native_multi_head_attention

    def counting(*a, **kw):
        fast_calls.append(1)
        return native(*a, **kw)

    torch._native_multi_head_attention = counting
    probes = {
        "encoder": AttentionProbe(model.encoder.transformer[0]),
        "decoder": AttentionProbe(model.decoder.transformer[0]),
    }
    logits = {}
    if model.finetune_decoder:
        model.decoder.ffn.register_forward_hook(lambda m, a, o: logits.__setitem__("ffn", o))

    images = photographs()
    arrays = {"images": images.numpy()}
    with torch.no_grad():
        z = model.encoder(pixel_values=images, latent_tokens=model.latent_tokens)  # [B, C, 1, K]
        _, result = model.encode(images)
        ids = result["min_encoding_indices"].reshape(images.shape[0], -1)  # [B, K]
        d = quantizer_distances(model.quantize, z)
        two = d.topk(2, dim=1, largest=False).values
        if not torch.equal(d.argmin(1).reshape(ids.shape), ids):
            raise RuntimeError(f"{family}: argmin of the recomputed distances differs from the reference ids")
        arrays["ids"] = ids.to(torch.int64).numpy()
        arrays["margins"] = (two[:, 1] - two[:, 0]).reshape(ids.shape).float().numpy()
        arrays["z"] = z[:, :, 0, :].permute(0, 2, 1).float().numpy()  # [B, K, C]
        if kind == "one_d_piece":
            for k in ONE_D_PIECE_LENGTHS:
                arrays[f"recon_k{k}"] = model.decode_tokens(ids, length=k).float().numpy()
                # the same as decoding the first k ids (the reference truncates z_quantized to `length`); ids are
                # given as [B, 1, k] because decode_tokens squeezes dim 1, which would break [B, 1] for k = 1
                if not torch.equal(model.decode_tokens(ids[:, None, :k]), torch.from_numpy(arrays[f"recon_k{k}"])):
                    raise RuntimeError(f"{family}: decode_tokens(ids, length={k}) != decode_tokens(ids[:, :{k}])")
        else:
            arrays["recon"] = model.decode_tokens(ids).float().numpy()
    torch._native_multi_head_attention = native

    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "golden.npz", **arrays)

    print(f"== {family}: {len(manifest)} keys, {sum(math.prod(e['shape']) for e in manifest.values())} values")
    print(f"MHA fast path calls: {len(fast_calls)}")
    for where, probe in probes.items():
        s = probe.stats
        print(
            f"{where} block 0 attention: L={s['L']} mean max prob {s['mean_max_prob']:.3f}, "
            f"entropy {s['entropy']:.3f} vs log(L) {math.log(s['L']):.3f}"
        )
    if "ffn" in logits:
        p = logits["ffn"].softmax(1)  # [B, 1024, g, g]
        print(f"proxy-code softmax over 1024: mean max prob {p.max(1).values.mean().item():.3f}")
    m = arrays["margins"]
    print(f"ids {arrays['ids'].tolist()}")
    print(f"margins min {m.min():.4g} median {np.median(m):.4g} max {m.max():.4g}")
    print(f"z mean {arrays['z'].mean():.3f} std {arrays['z'].std():.3f}")
    for name, a in arrays.items():
        if name.startswith("recon"):
            finite = bool(np.isfinite(a).all())
            print(
                f"{name} {list(a.shape)} mean {a.mean():.3f} std {a.std():.3f} min {a.min():.3f} max {a.max():.3f} "
                f"finite {finite}"
            )


def run_real_size(repo: Path, kind: str, out: Path) -> None:
    for name, rel in REAL_SIZE[kind].items():
        config = load_yaml(repo, rel)
        with torch.device("meta"):
            model = reference_class(kind)(config)
        manifest = manifest_of(model)
        write_json(out / f"{name}.config.json", config)
        write_json(out / f"{name}.manifest.json", manifest)
        print(f"{name}: {len(manifest)} keys, {sum(math.prod(e['shape']) for e in manifest.values())} values")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference-repo", type=Path, required=True, help="a checkout of the reference code")
    parser.add_argument("--family", choices=sorted(SMALL_OVERRIDES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="tests/data/released/<family>")
    parser.add_argument("--write-config", action="store_true", help="(re)write <out>/config.json from the yaml")
    parser.add_argument("--manifests", type=Path, help="also write the real-size manifests of this family here")
    args = parser.parse_args()

    repo = args.reference_repo.resolve()
    sys.path.insert(0, str(repo))
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)  # the reference constructors draw random inits; every value is then overwritten
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    print(f"reference {repo.name} at {commit.strip()}, torch {torch.__version__}")
    run_family(repo, args.family, args.out, args.write_config)
    if args.manifests:
        run_real_size(repo, SMALL_OVERRIDES[args.family][2], args.manifests)


if __name__ == "__main__":
    main()
