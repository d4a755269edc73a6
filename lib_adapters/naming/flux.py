"""Flux.1: BFL module paths (`double_blocks`/`single_blocks`, what Forge, ComfyUI and single files hold) ↔ diffusers
`FluxTransformer2DModel` paths (modern-models.md §1-2), and the adapter spellings of both.

Sizes come from the model's own weights — hidden width H (`img_in` rows), MLP width M (`linear1` rows − 3H), the
number of double and single blocks — so dev, schnell, pruned variants and tiny test models all work. Fused BFL
weights hold diffusers layers as row blocks: `img_attn.qkv` = [to_q | to_k | to_v], `txt_attn.qkv` = [add_q_proj |
add_k_proj | add_v_proj], `linear1` = [to_q | to_k | to_v | proj_mlp] (H, H, H, M rows); `final_layer.
adaLN_modulation.1` holds (shift, scale) where diffusers' `norm_out.linear` holds (scale, shift).

Adapter spellings: kohya/LyCORIS `lora_unet_`/`lycoris_` + BFL or diffusers path, ComfyUI `diffusion_model.` + BFL,
bare BFL (BFL Control, OneTrainer ORIGINAL), fal `base_model.model.` + BFL, OMI `transformer.` + BFL with split
indices (`img_attn.qkv.0..2`, `linear1.0..3`, `img_in.proj`), XLabs `processor.qkv_lora1/2`, `proj_lora1/2`
(single blocks: `qkv_lora` on linear1's first 3H rows), diffusers/PEFT `transformer.` + diffusers path, OneTrainer
`lora_transformer_` + diffusers path. Text encoders: CLIP-L (`lora_te1_`, `text_encoder.`, `text_encoders.clip_l.
transformer.`, `clip_l.`) and T5 (`lora_te3_` kohya, `lora_te2_` OneTrainer, `text_encoder_2.`, `text_encoders.t5xxl.
transformer.`, `t5.` OMI).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import t5
from .slots import DIT_WEIGHT_SUFFIXES, Slot, Table, find_root, halves, module_paths, native_table, underscore

NAME = "flux"
BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"
CHECKPOINT_ROOTS = ("model.diffusion_model.", "diffusion_model.", "")
DIFFUSERS_MARKERS = ("x_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight", "norm_out.linear.weight")

BFL_PREFIXES = ("lora_unet_", "lycoris_", "diffusion_model_", "model_diffusion_model_", "transformer_",
                "base_model_model_", "")
DIFFUSERS_PREFIXES = ("transformer_", "lycoris_", "lora_transformer_", "lora_unet_", "base_model_model_", "")
CLIP_ROOTS = ("text_encoders.clip_l.", "clip_l.")
CLIP_PREFIXES = ("lora_te1_", "lora_te_", "text_encoder_", "text_encoders_clip_l_transformer_", "text_encoders_clip_l_",
                 "clip_l_transformer_", "clip_l_")
T5_PREFIXES = ("lora_te3_", "lora_te2_", "text_encoder_2_") + t5.COMMON_PREFIXES
CONTROL_HINT = ("a Flux Control (Canny/Depth) or Fill adapter needs a model whose img_in takes that many input "
                "channels (the matching FLUX.1 Canny/Depth/Fill model); this one has fewer")


@dataclass(frozen=True)
class Sizes:
    """Widths and depths of one Flux transformer, read off its weights."""

    hidden: int
    mlp: int
    double: int
    single: int


@dataclass(frozen=True)
class Relation:
    """One BFL module and the diffusers module(s) it holds: several parts are its row blocks, in order (`widths`);
    `swap` means its two row halves are in the other order (final adaLN: shift/scale vs scale/shift)."""

    bfl: str
    parts: tuple[str, ...]
    widths: tuple[int, ...] | None = None
    swap: bool = False


def _count(names, pattern: str) -> int:
    found = [int(m.group(1)) for n in names if (m := re.match(pattern, n))]
    return max(found) + 1 if found else 0


def bfl_sizes(shapes, root: str) -> Sizes:
    hidden = shapes[root + "img_in.weight"][0]
    rel = [n[len(root):] for n in shapes if n.startswith(root)]
    single = _count(rel, r"single_blocks\.(\d+)\.")
    if single:
        mlp = shapes[root + "single_blocks.0.linear1.weight"][0] - 3 * hidden
    else:
        mlp = shapes[root + "double_blocks.0.img_mlp.0.weight"][0]
    return Sizes(hidden, mlp, _count(rel, r"double_blocks\.(\d+)\."), single)


def diffusers_sizes(shapes, root: str) -> Sizes:
    hidden = shapes[root + "x_embedder.weight"][0]
    rel = [n[len(root):] for n in shapes if n.startswith(root)]
    mlp_key = root + ("single_transformer_blocks.0.proj_mlp.weight" if root + "single_transformer_blocks.0.proj_mlp.weight"
                      in shapes else "transformer_blocks.0.ff.net.0.proj.weight")
    return Sizes(hidden, shapes[mlp_key][0], _count(rel, r"transformer_blocks\.(\d+)\."),
                 _count(rel, r"single_transformer_blocks\.(\d+)\."))


def relations(s: Sizes) -> Iterator[Relation]:
    """Every BFL module with its diffusers counterpart(s)."""
    h, m = s.hidden, s.mlp
    for n in range(s.double):
        b, d = f"double_blocks.{n}.", f"transformer_blocks.{n}."
        yield Relation(b + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), (h, h, h))
        yield Relation(b + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"), (h, h, h))
        for bfl, dif in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                         ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                         ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                         ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                         ("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                         ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            yield Relation(b + bfl, (d + dif,))
    for n in range(s.single):
        b, d = f"single_blocks.{n}.", f"single_transformer_blocks.{n}."
        yield Relation(b + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"), (h, h, h, m))
        for bfl, dif in (("linear2", "proj_out"), ("modulation.lin", "norm.linear"),
                         ("norm.query_norm", "attn.norm_q"), ("norm.key_norm", "attn.norm_k")):
            yield Relation(b + bfl, (d + dif,))
    for bfl, dif in (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                     ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                     ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                     ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                     ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                     ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                     ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
                     ("final_layer.linear", "proj_out")):
        yield Relation(bfl, (dif,))
    yield Relation("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True)


def bfl_aliases(s: Sizes) -> Iterator[tuple[str, str, tuple[int, int] | None]]:
    """Adapter-only BFL spellings: (alias path, BFL module, row block or None) — OMI split indices and `img_in.proj`,
    XLabs processors (double: whole qkv/proj; single: `qkv_lora` on linear1's q|k|v rows, `proj_lora` on linear2)."""
    h = s.hidden
    for n in range(s.double):
        b = f"double_blocks.{n}."
        for stream, lora in (("img", "1"), ("txt", "2")):
            for j in range(3):
                yield f"{b}{stream}_attn.qkv.{j}", f"{b}{stream}_attn.qkv", (j * h, (j + 1) * h)
            yield f"{b}processor.qkv_lora{lora}", f"{b}{stream}_attn.qkv", None
            yield f"{b}processor.proj_lora{lora}", f"{b}{stream}_attn.proj", None
    for n in range(s.single):
        b = f"single_blocks.{n}."
        for j, (lo, hi) in enumerate(((0, h), (h, 2 * h), (2 * h, 3 * h), (3 * h, 3 * h + s.mlp))):
            yield f"{b}linear1.{j}", f"{b}linear1", (lo, hi)
        yield f"{b}processor.qkv_lora", f"{b}linear1", (0, 3 * h)
        yield f"{b}processor.proj_lora", f"{b}linear2", None
    yield "img_in.proj", "img_in", None


# ---- the model holds BFL names (Forge, ComfyUI, single files) ------------------------------------------------

def checkpoint_root(shapes) -> str | None:
    """Where a Flux transformer in BFL names lives in a state dict (with or without `model.diffusion_model.` /
    `diffusion_model.`), or None. Needs `img_in.weight` too, so a BFL-named adapter file is no checkpoint."""
    root = find_root(shapes, BFL_MARKER, CHECKPOINT_ROOTS)
    return root if root is not None and root + "img_in.weight" in shapes else None


def add_checkpoint_routes(lm, shapes, root: str) -> None:
    """Routes for every Flux adapter spelling onto a BFL-named model under `root`, and its text encoders."""
    sizes = bfl_sizes(shapes, root)
    modules = module_paths(shapes, root, DIT_WEIGHT_SUFFIXES)
    bfl = native_table(shapes, root, "unet", DIT_WEIGHT_SUFFIXES, params=True)
    for alias, module, rows in bfl_aliases(sizes):
        if module in modules:
            w, b = modules[module]
            bfl[underscore(alias)] = Slot(w, b, "unet", rows=rows)
    diffusers: Table = {}
    for rel in relations(sizes):
        if rel.bfl not in modules:
            continue
        w, b = modules[rel.bfl]
        if rel.widths is None:
            order = halves(shapes[w][0]) if rel.swap else None
            diffusers[underscore(rel.parts[0])] = Slot(w, b, "unet", order=order)
            continue
        lo = 0
        for part, width in zip(rel.parts, rel.widths):
            diffusers[underscore(part)] = Slot(w, b, "unet", rows=(lo, lo + width))
            lo += width
    lm._add(BFL_PREFIXES, bfl)
    lm._add(DIFFUSERS_PREFIXES, diffusers)
    if root + "img_in.weight" in shapes:
        lm.hints[root + "img_in.weight"] = CONTROL_HINT
    add_text_encoder_routes(lm, shapes)


def add_text_encoder_routes(lm, shapes) -> None:
    from . import clip_tables  # the HF/OpenCLIP CLIP tables shared with SD

    clip_root = find_root(shapes, "transformer.text_model.final_layer_norm.weight", CLIP_ROOTS)
    if clip_root is not None:
        hf, native = clip_tables(shapes, clip_root)
        lm._add(CLIP_PREFIXES, hf)
    t5_root = t5.root(shapes)
    if t5_root is not None:
        lm._add(T5_PREFIXES, t5.table(shapes, t5_root))


# ---- the model holds diffusers names (FluxTransformer2DModel, FluxPipeline) ----------------------------------

def is_diffusers(names) -> bool:
    """Whether a diffusers transformer component (names relative to it) is a FluxTransformer2DModel."""
    return all(m in names for m in DIFFUSERS_MARKERS)


def add_diffusers_routes(lm, shapes, root: str = "transformer.") -> None:
    """Routes onto a diffusers Flux transformer under `root`: diffusers spellings directly, BFL spellings onto the
    same layers — a fused BFL module onto a virtual weight made of its diffusers parts (LayerMap.fuse)."""
    sizes = diffusers_sizes(shapes, root)
    modules = module_paths(shapes, root, DIT_WEIGHT_SUFFIXES)
    lm._add(DIFFUSERS_PREFIXES, native_table(shapes, root, "unet", DIT_WEIGHT_SUFFIXES, params=True))
    bfl: Table = {}
    slots: dict[str, Slot] = {}
    for rel in relations(sizes):
        if not all(p in modules for p in rel.parts):
            continue
        if rel.widths is None:
            w, b = modules[rel.parts[0]]
            slot = Slot(w, b, "unet", order=halves(shapes[w][0]) if rel.swap else None)
        else:
            w, b = lm.fuse([modules[p] for p in rel.parts])
            slot = Slot(w, b, "unet")
            for j, part in enumerate(rel.parts):  # OMI split indices name the parts themselves
                pw, pb = modules[part]
                bfl[underscore(f"{rel.bfl}.{j}")] = Slot(pw, pb, "unet")
        slots[rel.bfl] = bfl[underscore(rel.bfl)] = slot
        if rel.bfl.endswith("_norm"):  # the norm gain by its BFL parameter name (`.set_weight`/`.diff` keys)
            bfl[underscore(rel.bfl + ".scale")] = slot
    for alias, module, rows in bfl_aliases(sizes):
        slot = slots.get(module)
        if slot is not None and underscore(alias) not in bfl:
            bfl[underscore(alias)] = Slot(slot.weight, slot.bias, "unet", rows=rows)
    lm._add(BFL_PREFIXES, bfl)
    lm.hints[root + "x_embedder.weight"] = CONTROL_HINT


def add_diffusers_text_encoders(lm, shapes, components) -> None:
    from . import diffusers_clip_table

    if components.get("text_encoder") is not None:
        lm._add(CLIP_PREFIXES, diffusers_clip_table(shapes, "text_encoder"))
    if components.get("text_encoder_2") is not None:
        lm._add(T5_PREFIXES, t5.table(shapes, "text_encoder_2."))


# ---- whole-file spellings -------------------------------------------------------------------------------------

CONTROL_SIGNATURE = re.compile(r"(^|\.)img_in\.lora_A\.weight$")
NORM_SCALE = re.compile(r"_norm\.scale$")


def file_renames(keys) -> dict[str, str]:
    """Keys to respell before grouping: a BFL Control LoRA (FLUX.1 Canny/Depth-dev-lora: `img_in.lora_A.weight`
    beside raw `…_norm.scale` tensors) replaces those norm gains, i.e. `<key>.set_weight`."""
    keys = list(keys)
    if not any(CONTROL_SIGNATURE.search(k) for k in keys):
        return {}
    return {k: k + ".set_weight" for k in keys if NORM_SCALE.search(k)}


# ---- what inspect tells about a Flux file ---------------------------------------------------------------------

FUSED_KEY = re.compile(r"(img_attn[._]qkv|txt_attn[._]qkv|linear1)$")


def split_qkv_parts(key: str, patch) -> int | None:
    """How many splits a kohya `split_qkv=True` layer was trained as (3 for qkv, 4 for linear1), from its block-
    diagonal up (rows H per q/k/v, the rest mlp; columns rank/n each); None for any other layer."""
    m = FUSED_KEY.search(key)
    up, down = getattr(patch, "up", None), getattr(patch, "down", None)
    if not m or up is None or up.ndim != 2 or getattr(patch, "mid", None) is not None:
        return None
    parts = 4 if m.group(1) == "linear1" else 3
    rank, hidden = down.shape[0], down.shape[1]
    if rank % parts or up.shape[0] < 3 * hidden:
        return None
    r = rank // parts
    rows = [(j * hidden, (j + 1) * hidden) for j in range(3)] + ([(3 * hidden, up.shape[0])] if parts == 4 else [])
    if rows[-1][1] != up.shape[0]:
        return None
    mask = torch.ones_like(up, dtype=torch.bool)
    for j, (lo, hi) in enumerate(rows):
        mask[lo:hi, j * r:(j + 1) * r] = False
    return parts if not bool(up[mask].any()) else None


def describe(layers: dict) -> dict:
    """Flux-specific facts for `inspect`: kohya split-qkv layers, applied (as every host does) at alpha/(n·r) where
    training used alpha/r."""
    found = {}
    for key, patch in layers.items():
        parts = split_qkv_parts(key, patch)
        if parts:
            found[key] = (parts, patch.scale * parts)
    if not found:
        return {}
    return {"split_qkv": {
        "layers": len(found),
        "trained_scales": sorted({f"{s:g}" for _, s in found.values()}),
        "applied": "alpha / (3·r) on qkv, alpha / (4·r) on linear1, as Forge, ComfyUI, sd-scripts and diffusers load "
                   "it (kohya-ss/sd-scripts#2204): 1/3 and 1/4 of the training-time scale",
    }}
