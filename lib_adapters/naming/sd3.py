"""SD3/SD3.5 MMDiT: SAI module paths (`joint_blocks.N.x_block.attn.qkv`: single-file checkpoints, A1111, Forge,
ComfyUI, kohya) ↔ diffusers `SD3Transformer2DModel` paths (`transformer_blocks.N.attn.to_q`), modern-models.md §3.

Both directions work on module paths (no `.weight`, no root) and take the layout from the model's own names: the
last joint block (its context block is pre-only) is the highest block index present. A SAI `attn.qkv` (and SD3.5
Medium's `attn2.qkv`) holds diffusers' q, k, v as row blocks 0/1/2; `final_layer.adaLN_modulation.1` and the last
block's `context_block.adaLN_modulation.1` hold (shift, scale) where diffusers holds (scale, shift).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

TOP_SAI_TO_DIFFUSERS = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
BLOCK_SAI_TO_DIFFUSERS = {
    "x_block.attn.proj": "attn.to_out.0",
    "context_block.attn.proj": "attn.to_add_out",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "x_block.attn2.ln_q": "attn2.norm_q",
    "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}
FUSED_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
TOP_DIFFUSERS_TO_SAI = {v: k for k, v in TOP_SAI_TO_DIFFUSERS.items()}
BLOCK_DIFFUSERS_TO_SAI = {v: k for k, v in BLOCK_SAI_TO_DIFFUSERS.items()}
PART_OF = {proj: (fused, part) for fused, projs in FUSED_QKV.items() for part, proj in enumerate(projs)}
SWAPPED_TOP = "final_layer.adaLN_modulation.1"
SWAPPED_LAST_BLOCK = "context_block.adaLN_modulation.1"
# Names only an MMDiT has, in either spelling (checkpoint keys or module paths, any root).
SAI_MARKER = re.compile(r"(^|\.)joint_blocks\.\d+\.(x_block|context_block)\.")
DIFFUSERS_MARKER = re.compile(r"(^|\.)transformer_blocks\.\d+\.(attn\.add_q_proj|norm1_context\.linear|attn2\.to_q)")

_SAI_BLOCK = re.compile(r"joint_blocks\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)$")


def last_block(paths: Iterable[str]) -> int | None:
    """The highest joint-block index among SAI (`joint_blocks.N.`) or diffusers (`transformer_blocks.N.`) paths."""
    found = [int(m.group(2)) for p in paths if (m := re.match(r"(joint_blocks|transformer_blocks)\.(\d+)\.", p))]
    return max(found) if found else None


def is_swapped(sai_path: str, last: int | None) -> bool:
    """Whether the SAI module stores (shift, scale) where diffusers stores (scale, shift)."""
    return sai_path == SWAPPED_TOP or (last is not None and sai_path == f"joint_blocks.{last}.{SWAPPED_LAST_BLOCK}")


def sai_to_diffusers(path: str) -> list[tuple[str, int | None]]:
    """[(diffusers path, q/k/v part of the SAI weight or None)] of a SAI module path; [] if it has no twin."""
    if path in TOP_SAI_TO_DIFFUSERS:
        return [(TOP_SAI_TO_DIFFUSERS[path], None)]
    m = _SAI_BLOCK.match(path)
    if not m:
        return []
    n, rest = m.groups()
    if rest in FUSED_QKV:
        return [(f"transformer_blocks.{n}.{proj}", part) for part, proj in enumerate(FUSED_QKV[rest])]
    if rest in BLOCK_SAI_TO_DIFFUSERS:
        return [(f"transformer_blocks.{n}.{BLOCK_SAI_TO_DIFFUSERS[rest]}", None)]
    return []


def diffusers_to_sai(path: str) -> tuple[str, int | None] | None:
    """(SAI path, q/k/v part within it or None) of a diffusers module path, or None."""
    if path in TOP_DIFFUSERS_TO_SAI:
        return TOP_DIFFUSERS_TO_SAI[path], None
    m = _DIFFUSERS_BLOCK.match(path)
    if not m:
        return None
    n, rest = m.groups()
    if rest in PART_OF:
        fused, part = PART_OF[rest]
        return f"joint_blocks.{n}.{fused}", part
    if rest in BLOCK_DIFFUSERS_TO_SAI:
        return f"joint_blocks.{n}.{BLOCK_DIFFUSERS_TO_SAI[rest]}", None
    return None


def layout(paths: Iterable[str]) -> dict:
    """depth, attn2 layers and q/k RMSNorm of an MMDiT, from its SAI or diffusers module paths."""
    paths = list(paths)
    last = last_block(paths)
    attn2 = sorted({int(m.group(2)) for p in paths
                    if (m := re.match(r"(joint_blocks|transformer_blocks)\.(\d+)\.(x_block\.)?attn2\.", p))})
    qk_norm = any(re.search(r"\.(ln_q|norm_q|norm_added_q)$", p) for p in paths)
    return {"depth": (last + 1) if last is not None else 0, "attn2_layers": attn2, "qk_norm": qk_norm}


def variant(paths: Iterable[str]) -> str:
    """SD3 Medium (no q/k norm), SD3.5 Large/Turbo (q/k norm), SD3.5 Medium (q/k norm and `attn2` layers)."""
    info = layout(paths)
    if info["attn2_layers"]:
        return "SD3.5 Medium"
    return "SD3.5 Large" if info["qk_norm"] else "SD3 Medium"
