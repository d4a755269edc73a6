"""Which base model family an adapter was trained for, from its key names and shapes (metadata as a hint)."""

from __future__ import annotations

import re

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "unknown")
CROSS_ATTN_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TE_WIDTH = {1024: "sd2", 1280: "sdxl"}


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    base = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    if base.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if base.startswith("sd_v2") or metadata.get("ss_v2") == "True" or arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if base.startswith("flux") or arch.startswith("flux"):
        return "flux"
    if "stable-diffusion-3" in arch:
        return "sd3"
    if base.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def detect_family(in_dims: dict[str, int | None], metadata: dict[str, str] | None = None) -> str:
    """`in_dims`: module key → input width of its adapter (None where unknown)."""
    keys = list(in_dims)
    joined = "\n".join(keys)
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks", joined):
        return "flux"
    if re.search(r"joint_blocks|context_block|add_q_proj", joined):
        return "sd3"
    for key, width in in_dims.items():
        if width and re.search(r"attn2[._](to_[kv]|processor)", key) and width in CROSS_ATTN_WIDTH:
            return CROSS_ATTN_WIDTH[width]
    for key, width in in_dims.items():
        if width and re.search(r"(lora_te2_|text_encoder_2\.|te2|embedders[._]1)", key):
            return "sdxl"
    for key, width in in_dims.items():
        if width and re.search(r"(self_attn|attn)[._]?(q_proj|k_proj|v_proj)|resblocks", key) and width in TE_WIDTH:
            return TE_WIDTH[width]
    from_meta = family_from_metadata(metadata or {})
    if from_meta:
        return from_meta
    if re.search(r"lora_te1_|text_encoder_2|label_emb|add_embedding", joined):
        return "sdxl"
    if re.search(r"transformer_blocks[._]9\b", joined):
        return "sdxl"
    for key, width in in_dims.items():
        if width == 768 and re.search(r"(self_attn|text_model|lora_te_)", key):
            return "sd1"
    return "unknown"
