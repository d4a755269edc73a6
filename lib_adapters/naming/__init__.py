"""Where each adapter layer lands in a model, and the plan that applies a list of adapters.

Lookup tables are built from the live model's own names (module path with `.` → `_`, behind each known prefix)
and from the diffusers↔ldm UNet table and the HF↔OpenCLIP text-encoder table; adapter keys are looked up,
never rebuilt by string surgery. Schemes: kohya (`lora_unet_`/`lora_te_`/`lora_te1_`/`lora_te2_`, diffusers or
sgm UNet spelling), kohya OFT `oft_unet_`, LyCORIS (same, and `lycoris_`), A1111/compvis and ldm names,
diffusers (`unet.`, `text_encoder.`, `text_encoder_2.`, processor spellings), PEFT (`base_model.model.`), and
OneTrainer (kohya names, its internal `lora_unet.<path>` / `lora_te1.<path>`, and OMI `unet.<sgm path>`,
`clip_l.`/`clip_g.`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..algorithms import DeltaPatch
from ..errors import AdapterError
from ..patching import Operation, Plan, Target
from .families import CROSS_ATTN_WIDTH
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

__all__ = ["LayerMap", "Slot", "build_plan"]


@dataclass(frozen=True)
class Slot:
    """One patchable layer of the model: its weight (and bias), which strength applies, the q/k/v part if fused."""

    weight: str
    bias: str | None
    component: str
    part: int | None = None


Table = dict[str, Slot]


def _underscore(path: str) -> str:
    return path.replace(".", "_")


def _shapes(keys) -> dict[str, tuple[int, ...] | None]:
    """Names → shapes, from a mapping of tensors/shapes or from bare names (shapes unknown)."""
    if isinstance(keys, Mapping):
        return {k: tuple(v.shape) if hasattr(v, "shape") else (tuple(v) if v is not None else None)
                for k, v in keys.items()}
    return {k: None for k in keys}


def _modules(names: Iterable[str], root: str) -> dict[str, tuple[str, str | None]]:
    """Module path (relative to `root`) → (weight name, bias name or None) for every weight under `root`.

    OpenCLIP's fused attention counts as the module `…attn` with `in_proj_weight` / `in_proj_bias`.
    """
    names = set(names)
    found = {}
    for name in names:
        if not name.startswith(root):
            continue
        rel = name[len(root):]
        for weight_suffix, bias_suffix in ((".weight", ".bias"), (".in_proj_weight", ".in_proj_bias")):
            if rel.endswith(weight_suffix):
                module = rel[: -len(weight_suffix)]
                bias = root + module + bias_suffix
                found[module] = (name, bias if bias in names else None)
    return found


class LayerMap:
    """Adapter module key → model targets, for one model (a WebUI checkpoint or diffusers components)."""

    def __init__(self, family: str, shapes: dict[str, tuple[int, ...] | None]):
        self.family = family
        self.shapes = shapes
        self.routes: list[tuple[str, Table]] = []

    def _add(self, prefixes: Iterable[str], table: Table) -> None:
        self.routes.extend((p, table) for p in prefixes)
        self.routes.sort(key=lambda r: -len(r[0]))

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def for_checkpoint(cls, keys) -> "LayerMap":
        """A WebUI model by its state-dict names (A1111 single-file naming, or Forge's `diffusion_model.` and
        `clip_l.`/`clip_g.`/`clip_h.` HF-layout encoders); `keys` may be a mapping name → tensor/shape (shapes
        enable fit checks, and give fused q/k/v widths when a patch does not tell its own)."""
        shapes = _shapes(keys)
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
            hf, native = _text_encoder_tables(shapes, root)
            lm._add(TE_PREFIXES_SDXL[index] if sdxl else TE_PREFIXES_SINGLE, hf)
            native_prefixes = [_underscore(root)]
            if root.startswith(("cond_stage_model.", "conditioner.")):
                native_prefixes += [f"{index}_", ""] if sdxl else [""]
            lm._add(native_prefixes, native)
        return lm

    @classmethod
    def for_diffusers(cls, components: Mapping[str, object]) -> "LayerMap":
        """diffusers components {"unet": keys, "text_encoder": keys, "text_encoder_2": keys}; targets are
        named "<component>.<param>" (keys may be names or mappings name → tensor/shape, as for_checkpoint)."""
        shapes: dict[str, tuple[int, ...] | None] = {}
        for comp, keys in components.items():
            if keys is not None:
                shapes.update({f"{comp}.{k}": s for k, s in _shapes(keys).items()})
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
            table = {}
            for rel, (w, b) in _modules(shapes, comp + ".").items():
                rel = rel[len("text_model."):] if rel.startswith("text_model.") else rel
                slot = Slot(w, b, "te")
                table[_underscore(rel)] = table[_underscore("text_model." + rel)] = slot
                if not sdxl:
                    table[_underscore("transformer.text_model." + rel)] = slot
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
        rows = None
        if slot.part is not None:
            width = self._part_width(slot, patch)
            if width is None:
                return []
            rows = (slot.part * width, (slot.part + 1) * width)
        return [Target(slot.weight, slot.bias, rows, slot.component)]

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
            raise AdapterError(path, f"layer {module_key!r} ({out_dim}×{in_dim}) does not fit {target.weight} "
                                     f"{list(shape)}{' rows ' + str(target.rows) if target.rows else ''}: "
                                     f"an adapter for another model (adapter family {family}, model {self.family})")


def _text_encoder_tables(shapes, root: str) -> tuple[Table, Table]:
    """(HF-spelled table, native-spelled table) for the text encoder under `root` (HF CLIP or OpenCLIP layout)."""
    hf: Table = {}
    native: Table = {}
    hf_root = root + "transformer.text_model."
    for rel, (w, b) in _modules(shapes, hf_root).items():
        slot = Slot(w, b, "te")
        hf[_underscore(rel)] = hf[_underscore("text_model." + rel)] = slot
        native[_underscore("transformer.text_model." + rel)] = slot
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
    """entries: [(Adapter, unet_strength, te_strength)] in prompt order → (plan, {adapter path: unmatched keys}).

    Raises AdapterError for an adapter of another family, a layer that does not fit its weight, or an adapter
    none of whose layers match the model. Zero-strength operations are left out of the plan.
    """
    plan: Plan = {}
    unmatched: dict[str, list[str]] = {}
    for adapter, unet_strength, te_strength in entries:
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
                if strength:
                    ops.append(Operation(patch, float(strength), target, _source(adapter, key)))
        if adapter.layers and len(missing) == len(adapter.layers):
            raise AdapterError(adapter.path, f"none of its {len(missing)} layers match this {layer_map.family} model "
                                             f"(e.g. {missing[0]!r}): an adapter for another model?")
        for op in ops:
            plan.setdefault(op.target.weight, []).append(op)
        unmatched[adapter.path] = sorted(missing)
    return plan, unmatched
