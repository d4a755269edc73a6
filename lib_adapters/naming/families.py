"""Which base model family an adapter was trained for, from its key names and shapes (metadata as a hint).

Order (formats.md §6): DiT key names (SD3's SAI names; Flux BFL or diffusers names, a T5 second encoder; a
diffusers DiT file without single blocks — Flux and SD3 share those names — by metadata, then by width: Flux 3072,
SD3 1536/2432, else unknown; a T5 encoder `lora_te3_`) → cross-attention input width (768/1024/2048) → a second
CLIP encoder (`lora_te2_`, `text_encoder_2.`) → text-encoder width (1024 → SD2, 1280 → SDXL) → metadata → UNet
structure (SDXL-only blocks vs. SD1/SD2-only levels) → CLIP-L width (SD1).
"""

from __future__ import annotations

import re

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "unknown")
CROSS_ATTN_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TE_WIDTH = {1024: "sd2", 1280: "sdxl"}

FLUX_KEYS = re.compile(r"double_blocks|single_blocks|single_transformer_blocks|img_attn|txt_attn|guidance_in|"
                       r"guidance_embedder|final_layer[._]adaLN|(^|[._])img_in([._]|$)", re.M)
FLUX_WIDTH = 3072  # Flux.1's hidden width: tells a diffusers Flux file without single blocks from an SD3 one
JOINT_ATTENTION = re.compile(r"attn[._](add_[qkv]_proj|to_[qkv])")
SD3_WIDTHS = (1536, 2432)  # SD3 Medium / SD3.5 Medium, SD3.5 Large (64 per head × depth)
SD3_SAI = re.compile(r"joint_blocks|context_block")
# Prefixes only DiT adapters carry (diffusers/PEFT `transformer.`, OneTrainer `lora_transformer_`), and a DiT's
# top-level diffusers blocks behind any adapter prefix (a UNet's sit inside `attentions`).
DIT_PREFIX = re.compile(r"^(transformer\.|lora_transformer_)")
DIT_BLOCKS = re.compile(r"^(transformer[._]|lora_transformer_|lycoris_|base_model[._]model[._]|lora_unet_)?"
                        r"transformer_blocks[._]\d+[._]")
T5_KEYS = re.compile(r"(^|[._])lora_te3_|text_encoder_3\.")
# A T5 encoder as the second text encoder (OneTrainer `lora_te2_`, diffusers `text_encoder_2.`): Flux.
T5_SECOND = re.compile(r"^(lora_te2[._]|text_encoder_2\.).*encoder[._]block[._]\d+[._]layer")
SECOND_CLIP = re.compile(r"^(lora_te2_|text_encoder_2\.|lora_te2\.|clip_g\.)|(^|_)embedders_1_|^1_model_")
CROSS_ATTN = re.compile(r"attn2[._](to_[kv]|processor)")
TE_ATTENTION = re.compile(r"(self_attn|attn)[._]?(q_proj|k_proj|v_proj)|resblocks")
# Blocks only SDXL has: label/add embedding, transformer depth > 1, its sgm layout under kohya's prefixes.
SDXL_ONLY = re.compile(r"label_emb|add_embedding|transformer_blocks[._][1-9]")
# Levels only SD1/SD2 have: a fourth down/up level, input blocks 10-11, output blocks 9-11.
SD12_ONLY = re.compile(r"down_blocks[._]3|up_blocks[._]3|input_blocks[._]1[01][._]|output_blocks[._](9|1[01])[._]")
KOHYA_SGM = re.compile(r"^(lora_unet|oft_unet|lycoris)_(input_blocks|middle_block|output_blocks)_")


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    base = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    if base.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if base.startswith("sd_v2") or metadata.get("ss_v2") == "True" or arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if base.startswith("flux") or arch.startswith("flux"):
        return "flux"
    if "stable-diffusion-3" in arch or base.startswith("sd3"):
        return "sd3"
    if base.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def detect_family(in_dims: dict[str, int | None], metadata: dict[str, str] | None = None) -> str:
    """`in_dims`: module key → input width of its adapter (None where unknown)."""
    keys = list(in_dims)
    joined = "\n".join(keys)
    if SD3_SAI.search(joined):
        return "sd3"
    if FLUX_KEYS.search(joined) or any(T5_SECOND.search(k) for k in keys):
        return "flux"
    dit = [k for k in keys if DIT_BLOCKS.search(k) or DIT_PREFIX.search(k)]
    if dit:
        from_meta = family_from_metadata(metadata or {})
        if from_meta in ("flux", "sd3"):
            return from_meta
        if any(in_dims[k] == FLUX_WIDTH and JOINT_ATTENTION.search(k) for k in dit):
            return "flux"
        if any(in_dims[k] in SD3_WIDTHS for k in dit):
            return "sd3"
        return "unknown"  # a Flux or SD3 transformer, not told apart by these keys
    if any(T5_KEYS.search(k) for k in keys):
        return "sd3" if not re.search(r"lora_te1_", joined) or re.search(r"lora_te2_", joined) else "flux"
    for key, width in in_dims.items():
        if width in CROSS_ATTN_WIDTH and CROSS_ATTN.search(key):
            return CROSS_ATTN_WIDTH[width]
    if any(SECOND_CLIP.search(k) for k in keys):
        return "sdxl"
    for key, width in in_dims.items():
        if width in TE_WIDTH and TE_ATTENTION.search(key):
            return TE_WIDTH[width]
    from_meta = family_from_metadata(metadata or {})
    if from_meta:
        return from_meta
    if not SD12_ONLY.search(joined):
        if SDXL_ONLY.search(joined) or re.search(r"(^|\n)lora_te1_", joined) or any(KOHYA_SGM.search(k) for k in keys):
            return "sdxl"
    for key, width in in_dims.items():
        if width == 768 and re.search(r"(self_attn|text_model|lora_te_)", key):
            return "sd1"
    return "unknown"
