"""The released 1D tokenizers this project converts, and their architecture in this project's terms.

A reference checkpoint comes with the config its own code was built from (`config.json`: `model.vq_model.*`,
`dataset.preprocessing.crop_size`); `tokenizer_config` turns that into a `TokenizerConfig` with the released-weight
switches on (config.py). A checkpoint without a config names its variant instead (`--variant`), whose reference
config is below, written from the reference repositories' own inference configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TokenizerConfig

FAMILIES = ("titok", "one-d-piece")
# TiTok's model sizes (modeling/modules/blocks.py): width, depth, heads
VIT_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}
LICENCES = {
    "titok": "Apache-2.0 (code and weights: https://github.com/bytedance/1d-tokenizer/blob/main/LICENSE)",
    "one-d-piece": "Apache-2.0 (code and weights: https://github.com/turingmotors/One-D-Piece/blob/main/LICENSE)",
}


@dataclass(frozen=True)
class Variant:
    family: str
    hub_id: str
    encoder: str  # small / base / large
    decoder: str
    max_tokens: int
    codebook_size: int
    token_dim: int
    two_stage: bool  # legacy layout + MaskGIT-VQGAN pixel decoder (else single-stage pixels, Euclidean VQ)
    published_rfid: float  # ImageNet val 256 px, as published (at K tokens)

    def reference_config(self) -> dict:
        """The reference code's config for this variant (what its config.json holds)."""
        vq = {"codebook_size": self.codebook_size, "token_size": self.token_dim, "use_l2_norm": self.two_stage,
              "commitment_cost": 0.25, "vit_enc_model_size": self.encoder, "vit_dec_model_size": self.decoder,
              "vit_enc_patch_size": 16, "vit_dec_patch_size": 16, "num_latent_tokens": self.max_tokens,
              "finetune_decoder": self.two_stage, "is_legacy": self.two_stage}
        model = {"vq_model": vq}
        if self.family == "one-d-piece":
            model["type"] = "one_d_piece"
        return {"model": model, "dataset": {"preprocessing": {"crop_size": 256}}}


def _titok(hub, enc, dec, k, two_stage, rfid):
    size = (4096, 12) if two_stage else (8192, 64)
    return Variant("titok", hub, enc, dec, k, *size, two_stage, rfid)


VARIANTS: dict[str, Variant] = {
    "titok-L-32": _titok("yucornetto/tokenizer_titok_l32_imagenet", "large", "large", 32, True, 2.21),
    "titok-B-64": _titok("yucornetto/tokenizer_titok_b64_imagenet", "base", "base", 64, True, 1.70),
    "titok-S-128": _titok("yucornetto/tokenizer_titok_s128_imagenet", "small", "small", 128, True, 1.71),
    "titok-BL-64-VQ": _titok("yucornetto/tokenizer_titok_bl64_vq8k_imagenet", "base", "large", 64, False, 2.06),
    "titok-BL-128-VQ": _titok("yucornetto/tokenizer_titok_bl128_vq8k_imagenet", "base", "large", 128, False, 1.49),
    "titok-SL-256-VQ": _titok("yucornetto/tokenizer_titok_sl256_vq8k_imagenet", "small", "large", 256, False, 1.03),
    "one-d-piece-S-256": Variant("one-d-piece", "turing-motors/One-D-Piece-S-256", "small", "small", 256, 4096, 12,
                                 True, 1.48),
    "one-d-piece-B-256": Variant("one-d-piece", "turing-motors/One-D-Piece-B-256", "base", "base", 256, 4096, 12,
                                 True, 1.11),
    "one-d-piece-L-256": Variant("one-d-piece", "turing-motors/One-D-Piece-L-256", "large", "large", 256, 4096, 12,
                                 True, 1.08),
}  # fmt: skip


def variant_by_name(name: str, family: str) -> Variant:
    """The variant `name` ("L-32" or "titok-L-32"), which must belong to `family`."""
    key = name if name in VARIANTS else f"{family}-{name}"
    if key not in VARIANTS:
        names = sorted(v[len(family) + 1 :] for v in VARIANTS if v.startswith(family + "-"))
        raise ValueError(f"unknown {family} variant {name!r}; known: {names}")
    if VARIANTS[key].family != family:
        raise ValueError(f"variant {name!r} is a {VARIANTS[key].family} model, not {family}")
    return VARIANTS[key]


