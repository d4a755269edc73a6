"""`convert` for SD3/SD3.5: kohya/LyCORIS SAI names (fused `qkv`, SAI's
(shift, scale) modulation order) ↔ diffusers/PEFT names (to_q/to_k/to_v, diffusers' (scale, shift)); LoRA, LoCon
and DoRA on the output axis.

Names come from two reference layer maps of a meta-device model as wide as the adapter (one diffusers-named, one
SAI-named), so every spelling the loader reads converts. A fused layer splits into its row blocks (the same down,
its rows of up); parts of one fused layer stack back — with one shared down and scale into exactly the original
layer, otherwise with stacked downs and a block-diagonal up carrying each part's scale; swapped halves are reordered.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import torch

from .adapter import Adapter
from .algorithms import kind_name
from .errors import AdapterError
from .files import DTYPE_NAMES, DTYPES
from .keys import group_keys

LAYOUTS = {"lora", "locon"}
DIFFUSERS_NAMES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
KOHYA_NAMES = {"lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight"}
KOHYA_ROOTS = {"model.diffusion_model.": "lora_unet_", "text_encoders.clip_l.transformer.": "lora_te1_",
               "text_encoders.clip_g.transformer.": "lora_te2_", "text_encoders.t5xxl.transformer.": "lora_te3_"}
# Block layers whose input is the transformer's width (attention, modulation), in either spelling.
WIDTH_LAYERS = re.compile(r"(joint_blocks|transformer_blocks)[._]\d+[._].*(attn2?[._](qkv|proj|to_[qkv]|"
                          r"add_[qkv]_proj|to_out|to_add_out)|adaLN_modulation|norm1(_context)?[._]linear)")
TEXT_ONLY_WIDTH = 1536  # a file without transformer layers needs the text encoders' names only


def reference_maps(adapter: Adapter):
    """(diffusers-named LayerMap, SAI-named LayerMap) of a full SD3 model as wide as the adapter's blocks."""
    from .models.sd3 import reference_shapes
    from .naming import LayerMap

    widths = {p.in_dim for k, p in adapter.layers.items() if WIDTH_LAYERS.search(k)}
    if len(widths) > 1 or None in widths:
        raise AdapterError(adapter.path, f"cannot tell the SD3 model's width from the file (block input widths "
                                         f"{sorted(w for w in widths if w)}); not converted")
    try:
        shapes = reference_shapes(widths.pop() if widths else TEXT_ONLY_WIDTH)
    except ValueError as e:
        raise AdapterError(adapter.path, f"{e}; not converted") from None
    return LayerMap.for_diffusers(shapes["diffusers"]), LayerMap.for_checkpoint(shapes["checkpoint"])


def _place(t: torch.Tensor, order) -> torch.Tensor:
    """Rows of `t` (in the adapter's order) put where `order` says they lie in the target (Target.order)."""
    if order is None:
        return t
    out = torch.empty_like(t)
    at = 0
    for a, b in order:
        out[a:b] = t[at:at + b - a]
        at += b - a
    return out


def _check_layer(path: str, module: str, patch) -> None:
    inner = getattr(patch, "inner", patch)
    algo = kind_name(patch)
    if patch is None or algo not in LAYOUTS or getattr(inner, "mid", None) is not None \
            or getattr(inner, "extra", None) is not None or getattr(inner, "up_bias", None) is not None:
        raise AdapterError(path, f"layer {module!r} is {algo if patch is not None else 'not an adapter layer'}: a "
                                 "transformer model's layers convert as LoRA/LoCon/DoRA only; not converted")
    if getattr(patch, "magnitude", None) is not None and not patch.on_output:
        raise AdapterError(path, f"layer {module!r}: DoRA on the input axis has no PEFT/diffusers form "
                                 "(PEFT normalises output rows); not converted")


def _magnitude(params: dict) -> torch.Tensor | None:
    """The DoRA magnitude (one value per output row) in either spelling, flat; None without DoRA."""
    t = params.get("dora_scale", params.get("lora_magnitude_vector"))
    return None if t is None else t.reshape(-1)


