"""Released TiTok / One-D-Piece weights: the converter equals the reference code, and refuses what it cannot convert.

No reference code and no released weights at test time: tests/data/released holds, per family, the reference
config, the key/shape manifest and the reference model's outputs (golden.npz) on weights that
tests/_golden_weights.py redoes from the manifest alone (tests/data/released/README.md says how they were made).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

import numpy as np
import pytest
import torch
from _golden_weights import load_manifest, reference_state_dict

from tokenizer import OneDTokenizer
from tokenizer.released import convert, convert_state, read_snapshot
from tokenizer.vqgan_decoder import ResidualBlock

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "released")
FAMILY = {"titok-legacy": "titok", "titok-vq": "titok", "one-d-piece": "one-d-piece"}
RECON_TOLERANCE = 1e-4  # fp32, max abs over every pixel
NEAR_TIE = 1e-4  # a reference top-2 distance margin below this may flip on another machine's kernels


def reference(name: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """(reference config, reference state dict, golden arrays) of a family folder."""
    folder = os.path.join(DATA, name)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with np.load(os.path.join(folder, "golden.npz")) as z:
        golden = {k: z[k] for k in z.files}
    return config, reference_state_dict(load_manifest(os.path.join(folder, "manifest.json"))), golden


@pytest.fixture(scope="module")
def converted():
    """name -> (converted model, golden arrays), built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            config, state, golden = reference(name)
            cache[name] = (convert_state(FAMILY[name], config, state, name), golden)
        return cache[name]

    return get


def golden_errors(model: OneDTokenizer, golden: dict[str, np.ndarray]) -> tuple[int, float]:
    """(ids that differ from the reference outside near-ties, max abs difference of the reconstructions decoded
    from the reference ids, over every stored k)."""
    images = torch.from_numpy(golden["images"])
    ids = model.encode(images)
    wrong = int(((ids.numpy() != golden["ids"]) & (golden["margins"] >= NEAR_TIE)).sum())
    ref_ids = torch.from_numpy(golden["ids"])
    worst = 0.0
    with torch.no_grad():
        codes = model.quantizer.codes_from_ids(ref_ids)  # [B, K, D]
        for key in (k for k in golden if k.startswith("recon")):
            k = int(key.split("_k")[1]) if "_k" in key else ref_ids.shape[1]
            out = model.decoder(codes[:, :k])  # [B, 3, H, W] in the model's [0, 1] range, unclamped as the reference
            worst = max(worst, (out - torch.from_numpy(golden[key])).abs().max().item())
    return wrong, worst