def variant_for_hub_id(hub_id: str) -> str | None:
    return next((name for name, v in VARIANTS.items() if v.hub_id == hub_id), None)


def tokenizer_config(family: str, reference: dict, source: object) -> TokenizerConfig:
    """The TokenizerConfig that computes what the reference model of `reference` (its config dict) computes.
    Refuses, naming `source`, the variants that cannot be converted to discrete ids."""
    try:
        vq = reference["model"]["vq_model"]
        crop = reference["dataset"]["preprocessing"]["crop_size"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{source}: not a TiTok/One-D-Piece config (no model.vq_model or "
                         f"dataset.preprocessing.crop_size: {e}); pass --variant to use a known config") from e
    kind = reference["model"].get("type")
    if kind is not None and kind != ("one_d_piece" if family == "one-d-piece" else "titok") and kind != "tatitok":
        other = "one-d-piece" if kind == "one_d_piece" else kind
        raise ValueError(f"{source}: its config says model.type {kind!r}, a {other} model; run "
                         f"`onedtok convert {other} ...` instead of {family}")
    if kind == "tatitok" or "text_context_length" in vq:
        raise ValueError(f"{source}: TA-TiTok's decoder reads CLIP text features beside the tokens, which this "
                         "project's decoder has no input for; it cannot be converted")
    if vq.get("quantize_mode", "vq") != "vq":
        raise ValueError(f"{source}: quantize_mode {vq.get('quantize_mode')!r} (a VAE/KL variant) has continuous "
                         "tokens, not discrete ids; only the VQ variants convert")
    legacy, finetuned = vq.get("is_legacy", True), vq.get("finetune_decoder", True)
    if legacy and not finetuned:
        raise ValueError(f"{source}: a stage-1 checkpoint (finetune_decoder false): its decoder predicts MaskGIT-VQGAN "
                         "proxy codes and holds no fine-tuned pixel decoder; convert the released stage-2 "
                         "tokenizer instead")
    if finetuned and not legacy:
        raise ValueError(f"{source}: finetune_decoder with is_legacy false is no released combination (the pixel "
                         "decoder reads proxy-code logits, which only the legacy head makes)")
    if family == "one-d-piece" and not legacy:
        raise ValueError(f"{source}: One-D-Piece models are two-stage (legacy layout); this is a single-stage "
                         "checkpoint: run `onedtok convert titok ...`")
    if vq["vit_enc_patch_size"] != vq["vit_dec_patch_size"]:
        raise ValueError(f"{source}: encoder patch {vq['vit_enc_patch_size']} != decoder patch "
                         f"{vq['vit_dec_patch_size']}; this project uses one patch size")
    for side in ("enc", "dec"):
        if vq[f"vit_{side}_model_size"] not in VIT_SIZES:
            raise ValueError(f"{source}: unknown vit_{side}_model_size {vq[f'vit_{side}_model_size']!r}; known: "
                             f"{sorted(VIT_SIZES)}")
    enc_w, enc_d, enc_h = VIT_SIZES[vq["vit_enc_model_size"]]
    dec_w, dec_d, dec_h = VIT_SIZES[vq["vit_dec_model_size"]]
    return TokenizerConfig(
        image_size=crop, patch_size=vq["vit_enc_patch_size"], max_tokens=vq["num_latent_tokens"],
        enc_width=enc_w, enc_depth=enc_d, enc_heads=enc_h, dec_width=dec_w, dec_depth=dec_d, dec_heads=dec_h,
        quantizer="vq", codebook_size=vq["codebook_size"], token_dim=vq["token_size"],
        vq_commitment_weight=float(vq.get("commitment_cost", 0.25)),
        # the release holds no EMA cluster sizes: without this, fine-tuning would re-seed every code at step 1
        vq_dead_code_threshold=0.0,
        vq_distance="cosine" if vq.get("use_l2_norm", False) else "euclidean",
        # One-D-Piece trained every prefix (tail token drop); TiTok only ever decoded all K tokens
        length_mechanism="tail_token_drop" if family == "one-d-piece" else "fixed",
        pixel_range="[0, 1]", class_token=True, pre_norm=True, legacy_token_layout=legacy,
        decoder_conv=not legacy, decoder_conv_residual=False, decoder_head="vqgan" if legacy else "pixels",
    )  # fmt: skip


__all__ = ["FAMILIES", "LICENCES", "VARIANTS", "Variant", "variant_by_name", "variant_for_hub_id",
           "tokenizer_config"]
