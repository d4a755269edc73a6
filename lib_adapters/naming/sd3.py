"""SD3/SD3.5 MMDiT: SAI module paths (`joint_blocks.N.x_block.attn.qkv`: single-file checkpoints, A1111, Forge,
ComfyUI, kohya) ↔ diffusers `SD3Transformer2DModel` paths (`transformer_blocks.N.attn.to_q`), modern-models.md §3,
and the adapter spellings of both.

Both directions work on module paths (no `.weight`, no root) and take the layout from the model's own names and
shapes: depth and the last joint block (its context block is pre-only), SD3.5 Medium's `attn2` layers, q/k norms,
the width (a fused weight's rows / 3). A SAI `attn.qkv` (and `attn2.qkv`) holds diffusers' q, k, v as row blocks
0/1/2; `final_layer.adaLN_modulation.1` and the last block's `context_block.adaLN_modulation.1` hold (shift, scale)
where diffusers holds (scale, shift).

Adapter spellings: kohya/sd-scripts and LyCORIS `lora_unet_`/`lycoris_` + SAI path, ComfyUI `diffusion_model.` +
SAI, OMI `transformer.` + SAI with q/k/v split indices (`x_block.attn.qkv.0..2`); diffusers/PEFT `transformer.`,
PEFT `base_model.model.`, OneTrainer `lora_transformer_`, SimpleTuner `lycoris_` + diffusers path. Text encoders:
CLIP-L (`lora_te1_`, `text_encoder.`, `text_encoders.clip_l.transformer.`, `clip_l.`), CLIP-G (`lora_te2_`,
`text_encoder_2.`, …clip_g…), both with OneTrainer's `text_projection`; T5 (`lora_te3_`, `text_encoder_3.`,
`text_encoders.t5xxl.transformer.`, `t5.`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from . import t5
from .slots import Slot, Table, find_root, halves, module_paths, native_table, underscore

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


def describe(paths: Iterable[str]) -> str:
    """One line on the model: variant and depth (`merge` prints it)."""
    paths = list(paths)
    return f"{variant(paths)}, {layout(paths)['depth']} joint blocks"


# ---- routes onto a model (LayerMap), as every DiT family module provides them ----------------------------------

NAME = "sd3"
SAI_MARKER_KEY = "joint_blocks.0.x_block.attn.qkv.weight"
CHECKPOINT_ROOTS = ("model.diffusion_model.", "diffusion_model.", "")
DIFFUSERS_MARKERS = ("pos_embed.proj.weight", "transformer_blocks.0.norm1_context.linear.weight")
# Adapter spellings in front of SAI paths: kohya/sd-scripts, LyCORIS, ComfyUI, OMI (`transformer.` + SAI with
# q/k/v split indices), bare; in front of diffusers paths: diffusers/PEFT, PEFT models, OneTrainer legacy,
# SimpleTuner LyCORIS, kohya-style.
SAI_PREFIXES = ("lora_unet_", "lycoris_", "diffusion_model_", "model_diffusion_model_", "transformer_",
                "base_model_model_", "")
DIFFUSERS_PREFIXES = ("transformer_", "base_model_model_", "lora_transformer_", "lycoris_", "lora_unet_", "")
CLIP_L = (("text_encoders.clip_l.", "clip_l."), ("lora_te1_", "text_encoder_", "text_encoders_clip_l_transformer_",
                                                 "text_encoders_clip_l_", "clip_l_transformer_", "clip_l_"))
CLIP_G = (("text_encoders.clip_g.", "clip_g."), ("lora_te2_", "text_encoder_2_", "text_encoders_clip_g_transformer_",
                                                 "text_encoders_clip_g_", "clip_g_transformer_", "clip_g_"))
T5_PREFIXES = ("lora_te3_", "text_encoder_3_") + t5.COMMON_PREFIXES


def checkpoint_root(shapes) -> str | None:
    """Where an MMDiT in SAI names lives in a state dict (with or without `model.diffusion_model.` /
    `diffusion_model.`), or None; needs `x_embedder.proj.weight` too, so a SAI-named adapter is no checkpoint."""
    root = find_root(shapes, SAI_MARKER_KEY, CHECKPOINT_ROOTS)
    return root if root is not None and root + "x_embedder.proj.weight" in shapes else None


def add_checkpoint_routes(lm, shapes, root: str) -> None:
    """Routes for every SD3 adapter spelling onto a SAI-named model under `root`, and its text encoders: diffusers
    q/k/v onto row thirds of the fused `qkv`, the two swapped modulations with their halves in diffusers order."""
    modules = module_paths(shapes, root)
    last = last_block(modules)
    lm.detail = describe(modules)
    sai = native_table(shapes, root, "unet", params=True)
    diffusers: Table = {}
    for path, (w, b) in modules.items():
        twins_of = sai_to_diffusers(path)
        rows = shapes[w][0] if shapes.get(w) else None
        if len(twins_of) == 3 and rows:
            third = rows // 3
            for dpath, part in twins_of:
                slot = Slot(w, b, "unet", rows=(part * third, (part + 1) * third))
                diffusers[underscore(dpath)] = sai[underscore(f"{path}.{part}")] = slot
        elif len(twins_of) == 3:  # names only: the width comes from the patch
            for dpath, part in twins_of:
                diffusers[underscore(dpath)] = sai[underscore(f"{path}.{part}")] = Slot(w, b, "unet", part=part)
        elif twins_of:
            swapped = is_swapped(path, last)
            if swapped and not rows:
                continue  # names only: which rows are halves is unknowable, so the layer stays unmatched
            diffusers[underscore(twins_of[0][0])] = Slot(w, b, "unet", order=halves(rows) if swapped else None)
    lm._add(SAI_PREFIXES, sai)
    lm._add(DIFFUSERS_PREFIXES, diffusers)
    add_text_encoder_routes(lm, shapes)


def add_text_encoder_routes(lm, shapes) -> None:
    """CLIP-L, CLIP-G (HF layout, with `text_projection`) and T5, wherever the model holds them."""
    from . import clip_tables

    for roots, prefixes in (CLIP_L, CLIP_G):
        root = find_root(shapes, "transformer.text_model.final_layer_norm.weight", roots)
        if root is not None:
            lm._add(prefixes, clip_tables(shapes, root)[0])
    t5_root = t5.root(shapes)
    if t5_root is not None:
        lm._add(T5_PREFIXES, t5.table(shapes, t5_root))


def is_diffusers(names) -> bool:
    """Whether a diffusers transformer component (names relative to it) is an SD3Transformer2DModel."""
    return all(m in names for m in DIFFUSERS_MARKERS)


def add_diffusers_routes(lm, shapes, root: str = "transformer.") -> None:
    """Routes onto a diffusers SD3 transformer under `root`: diffusers spellings directly, SAI spellings onto the
    same layers — a fused `qkv` onto a virtual weight stacking to_q/to_k/to_v (LayerMap.fuse)."""
    modules = module_paths(shapes, root)
    last = last_block(modules)
    lm.detail = describe(modules)
    lm._add(DIFFUSERS_PREFIXES, native_table(shapes, root, "unet", params=True))
    sai: Table = {}
    fused: dict[str, dict[int, tuple[str, str | None]]] = {}
    for path, (w, b) in modules.items():
        mapped = diffusers_to_sai(path)
        if mapped is None:
            continue
        spath, part = mapped
        if part is None:
            swapped = is_swapped(spath, last)
            if swapped and not shapes.get(w):
                continue  # names only: see add_checkpoint_routes
            sai[underscore(spath)] = Slot(w, b, "unet", order=halves(shapes[w][0]) if swapped else None)
        else:
            fused.setdefault(spath, {})[part] = (w, b)
            sai[underscore(f"{spath}.{part}")] = Slot(w, b, "unet")
    for spath, parts in fused.items():
        if sorted(parts) == [0, 1, 2] and all(shapes.get(w) for w, _ in parts.values()):
            w, b = lm.fuse([parts[0], parts[1], parts[2]])
            sai[underscore(spath)] = Slot(w, b, "unet")
    lm._add(SAI_PREFIXES, sai)


def add_diffusers_text_encoders(lm, shapes, components) -> None:
    """CLIP-L (`text_encoder`), CLIP-G (`text_encoder_2`) and T5 (`text_encoder_3`) of a StableDiffusion3Pipeline."""
    from . import diffusers_clip_table

    for comp, (_, prefixes) in (("text_encoder", CLIP_L), ("text_encoder_2", CLIP_G)):
        if components.get(comp) is not None:
            lm._add(prefixes, diffusers_clip_table(shapes, comp))
    if components.get("text_encoder_3") is not None:
        lm._add(T5_PREFIXES, t5.table(shapes, "text_encoder_3."))