def to_diffusers(path: str, tensors: dict, metadata: dict, target: str, fold_scale: bool) -> tuple[dict, dict]:
    """(tensors, metadata) in diffusers/PEFT names (`transformer.`, `text_encoder[_2|_3].`), scales in
    `lora_adapter_metadata` (or folded into B); fused SAI layers split into their diffusers parts."""
    from .convert import HINT_KEY, _peft_config, effective_alpha, refuse_unmatched

    adapter = Adapter.from_tensors(tensors, metadata, path)
    layer_map, _ = reference_maps(adapter)
    groups, unmatched = group_keys(tensors)
    refuse_unmatched(path, unmatched)
    out: dict[str, torch.Tensor] = {}
    configs: dict[str, dict] = defaultdict(dict)
    dora: dict[str, set] = defaultdict(set)
    hint = {"alpha_dtype": None, "no_alpha": [], "zero_alpha": [], "keys": {}}
    for module, params in groups.items():
        patch = adapter.layers.get(module)
        _check_layer(path, module, patch)
        found = layer_map.resolve(module, patch)
        if not found or found[0].rows is not None:
            raise AdapterError(path, f"layer {module!r} matches no layer of an SD3 model; not converted")
        t = found[0]
        inner = getattr(patch, "inner", patch)
        rank, alpha = inner.rank, effective_alpha(inner)
        if "alpha" in params:
            hint["alpha_dtype"] = DTYPE_NAMES[params["alpha"].dtype]
            if not float(params["alpha"]):
                hint["zero_alpha"].append(module)
        elif adapter.key_format in ("kohya", "lycoris"):
            hint["no_alpha"].append(module)
        up = _place(params["lora_up.weight"], t.order)
        if fold_scale:
            up = (up.float() * (alpha / rank)).to(up.dtype)
        magnitude = _magnitude(params)
        magnitude = _place(magnitude, t.order) if magnitude is not None else None
        for member, lo, hi in layer_map.fused.get(t.weight, ((t.weight, 0, up.shape[0]),)):
            name = member.removesuffix(".weight")
            comp, _, rel = name.partition(".")
            out[f"{name}.lora_A.weight"] = params["lora_down.weight"].clone()
            out[f"{name}.lora_B.weight"] = up[lo:hi].clone()
            if magnitude is not None:
                out[f"{name}.lora_magnitude_vector"] = magnitude[lo:hi].clone()
                dora[comp].add(rel)
            configs[comp][rel.removeprefix("text_model.")] = (rank, float(rank) if fold_scale else alpha)
            hint["keys"][name] = module
    for comp, layers in dora.items():
        if len(layers) != len(configs[comp]):
            raise AdapterError(path, f"{comp}: DoRA on {len(layers)} of {len(configs[comp])} layers; PEFT's use_dora "
                                     "covers every layer of a component, so this mix cannot be written")
    meta = {k: v for k, v in metadata.items() if k not in (HINT_KEY, "lora_adapter_metadata")}
    added = [k for k in ("format", "lora_adapter_metadata") if k not in metadata]
    peft_meta = {f"{comp}.{k}": v for comp, modules in configs.items()
                 for k, v in _peft_config(modules, bool(dora.get(comp))).items()}
    meta["format"] = metadata.get("format", "pt")
    meta["lora_adapter_metadata"] = json.dumps(peft_meta, sort_keys=True)
    if adapter.key_format in ("kohya", "lycoris") and not fold_scale:
        hint["added"] = added
        meta[HINT_KEY] = json.dumps(hint, sort_keys=True)
    return out, meta


def _kohya_key(weight: str) -> str:
    root = next(r for r in KOHYA_ROOTS if weight.startswith(r))
    return KOHYA_ROOTS[root] + weight[len(root):].removesuffix(".weight").replace(".", "_")