# ---- structure: the real-size key layouts, on the meta device ----------------------------------------------------
@pytest.mark.parametrize("variant", ["titok-L-32", "titok-BL-64-VQ", "one-d-piece-S-256"])
def test_real_size_key_manifests_map_strictly_both_ways(variant):
    """Every reference key consumed once, every project key produced once with its shape: on `meta`, nothing is
    allocated (the 641 M-parameter L-32 included)."""
    folder = os.path.join(DATA, "manifests")
    manifest = load_manifest(os.path.join(folder, f"{variant}.manifest.json"))
    with open(os.path.join(folder, f"{variant}.config.json")) as f:
        config = json.load(f)
    state = {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta") for k, v in manifest.items()}
    start = time.perf_counter()
    family = "one-d-piece" if variant.startswith("one-d-piece") else "titok"
    model = convert_state(family, config, state, variant, device="meta")
    elapsed = time.perf_counter() - start
    assert all(p.is_meta for p in model.parameters())
    print(f"{variant}: {len(manifest)} reference keys -> {len(model.state_dict())} project keys in {elapsed:.2f} s")


# ---- golden numbers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["titok-legacy", "titok-vq", "one-d-piece"])
def test_converted_model_equals_the_reference(converted, name):
    model, golden = converted(name)
    wrong, worst = golden_errors(model, golden)
    print(f"{name}: ids off (outside near-ties) {wrong}, max |recon - reference| {worst:.2e}")
    assert wrong == 0
    assert worst < RECON_TOLERANCE


def test_public_decode_is_the_reference_reconstruction_clamped(converted):
    """decode() returns [0, 1] images: the reference output (already in [0, 1] space) clamped, at every k."""
    model, golden = converted("one-d-piece")
    ids = torch.from_numpy(golden["ids"])
    for k in (1, 4, 8):
        expected = torch.from_numpy(golden[f"recon_k{k}"]).clamp(0, 1)
        torch.testing.assert_close(model.decode(ids[:, :k]), expected, atol=RECON_TOLERANCE, rtol=0)
    assert model.config.length_mechanism == "tail_token_drop"
    assert converted("titok-legacy")[0].config.length_mechanism == "fixed"


def _drop_class_tokens(m):
    m.encoder.class_token = m.decoder.class_token = None


def _drop_pre_norms(m):
    m.encoder.pre_norm = m.decoder.pre_norm = None


def _hard_codes(m):
    head = m.decoder.vqgan.code_head  # argmax of the proxy-code logits instead of the softmax-weighted code
    head.forward = lambda p: head.codebook[head.logits(torch.tanh(head.hidden(p))).argmax(-1)]


def _no_output_shortcut(m):
    for block in m.modules():  # h instead of h + shortcut(h) where the channels change
        if isinstance(block, ResidualBlock) and block.shortcut is not None:
            block.shortcut.weight.data.zero_()


def _set(field, value):
    def apply(m):
        setattr(m.config, field, value)  # the encoder and decoder read the same config object

    return apply


def _cosine_lookup(m):
    swapped = OneDTokenizer(dataclasses.replace(m.config, vq_distance="cosine"))
    swapped.load_state_dict(m.state_dict())
    m.quantizer = swapped.quantizer


QUIRKS = {
    "pixel_range": ("titok-legacy", _set("pixel_range", "[-1, 1]")),
    "class_token": ("titok-legacy", _drop_class_tokens),
    "pre_norm": ("titok-legacy", _drop_pre_norms),
    "legacy_token_layout": ("titok-legacy", _set("legacy_token_layout", False)),
    "legacy_token_layout (One-D-Piece)": ("one-d-piece", _set("legacy_token_layout", False)),
    "soft proxy codes": ("titok-legacy", _hard_codes),
    "shortcut on the block output": ("titok-legacy", _no_output_shortcut),
    "vq_distance euclidean": ("titok-vq", _cosine_lookup),
    "decoder_conv_residual false": ("titok-vq", _set("decoder_conv_residual", True)),
}


@pytest.mark.slow
@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_each_quirk_switched_off_alone_fails_the_golden_test(converted, quirk):
    """The golden comparison sees every quirk: with any one of them undone, ids or reconstructions differ by far
    more than the tolerance. (MaskGIT's GroupNorm eps, 1e-6 instead of 1e-5, is reproduced too but moves these
    reconstructions by only ~1.2e-4, too close to the tolerance to test reliably on every machine.)"""
    name, undo = QUIRKS[quirk]
    model, golden = converted(name)
    model = copy.deepcopy(model)
    undo(model)
    wrong, worst = golden_errors(model, golden)
    print(f"{quirk}: ids off {wrong}, max |recon - reference| {worst:.3g}")
    assert wrong > 0 or worst > 100 * RECON_TOLERANCE


# ---- refusals: each names the file or key and says what to do ------------------------------------------------
def _refusal(family, config, state, match):
    with pytest.raises(ValueError, match=match):
        convert_state(family, config, state, "ckpt", device="meta")


def _meta(state):
    return {k: torch.empty(v.shape, device="meta") for k, v in state.items()}


@pytest.fixture(scope="module")
def legacy_meta():
    config, _, _ = reference("titok-legacy")
    manifest = load_manifest(os.path.join(DATA, "titok-legacy", "manifest.json"))
    return config, {k: torch.empty(v["shape"], device="meta") for k, v in manifest.items()}


def test_wrong_family_is_refused(legacy_meta):
    config, state = legacy_meta
    _refusal("titok", {**config, "model": {**config["model"], "type": "one_d_piece"}}, state, "one-d-piece model")
    vq_config, vq_state, _ = reference("titok-vq")
    _refusal("one-d-piece", vq_config, _meta(vq_state), "single-stage")


def test_missing_and_extra_keys_are_named(legacy_meta):
    config, state = legacy_meta
    missing = {k: v for k, v in state.items() if k != "decoder.transformer.3.mlp.c_fc.weight"}
    _refusal("titok", config, missing, r"no place|does not match|missing")
    _refusal("titok", config, {**state, "decoder.extra.weight": torch.empty(2, device="meta")}, "decoder.extra.weight")
    without_latents = {k: v for k, v in state.items() if k != "latent_tokens"}
    _refusal("titok", config, without_latents, "latent_tokens")


def test_continuous_text_conditioned_and_stage1_checkpoints_are_refused(legacy_meta):
    config, state = legacy_meta
    vq = config["model"]["vq_model"]
    vae = {**config, "model": {**config["model"], "vq_model": {**vq, "quantize_mode": "vae"}}}
    _refusal("titok", vae, state, "continuous")
    _refusal("titok", config, {k: v for k, v in state.items() if not k.startswith("quantize.")}, "continuous")
    _refusal("titok", config, {**state, "decoder.text_guidance_proj.weight": torch.empty(2, device="meta")},
             "TA-TiTok")  # fmt: skip
    stage1 = {k: v for k, v in state.items() if not k.startswith(("pixel_decoder.", "pixel_quantize."))}
    _refusal("titok", config, stage1, "stage-1")
    stage1_config = {**config, "model": {**config["model"], "vq_model": {**vq, "finetune_decoder": False}}}
    _refusal("titok", stage1_config, state, "stage-1")
    vqgan = {"encoder.conv_in.weight": state["pixel_decoder.conv_in.weight"],
             "decoder.conv_in.weight": state["pixel_decoder.conv_in.weight"],
             "quantize.embedding.weight": state["pixel_quantize.embedding.weight"]}  # fmt: skip
    _refusal("titok", config, vqgan, "MaskGIT-VQGAN")


def _snapshot(folder, name, fmt="safetensors"):
    """Write the golden reference weights of family `name` as a hub-style snapshot folder."""
    config, state, _ = reference(name)
    os.makedirs(folder, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, os.path.join(folder, "model.safetensors"))
    else:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def test_truncated_file_no_config_and_offline_hub_id_are_clear_errors(tmp_path, monkeypatch):
    folder = _snapshot(str(tmp_path / "snap"), "titok-vq", fmt="bin")
    weights = os.path.join(folder, "pytorch_model.bin")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match=r"pytorch_model.bin cannot be read.*truncated"):
        read_snapshot(folder)
    bare = _snapshot(str(tmp_path / "bare"), "titok-vq")
    os.remove(os.path.join(bare, "config.json"))
    with pytest.raises(ValueError, match="--variant"):
        convert("titok", bare, str(tmp_path / "out"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to find offline
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        convert("titok", "nobody/no-such-tokenizer", str(tmp_path / "out2"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert("titok", str(tmp_path / "nowhere" / "x"), str(tmp_path / "out3"))


# ---- the command and every tool downstream -------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_d_piece_dir(tmp_path_factory):
    """`onedtok convert one-d-piece` of the golden One-D-Piece snapshot (pytorch_model.bin, weights_only)."""
    from tokenizer.command import main

    root = tmp_path_factory.mktemp("odp")
    snap = _snapshot(str(root / "snapshot"), "one-d-piece", fmt="bin")
    out = str(root / "converted")
    assert main(["convert", "one-d-piece", snap, "--out", out]) == 0
    return out


def test_convert_command_records_provenance_and_info_shows_it(one_d_piece_dir, capsys):
    from tokenizer.command import main
    from tokenizer.released.source import file_sha256

    capsys.readouterr()
    main(["info", one_d_piece_dir])
    info = json.loads(capsys.readouterr().out)
    source = info["provenance"]["converted_from"]
    assert source["family"] == "one-d-piece" and "Apache-2.0" in source["licence"]
    snap = os.path.join(os.path.dirname(one_d_piece_dir), "snapshot")
    assert source["files_sha256"]["pytorch_model.bin"] == file_sha256(os.path.join(snap, "pytorch_model.bin"))
    assert info["length_mechanism"] == "tail_token_drop" and info["max_tokens (K)"] == 8


@pytest.mark.slow
def test_converted_model_through_encode_decode_and_adaptive(one_d_piece_dir, tmp_path):
    from PIL import Image

    from tokenizer.command import load_tokens, main

    _, _, golden = reference("one-d-piece")
    images = (golden["images"].transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    main(["encode", str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--tokenizer", one_d_piece_dir,
          "--num-tokens", "4", "--out", str(tmp_path / "t.npz"), "--quiet", "--device", "cpu"])  # fmt: skip
    ids, lengths, keys, _ = load_tokens(tmp_path / "t.npz")
    assert ids.shape == (2, 4) and lengths.tolist() == [4, 4]
    main(["decode", str(tmp_path / "t.npz"), "--tokenizer", one_d_piece_dir, "--out", str(tmp_path / "png"),
          "--device", "cpu"])  # fmt: skip
    assert sorted(os.listdir(tmp_path / "png")) == ["0.png", "1.png"]
    tok = OneDTokenizer.from_pretrained(one_d_piece_dir)
    x = torch.from_numpy(golden["images"])
    adaptive = tok.encode_adaptive(x, min_psnr=5.0)
    assert adaptive.ids.shape == (2, 8) and ((1 <= adaptive.lengths) & (adaptive.lengths <= 8)).all()


# ---- training from a converted model, and the generator downstream -------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fit_config(path, init_from: str, overrides: dict, out: str, steps: int = 2) -> str:
    """A train.py config that fine-tunes the converted model `init_from` for `steps` steps on the embedded photos
    at 64 px, with the GAN on from the first step (its adaptive weight reads the pixel decoder's last conv)."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": steps,
                    "val_check_interval": 1000000, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                    "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": out},
        "model": {"class_path": "tokenizer.training.TokenizerModule",
                  "init_args": {"preset": "S", "overrides": overrides, "init_from": init_from, "gan_weight": 0.1,
                                "gan_start": 0, "lr": 1e-5, "warmup_steps": 1, "export_dir": out + "/tokenizer"}},
        "data": {"class_path": "data.photos.PhotosDataModule",
                 "init_args": {"image_size": 64, "batch_size": 2, "num_workers": 0, "train_crops_per_epoch": 8}},
    }  # fmt: skip
    with open(path, "w") as f:
        json.dump(config, f)  # JSON is YAML
    return str(path)


def _converted_overrides(tok: OneDTokenizer) -> dict:
    """The model overrides over preset S that describe the converted architecture."""
    from tokenizer.config import preset_config

    base = preset_config("S").to_dict()
    return {k: v for k, v in tok.config.to_dict().items() if v != base[k]}


@pytest.mark.slow
def test_fine_tune_from_a_converted_model_with_tail_drop(one_d_piece_dir, tmp_path):
    import subprocess
    import sys

    tok = OneDTokenizer.from_pretrained(one_d_piece_dir)
    overrides = _converted_overrides(tok)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    cfg = _fit_config(tmp_path / "fit.yaml", one_d_piece_dir, overrides, str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", cfg], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    tuned = OneDTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")  # finite weights, strict load
    moved = [n for n, p in tuned.state_dict().items() if not torch.equal(p, tok.state_dict()[n])]
    assert any(n.startswith("decoder.vqgan.pixel_decoder.") for n in moved)  # the GAN's last layer is trained
    assert any(n.startswith("encoder.") for n in moved)


def test_init_from_refuses_another_architecture_field_by_field(tmp_path):
    from _small_training import SMALL

    from tokenizer.training.initial_weights import load_initial_weights

    saved = OneDTokenizer.from_preset("tiny", **SMALL, class_token=True, length_mechanism="fixed")
    saved.save_pretrained(tmp_path / "saved")
    other = OneDTokenizer.from_preset("tiny", **{**SMALL, "dec_depth": 2}, pre_norm=True)
    with pytest.raises(ValueError, match=r"(?s)class_token: saved True, config False.*dec_depth: saved 1, config 2.*"
                                         r"pre_norm: saved False, config True"):  # fmt: skip
        load_initial_weights(other, tmp_path / "saved")
    nested = OneDTokenizer.from_preset("tiny", **SMALL, class_token=True, length_mechanism="nested_dropout")
    assert load_initial_weights(nested, tmp_path / "saved") == ["decoder.latent_mask_token"]  # its own new param
    torch.testing.assert_close(nested.encoder.latent_tokens, saved.encoder.latent_tokens)


@pytest.mark.slow
def test_extract_tokens_then_gpt_then_samples_at_two_k(one_d_piece_dir, tmp_path):
    from data.extract_tokens import main as extract
    from data.tokens import load_token_records
    from tokenizer.generator import GPT, generate

    out = str(tmp_path / "tokens")
    extract(["--tokenizer", one_d_piece_dir, "--out", out, "--source", "photos", "--num-crops", "6",
             "--batch-size", "4", "--no-progress"])  # fmt: skip
    ids, labels, keys, lengths, meta = load_token_records(out)
    assert meta["complete"] and ids.shape[1] == 8 and len(keys) >= 6
    tok = OneDTokenizer.from_pretrained(one_d_piece_dir)
    torch.manual_seed(0)
    gpt = GPT.from_preset("tiny", vocab_size=tok.codebook_size, max_tokens=tok.max_tokens,
                          num_classes=int(labels.max()) + 1, dim=32, depth=1, heads=2)  # fmt: skip
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    batch, classes = torch.as_tensor(ids).long(), torch.as_tensor(labels).long()
    losses = []
    for _ in range(20):
        loss = gpt(batch, classes).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k in (2, 8):
        sampled = generate(gpt.eval(), classes[:2], num_tokens=k, generator=torch.Generator().manual_seed(k))
        images = tok.decode(sampled)
        assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


@pytest.mark.slow
def test_reconstruction_report_of_a_converted_model_per_k(one_d_piece_dir, tmp_path):
    """eval.reconstruction on the converted One-D-Piece-style model: a row per k, finite metrics."""
    from eval.reconstruction import main as reconstruction

    rows = reconstruction(["--tokenizer", one_d_piece_dir, "--max-images", "3", "--num-tokens", "1", "4", "8",
                           "--no-fid", "--no-adaptive", "--codecs", "--num-workers", "0", "--batch-size", "2",
                           "--cpu", "--out", str(tmp_path / "report")])  # fmt: skip
    ours = {r.num_tokens: r for r in rows if r.method == "tokenizer"}
    assert sorted(ours) == [1, 4, 8] and all(r.num_images == 3 and np.isfinite(r.psnr) for r in ours.values())
    assert (tmp_path / "report" / "metrics.md").stat().st_size > 0


# ---- real weights, opt-in ------------------------------------------------------------------------------------
# TiTok's README (bytedance/1d-tokenizer, README_TiTok.md) lists the ids TiTok-L-32 gives for its asset
# ILSVRC2012_val_00010240.png (computed on CUDA).
TITOK_L32_IDS = [887, 3979, 349, 720, 2809, 2743, 2101, 603, 2205, 1508, 1891, 4015, 1317, 2956, 3774, 2296, 484, 2612,
                 3472, 2330, 3140, 3113, 1056, 3779, 654, 2360, 1901, 2908, 2169, 953, 1326, 2598]  # fmt: skip


@pytest.mark.skipif(not (os.environ.get("ONEDTOK_TITOK_L32") and os.environ.get("ONEDTOK_TITOK_IMAGE")),
                    reason="set ONEDTOK_TITOK_L32 (a snapshot folder of yucornetto/tokenizer_titok_l32_imagenet) and "
                    "ONEDTOK_TITOK_IMAGE (its assets/ILSVRC2012_val_00010240.png)")  # fmt: skip
def test_real_titok_l32_gives_the_ids_of_its_readme(tmp_path):
    from PIL import Image

    convert("titok", os.environ["ONEDTOK_TITOK_L32"], tmp_path / "l32", variant="L-32")
    tok = OneDTokenizer.from_pretrained(tmp_path / "l32")
    image = np.asarray(Image.open(os.environ["ONEDTOK_TITOK_IMAGE"]).convert("RGB"), dtype=np.float32) / 255
    x = torch.from_numpy(image).permute(2, 0, 1)[None]  # [1, 3, 256, 256], as the README feeds it
    ids = tok.encode(x)[0].tolist()
    flips = [i for i, (a, b) in enumerate(zip(ids, TITOK_L32_IDS)) if a != b]
    # a CPU run may flip a near-tie of the CUDA run; more than one flip is a conversion bug
    assert len(flips) <= 1, f"ids {ids} differ from the README's at positions {flips}"


# ---- the switches keep this project's contracts --------------------------------------------------------------
def test_released_switches_keep_the_length_contracts():
    """With every switch on (a narrow VQGAN head): per-sample lengths decode each image as its prefix alone, and
    with causal latents the class token does not let a latent see the ones after it."""
    from _small_training import SMALL

    switches = dict(patch_size=16, class_token=True, pre_norm=True, legacy_token_layout=True, pixel_range="[0, 1]",
                    decoder_head="vqgan", decoder_conv=False, vqgan_channels=32, vqgan_channel_mult=[1, 1, 1, 1, 1])
    torch.manual_seed(0)
    tok = OneDTokenizer.from_preset("tiny", **{**SMALL, **switches}).eval()
    x = torch.rand(3, 3, 32, 32)
    ids = tok.encode(x)
    lengths = torch.tensor([1, 5, 8])
    together = tok.decode(ids, lengths)
    for b, k in enumerate(lengths.tolist()):
        torch.testing.assert_close(together[b : b + 1], tok.decode(ids[b : b + 1, :k]), atol=1e-4, rtol=0)

    causal = OneDTokenizer.from_preset("tiny", **{**SMALL, **switches, "causal_latents": True}).eval()
    with torch.no_grad():
        z = causal.encoder(x)  # [B, K, D] before quantization
        causal.encoder.latent_tokens[:, 4:] += 1.0  # change every latent from position 4 on
        z_changed = causal.encoder(x)
    # the legacy layout mixes all latents into every token, so the check is on the plain layout's latents
    plain = OneDTokenizer.from_preset("tiny", **{**SMALL, **switches, "causal_latents": True,
                                                 "legacy_token_layout": False}).eval()  # fmt: skip
    with torch.no_grad():
        before = plain.encoder(x)
        plain.encoder.latent_tokens[:, 4:] += 1.0
        after = plain.encoder(x)
    torch.testing.assert_close(after[:, :4], before[:, :4])
    assert not torch.allclose(after[:, 4:], before[:, 4:])
    assert not torch.allclose(z_changed[:, :4], z[:, :4])  # the legacy layout: a quirk of the released weights
