"""Where each adapter layer lands in a model, and the plan that applies a list of adapters.

Lookup tables are built from the live model's own names (module path with `.` → `_`, behind each known prefix)
and from the diffusers↔ldm UNet table and the HF↔OpenCLIP text-encoder table; adapter keys are looked up,
never rebuilt by string surgery. Schemes: kohya (`lora_unet_`/`lora_te_`/`lora_te1_`/`lora_te2_`, diffusers or
sgm UNet spelling), kohya OFT `oft_unet_`, LyCORIS (same, and `lycoris_`), A1111/compvis and ldm names,
diffusers (`unet.`, `text_encoder.`, `text_encoder_2.`, processor spellings), PEFT (`base_model.model.`), and
OneTrainer (kohya names, its internal `lora_unet.<path>` / `lora_te1.<path>`, and OMI `unet.<sgm path>`,
`clip_l.`/`clip_g.`).

DiT families (Flux, SD3) have a naming module each (`naming/flux.py`, `naming/sd3.py`), listed in DIT_FAMILIES
and asked first by `for_checkpoint`/`for_diffusers`: `NAME`; `checkpoint_root(shapes)` (where its transformer lives in
a state dict, or None) and `add_checkpoint_routes(lm, shapes, root)`; `is_diffusers(names)`, `add_diffusers_routes(lm,
shapes)` and `add_diffusers_text_encoders(lm, shapes, components)`; optionally `file_renames(keys)` (whole-file
respellings before grouping). Tables give Slots with `rows`/`order` for fused weights; `LayerMap.fuse` makes a
virtual weight where the model keeps parts apart. Text encoders use the shared CLIP tables here and `naming/t5.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

from ..algorithms import DeltaPatch
from ..errors import AdapterError
from ..patching import Operation, Plan, Target
from . import flux, sd3
from .families import CROSS_ATTN_WIDTH
from .slots import Slot, Table, module_paths as _modules, shapes_of as _shapes, underscore as _underscore
from .text import openclip_to_hf
from .unet import (diffusers_to_ldm, layers_per_block_diffusers, layers_per_block_ldm, ldm_to_diffusers,
                   up_blocks_with_attention)

# Prefixes (already in `_` spelling) in front of UNet paths in ldm/sgm spelling and in diffusers spelling.
LDM_UNET_PREFIXES = ("model_diffusion_model_", "diffusion_model_", "lora_unet_", "oft_unet_", "lycoris_", "unet_", "")
DIFFUSERS_UNET_PREFIXES = ("lora_unet_", "oft_unet_", "lycoris_", "unet_", "base_model_model_", "")
# HF-layout text-encoder prefixes: (single encoder, SDXL encoder 0, SDXL encoder 1). `clip_l.`/`clip_g.` are
# OneTrainer's OMI spelling and ComfyUI/Forge's (`clip_l.transformer.text_model.…`).
_CLIP_L = ("clip_l_", "clip_l_transformer_")
_CLIP_G = ("clip_g_", "clip_g_transformer_")
TE_PREFIXES_SINGLE = ("lora_te_", "lora_te1_", "text_encoder_", "base_model_model_") + _CLIP_L
TE_PREFIXES_SDXL = (("lora_te1_", "lora_te_", "text_encoder_") + _CLIP_L, ("lora_te2_", "text_encoder_2_") + _CLIP_G)
UNET_ROOTS = ("model.diffusion_model.", "diffusion_model.")
# Text-encoder roots in a WebUI model → their SDXL slot (A1111 ldm/sgm names, Forge's HF-layout encoders).
TEXT_ENCODER_ROOTS = {"cond_stage_model.": 0, "conditioner.embedders.0.": 0, "conditioner.embedders.1.": 1,
                      "clip_l.": 0, "clip_h.": 0, "clip_g.": 1}
# Transformer (DiT) families, asked in order before the SD UNet tables.
DIT_FAMILIES = (flux, sd3)
DIT_FAMILY_NAMES = tuple(f.NAME for f in DIT_FAMILIES)

__all__ = ["DIT_FAMILIES", "LayerMap", "Slot", "build_plan"]


class LayerMap:
    """Adapter module key → model targets, for one model (a WebUI checkpoint or diffusers components)."""

    def __init__(self, family: str, shapes: dict[str, tuple[int, ...] | None]):
        self.family = family
        self.shapes = shapes
        self.routes: list[tuple[str, Table]] = []
        self.fused: dict[str, tuple[tuple[str, int, int], ...]] = {}  # virtual weight → (member, first, end row)
        self.hints: dict[str, str] = {}  # weight → what to add when an adapter's layer does not fit it
        self.detail = ""  # what a family module tells of the model beyond its family (SD3: variant and depth)

    def _add(self, prefixes: Iterable[str], table: Table) -> None:
        self.routes.extend((p, table) for p in prefixes)
        self.routes.sort(key=lambda r: -len(r[0]))

    def fuse(self, members: list[tuple[str, str | None]]) -> tuple[str, str | None]:
        """A virtual weight (and bias) made of `members` [(weight, bias)] stacked by rows, for adapters that train
        one fused layer where this model has several (BFL `img_attn.qkv` on diffusers to_q/to_k/to_v); read and
        written through `patching.FusedStore`. Returns the virtual (weight, bias) names."""
        names = []
        for kind, index in (("weight", 0), ("bias", 1)):
            parts, lo = [], 0
            if any(m[index] is None for m in members):
                names.append(None)
                continue
            for member in members:
                rows = self.shapes[member[0]][0]
                parts.append((member[index], lo, lo + rows))
                lo += rows
            name = "+".join(m[index] for m in members)
            self.fused[name] = tuple(parts)
            first = self.shapes[members[0][index]]
            self.shapes[name] = (lo, *first[1:])
            names.append(name)
        return names[0], names[1]

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def for_checkpoint(cls, keys) -> "LayerMap":
        """A WebUI model by its state-dict names (A1111 single-file naming, or Forge's `diffusion_model.` and
        `clip_l.`/`clip_g.`/`clip_h.` HF-layout encoders); `keys` may be a mapping name → tensor/shape (shapes
        enable fit checks, and give fused q/k/v widths when a patch does not tell its own)."""
        shapes = _shapes(keys)
        for family in DIT_FAMILIES:
            root = family.checkpoint_root(shapes)
            if root is not None:
                lm = cls(family.NAME, shapes)
                family.add_checkpoint_routes(lm, shapes, root)
                return lm
        lm = cls(_checkpoint_family(shapes), shapes)
        unet_root = next((r for r in UNET_ROOTS if any(k.startswith(r) for k in shapes)), UNET_ROOTS[0])
        unet = _modules(shapes, unet_root)
        layers = layers_per_block_ldm(unet)
        native, diffusers = {}, {}
        for rel, (w, b) in unet.items():
            slot = Slot(w, b, "unet")
            native[_underscore(rel)] = slot
            dpath = ldm_to_diffusers(rel, layers)
            if dpath is not None:
                diffusers[_underscore(dpath)] = slot
        lm._add(LDM_UNET_PREFIXES, native)
        lm._add(DIFFUSERS_UNET_PREFIXES, diffusers)
        roots = [r for r in TEXT_ENCODER_ROOTS if any(k.startswith(r) for k in shapes)]
        sdxl = len(roots) > 1
        for root in roots:
            index = TEXT_ENCODER_ROOTS[root] if sdxl else 0
            hf, native = clip_tables(shapes, root)
            lm._add(TE_PREFIXES_SDXL[index] if sdxl else TE_PREFIXES_SINGLE, hf)
            native_prefixes = [_underscore(root)]
            if root.startswith(("cond_stage_model.", "conditioner.")):
                native_prefixes += [f"{index}_", ""] if sdxl else [""]
            lm._add(native_prefixes, native)
        return lm

    @classmethod
    def for_diffusers(cls, components: Mapping[str, object]) -> "LayerMap":
        """diffusers components {"unet"|"transformer": keys, "text_encoder": keys, "text_encoder_2": keys, …};
        targets are named "<component>.<param>" (keys may be names or mappings name → tensor/shape)."""
        shapes: dict[str, tuple[int, ...] | None] = {}
        for comp, keys in components.items():
            if keys is not None:
                shapes.update({f"{comp}.{k}": s for k, s in _shapes(keys).items()})
        if components.get("transformer") is not None:
            names = set(_shapes(components["transformer"]))
            for family in DIT_FAMILIES:
                if family.is_diffusers(names):
                    lm = cls(family.NAME, shapes)
                    family.add_diffusers_routes(lm, shapes)
                    family.add_diffusers_text_encoders(lm, shapes, components)
                    return lm
        lm = cls(_diffusers_family(shapes, components), shapes)
        if components.get("unet") is not None:
            unet = _modules(shapes, "unet.")
            layers = layers_per_block_diffusers(unet)
            up_attn = up_blocks_with_attention(unet)
            native, ldm = {}, {}
            for rel, (w, b) in unet.items():
                slot = Slot(w, b, "unet")
                native[_underscore(rel)] = slot
                lpath = diffusers_to_ldm(rel, layers, up_attn)
                if lpath is not None:
                    ldm[_underscore(lpath)] = slot
            lm._add(DIFFUSERS_UNET_PREFIXES, native)
            lm._add(LDM_UNET_PREFIXES, ldm)
        sdxl = components.get("text_encoder_2") is not None
        for index, comp in enumerate(("text_encoder", "text_encoder_2")):
            if components.get(comp) is None:
                continue
            table = diffusers_clip_table(shapes, comp, with_transformer=not sdxl)
            lm._add(TE_PREFIXES_SDXL[index] if sdxl else TE_PREFIXES_SINGLE + ("cond_stage_model_",), table)
        return lm

    # ---- lookup -------------------------------------------------------------------------------------------

    def slot(self, module_key: str) -> Slot | None:
        """The model layer an adapter module key names, or None."""
        key = _underscore(module_key)
        for prefix, table in self.routes:
            if key.startswith(prefix):
                found = table.get(key[len(prefix):])
                if found is not None:
                    return found
        return None

    def resolve(self, module_key: str, patch=None) -> list[Target]:
        """Targets of one adapter layer; [] when it matches no layer (or a fused part's width is unknowable)."""
        slot = self.slot(module_key)
        if slot is None:
            return []
        rows = slot.rows
        if slot.part is not None:
            width = self._part_width(slot, patch)
            if width is None:
                return []
            rows = (slot.part * width, (slot.part + 1) * width)
        return [Target(slot.weight, slot.bias, rows, slot.component, order=slot.order)]

    def _part_width(self, slot: Slot, patch) -> int | None:
        shape = self.shapes.get(slot.weight)
        if shape:
            return shape[0] // 3
        for attr in ("out_dim", "in_dim"):
            width = getattr(patch, attr, None)
            if width:
                return int(width)
        vector = getattr(patch, "scale_vector", None)
        return int(vector.numel()) if vector is not None else None

    def widen_input(self, target: Target, patch) -> Target:
        """An additive adapter trained on a 4-channel `conv_in` patches the leading input channels of an inpainting
        (9-channel) or instruct (8-channel) UNet, as A1111 does by zero-padding ΔW."""
        shape = self.shapes.get(target.weight)
        in_dim = getattr(patch, "in_dim", None)
        first_conv = target.weight.endswith(("input_blocks.0.0.weight", "conv_in.weight")) and target.component == "unet"
        if not (first_conv and shape and len(shape) == 4 and in_dim and isinstance(patch, DeltaPatch)):
            return target
        kernel = shape[2] * shape[3]
        channels = in_dim if in_dim < shape[1] else in_dim // kernel if in_dim % kernel == 0 else shape[1]
        return dataclasses.replace(target, cols=(0, channels)) if channels < shape[1] else target

    def check_fits(self, path: str, module_key: str, patch, target: Target, family: str = "unknown") -> None:
        """Refuse a layer whose tensors do not fit the target weight (an adapter for another model)."""
        shape = self.shapes.get(target.weight)
        if not shape:
            return
        rows = target.rows[1] - target.rows[0] if target.rows else shape[0]
        out_dim, in_dim = getattr(patch, "out_dim", None), getattr(patch, "in_dim", None)
        bad_out = out_dim is not None and out_dim != rows
        if target.cols:
            shape = (shape[0], target.cols[1] - target.cols[0], *shape[2:])
        bad_in = in_dim is not None and len(shape) > 1 and in_dim not in (shape[1], math.prod(shape[1:]))
        if bad_out or bad_in:
            hint = self.hints.get(target.weight)
            why = hint if hint and bad_in and not bad_out else \
                f"an adapter for another model (adapter family {family}, model {self.family})"
            raise AdapterError(path, f"layer {module_key!r} ({out_dim}×{in_dim}) does not fit {target.weight} "
                                     f"{list(shape)}{' rows ' + str(target.rows) if target.rows else ''}: {why}")


def diffusers_clip_table(shapes, comp: str, with_transformer: bool = False) -> Table:
    """An HF CLIP diffusers component by its paths, with and without `text_model.` (and `transformer.text_model.`
    for the single-encoder families, as A1111 names spell it)."""
    table: Table = {}
    for rel, (w, b) in _modules(shapes, comp + ".").items():
        rel = rel[len("text_model."):] if rel.startswith("text_model.") else rel
        slot = Slot(w, b, "te")
        table[_underscore(rel)] = table[_underscore("text_model." + rel)] = slot
        if with_transformer:
            table[_underscore("transformer.text_model." + rel)] = slot
    return table


def clip_tables(shapes, root: str) -> tuple[Table, Table]:
    """(HF-spelled table, native-spelled table) for the text encoder under `root` (HF CLIP or OpenCLIP layout)."""
    hf: Table = {}
    native: Table = {}
    hf_root = root + "transformer.text_model."
    for rel, (w, b) in _modules(shapes, hf_root).items():
        slot = Slot(w, b, "te")
        hf[_underscore(rel)] = hf[_underscore("text_model." + rel)] = slot
        native[_underscore("transformer.text_model." + rel)] = slot
    projection = root + "transformer.text_projection.weight"
    if projection in shapes:  # HF CLIPTextModelWithProjection / Forge's added projection (OneTrainer trains it)
        hf["text_projection"] = native["transformer_text_projection"] = Slot(projection, None, "te")
    oc_root = root + "model."
    for rel, (w, b) in _modules(shapes, oc_root).items():
        if rel.endswith("attn") and w.endswith("in_proj_weight"):
            native[_underscore("model." + rel)] = Slot(w, b, "te")
        for hf_path, part in openclip_to_hf(rel):
            slot = Slot(w, b, "te", part)
            hf[_underscore(hf_path)] = hf[_underscore("text_model." + hf_path)] = slot
            native[_underscore("model." + rel + (f".{hf_path.rsplit('.', 1)[1]}" if part is not None else ""))] = slot
        if not openclip_to_hf(rel):
            native[_underscore("model." + rel)] = Slot(w, b, "te")
    return hf, native


def _width_family(shapes) -> str:
    for name, shape in shapes.items():
        if shape and name.endswith("attn2.to_k.weight") and len(shape) == 2 and shape[1] in CROSS_ATTN_WIDTH:
            return CROSS_ATTN_WIDTH[shape[1]]
    return "unknown"


def _checkpoint_family(shapes) -> str:
    names = shapes.keys()
    has = lambda *prefixes: any(k.startswith(prefixes) for k in names)  # noqa: E731
    if has("conditioner.embedders.1.", "clip_g.", *(r + "label_emb." for r in UNET_ROOTS)):
        return "sdxl"
    if has("cond_stage_model.model.", "clip_h."):
        return "sd2"
    if has("cond_stage_model.transformer.", "clip_l."):
        return "sd1"
    return _width_family(shapes)


def _diffusers_family(shapes, components) -> str:
    if components.get("text_encoder_2") is not None or any(k.startswith("unet.add_embedding.") for k in shapes):
        return "sdxl"
    family = _width_family(shapes)
    if family != "unknown":
        return family
    for name, shape in shapes.items():
        if shape and name.startswith("text_encoder.") and name.endswith("q_proj.weight"):
            return {768: "sd1", 1024: "sd2"}.get(shape[1], "unknown")
    return "unknown"


def _source(adapter, key: str) -> str:
    mtime = adapter.header.mtime if getattr(adapter, "header", None) is not None else id(adapter)
    return f"{adapter.path}|{mtime}|{key}"


def check_family(adapter, layer_map: LayerMap) -> None:
    """AdapterError when the adapter was made for another model family than the model's."""
    a, m = getattr(adapter, "family", "unknown"), layer_map.family
    if a not in ("unknown", None) and m != "unknown" and a != m:
        raise AdapterError(adapter.path, f"is an adapter for {a}, the model is {m}")


def build_plan(entries, layer_map: LayerMap) -> tuple[Plan, dict[str, list[str]]]:
    """entries: [(Adapter, unet_strength, te_strength[, blocks])] in prompt order → (plan, {adapter path:
    unmatched keys}); `blocks` (e.g. `blocks.BlockWeights`) multiplies each layer's strength by `blocks.of(weight)`.

    Raises AdapterError for an adapter of another family, a layer that does not fit its weight, or an adapter
    none of whose layers match the model. Zero-strength operations are left out of the plan.
    """
    plan: Plan = {}
    unmatched: dict[str, list[str]] = {}
    in_order: list[Operation] = []
    for adapter, unet_strength, te_strength, *rest in entries:
        blocks = rest[0] if rest else None
        for what, value in (("UNet", unet_strength), ("text-encoder", te_strength)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise AdapterError(adapter.path, f"the {what} strength {value!r} is not a finite number")
        check_family(adapter, layer_map)
        missing = []
        ops = []
        for key, patch in adapter.layers.items():
            targets = layer_map.resolve(key, patch)
            if not targets:
                missing.append(key)
                continue
            for target in targets:
                target = layer_map.widen_input(target, patch)
                layer_map.check_fits(adapter.path, key, patch, target, getattr(adapter, "family", "unknown"))
                strength = unet_strength if target.component == "unet" else te_strength
                if blocks is not None:
                    strength = strength * blocks.of(target.weight)
                if strength:
                    ops.append(Operation(patch, float(strength), target, _source(adapter, key)))
        if adapter.layers and len(missing) == len(adapter.layers):
            raise AdapterError(adapter.path, f"none of its {len(missing)} layers match this {layer_map.family} model "
                                             f"(e.g. {missing[0]!r}): an adapter for another model?")
        for op in ops:
            plan.setdefault(op.target.weight, []).append(op)
        in_order.extend(ops)
        unmatched[adapter.path] = sorted(missing)
    _gather_fused(plan, layer_map, {id(op): i for i, op in enumerate(in_order)})
    return plan, unmatched


def _gather_fused(plan: Plan, layer_map: LayerMap, order: dict[int, int]) -> None:
    """Where a plan patches a virtual fused weight, operations on its members move onto it (rows shifted), so
    every operation on those rows runs in prompt order (`order`: id → rank) on one tensor; members patched alone
    stay as they are."""
    for virtual in [name for name in plan if name in layer_map.fused]:
        bias = next((op.target.bias for op in plan[virtual]), None)
        moved = list(plan[virtual])
        for member, lo, hi in layer_map.fused[virtual]:
            for op in plan.pop(member, []):
                a, b = op.target.rows or (0, hi - lo)
                target = dataclasses.replace(op.target, weight=virtual, bias=bias, rows=(lo + a, lo + b))
                moved.append(dataclasses.replace(op, target=target))
                order[id(moved[-1])] = order[id(op)]
        plan[virtual] = sorted(moved, key=lambda op: order[id(op)])