def _stack(path: str, weight: str, rows: int, parts: list) -> dict[str, torch.Tensor]:
    """One fused layer from its row-block parts [(lo, hi, module, params, rank, alpha)]: the original layer when the
    parts share one down and scale and cover every row; else stacked downs and a block-diagonal up (scales folded)."""
    parts = sorted(parts, key=lambda p: p[0])
    if any(a[1] > b[0] for a, b in zip(parts, parts[1:])):
        raise AdapterError(path, f"layers {[p[2] for p in parts]} overlap in {weight}; not converted")
    downs = [p[3]["lora_down.weight"] for p in parts]
    magnitudes = [_magnitude(p[3]) for p in parts]
    if any(m is not None for m in magnitudes) and (any(m is None for m in magnitudes)
                                                   or sum(p[1] - p[0] for p in parts) != rows):
        raise AdapterError(path, f"{weight}: DoRA on only some of its q/k/v parts has no single-layer form; "
                                 "not converted")
    ups = [p[3]["lora_up.weight"] for p in parts]
    covers = parts[0][0] == 0 and parts[-1][1] == rows and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    shared = covers and all(torch.equal(d, downs[0]) for d in downs) and len({(p[4], p[5]) for p in parts}) == 1
    out = {}
    if shared:
        out["lora_down.weight"], out["lora_up.weight"] = downs[0], torch.cat(ups)
        alpha = parts[0][5]
    else:
        total = sum(p[4] for p in parts)
        up = torch.zeros(rows, total, *ups[0].shape[2:], dtype=torch.float32)
        col = 0
        for (lo, hi, _, _, rank, alpha), u in zip(parts, ups):
            up[lo:hi, col:col + rank] = u.float() * (alpha / rank)
            col += rank
        dtype = ups[0].dtype
        out["lora_down.weight"] = torch.cat([d.to(dtype) for d in downs])
        out["lora_up.weight"] = up.to(dtype)
        alpha = float(total)
    if magnitudes[0] is not None:
        out["dora_scale"] = torch.cat(magnitudes).reshape(-1, 1)
    out["alpha"] = torch.tensor(alpha)
    return out


def to_kohya(path: str, tensors: dict, metadata: dict) -> tuple[dict, dict]:
    """(tensors, metadata) in kohya SAI names (`lora_unet_joint_blocks_…`, `lora_te1/2/3_…`) with an `alpha` per
    layer; diffusers q/k/v parts stack into the fused layer."""
    from .convert import HINT_KEY, effective_alpha, refuse_unmatched

    adapter = Adapter.from_tensors(tensors, metadata, path)
    _, layer_map = reference_maps(adapter)
    try:
        hint = json.loads(metadata.get(HINT_KEY) or "{}")
    except json.JSONDecodeError:
        hint = {}
    alpha_dtype = DTYPES.get(hint.get("alpha_dtype") or "", None)
    groups, unmatched = group_keys(tensors)
    refuse_unmatched(path, unmatched)
    by_weight: dict[str, list] = defaultdict(list)
    for module, params in groups.items():
        patch = adapter.layers.get(module)
        _check_layer(path, module, patch)
        found = layer_map.resolve(module, patch)
        if not found:
            raise AdapterError(path, f"layer {module!r} matches no layer of an SD3 model; not converted")
        by_weight[found[0].weight].append((found[0], module, params, patch))
    out: dict[str, torch.Tensor] = {}
    for weight, items in by_weight.items():
        rows = layer_map.shapes[weight][0]
        if len(items) == 1 and items[0][0].rows is None:
            t, module, params, patch = items[0]
            inner = getattr(patch, "inner", patch)
            layer = {"lora_down.weight": params["lora_down.weight"],
                     "lora_up.weight": _place(params["lora_up.weight"], t.order)}
            magnitude = _magnitude(params)
            if magnitude is not None:
                layer["dora_scale"] = _place(magnitude, t.order).reshape(-1, 1)
            layer["alpha"] = torch.tensor(effective_alpha(inner))
            sources = [module]
        else:
            parts = []
            for t, module, params, patch in items:
                inner = getattr(patch, "inner", patch)
                lo, hi = t.rows if t.rows is not None else (0, rows)
                parts.append((lo, hi, module, params, inner.rank, effective_alpha(inner)))
            layer = _stack(path, weight, rows, parts)
            sources = [p[2] for p in parts]
        original = {hint.get("keys", {}).get(s.removesuffix(".weight")) for s in sources} - {None}
        key = original.pop() if len(original) == 1 else _kohya_key(weight)
        for param, v in layer.items():
            if param == "alpha":
                if key in hint.get("no_alpha", ()):
                    continue
                v = torch.tensor(0.0) if key in hint.get("zero_alpha", ()) else v
                v = v.to(alpha_dtype or torch.float32)
            out[f"{key}.{param}"] = v.contiguous()
    meta = {k: v for k, v in metadata.items() if k != HINT_KEY}
    for k in hint.get("added", ["lora_adapter_metadata"]):
        meta.pop(k, None)
    return out, meta

