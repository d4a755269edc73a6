"""`python -m lib_adapters convert IN OUT --to diffusers|peft|kohya`: adapter files between naming schemes.

LoRA/LoCon/DoRA go both ways: kohya `lora_down/lora_up` + `alpha` ↔ diffusers/PEFT `lora_A/lora_B`, the scale
carried in `lora_adapter_metadata` (alpha_pattern/rank_pattern, exact) or folded into B (`--fold-scale`). LoHa/LoKr
go to PEFT's own layouts (`--to peft`); what PEFT or diffusers cannot represent is refused (AdapterError). Metadata
(ss_*, modelspec.*) is kept; kohya → diffusers → kohya gives back the same tensors and metadata.
Names are found through the naming tables (LayerMap) of a reference model built from the shipped configs; SD3
files (fused q/k/v, swapped modulations) go through `convert_sd3`, Flux files (kohya-Flux ↔ diffusers-Flux, fused
layers split and joined exactly) through `convert_flux`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch

from . import convert_sd3
from .adapter import BUNDLED_EMBEDDING_PREFIX, Adapter
from .algorithms import kind_name
from .algorithms.base import rank_scale
from .errors import AdapterError
from .files import DTYPE_NAMES, DTYPES, load_tensors, read_header, refuse_same_file, save_tensors
from .keys import group_keys

TARGETS = ("diffusers", "peft", "kohya")
FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
FIRST_FACTORS = ("lora_up.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")  # scaling one factor scales ΔW
HINT_KEY = "lib_adapters.kohya_source"  # what a kohya → diffusers/peft conversion needs to come back exactly
PEFT_LAYOUTS = {"lora", "locon", "loha", "lokr"}
DIFFUSERS_LAYOUTS = {"lora", "locon"}
TE_COMPONENTS = ("text_encoder", "text_encoder_2")
PEFT_NAMES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
              "lora_magnitude_vector": "lora_magnitude_vector"}
KOHYA_NAMES = {"lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight",
               "lora_magnitude_vector": "dora_scale"}


def effective_alpha(inner) -> float:
    """The alpha that gives the layer's actual scale with a plain alpha / rank: rsLoRA and explicit `scale`
    keys are folded in (a missing or zero alpha means scale 1, i.e. alpha = rank)."""
    if getattr(inner, "scale_override", None) is None and getattr(inner, "alpha_value", None):
        return inner.alpha_value  # exactly as stored: no round trip through alpha / rank
    scale = rank_scale(getattr(inner, "alpha_value", None), inner.rank, getattr(inner, "scale_override", None))
    return scale * inner.rank


@lru_cache(maxsize=3)
def reference_model(family: str):
    """(LayerMap, {component: module paths}) of a full-size diffusers model of `family`, built on the meta
    device from the shipped configs (names and shapes only, no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .configs import config_dir, load_config
    from .naming import LayerMap

    comps = {}
    with torch.device("meta"):
        comps["unet"] = UNet2DConditionModel.from_config(load_config(family, "unet"))
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (config_dir(family) / name).is_dir():
                cfg = {k: v for k, v in load_config(family, name).items() if k not in ("architectures",)}
                comps[name] = cls(CLIPTextConfig(**cfg))
    shapes = {name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for name, m in comps.items()}
    return LayerMap.for_diffusers(shapes), {name: set(s) for name, s in shapes.items()}


def kohya_names(family: str) -> dict[str, str]:
    """Diffusers module ("unet.<path>", "text_encoder.text_model.<path>") → kohya module key: UNet in diffusers
    spelling for SD1/SD2 and sgm spelling for SDXL (as sd-scripts writes them), `lora_te_`/`lora_te1_`/`lora_te2_`."""
    from .naming.unet import diffusers_to_ldm, layers_per_block_diffusers, up_blocks_with_attention

    _, names = reference_model(family)
    unet_modules = {n[: -len(".weight")] for n in names["unet"] if n.endswith(".weight")}
    layers = layers_per_block_diffusers(unet_modules)
    up_attn = up_blocks_with_attention(unet_modules)
    out = {}
    for path in unet_modules:
        spelled = diffusers_to_ldm(path, layers, up_attn) if family == "sdxl" else path
        if spelled is not None:
            out[f"unet.{path}"] = "lora_unet_" + spelled.replace(".", "_")
    te_prefix = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}
    for comp in TE_COMPONENTS:
        for name in names.get(comp, ()):
            if name.endswith(".weight"):
                rel = "text_model." + name[: -len(".weight")].removeprefix("text_model.")
                out[f"{comp}.{rel}"] = te_prefix[comp] + rel.replace(".", "_")
    return out


def diffusers_module(layer_map, module_key: str) -> str | None:
    """"unet.<path>" / "text_encoder.text_model.<path>" of the layer an adapter module key names."""
    slot = layer_map.slot(module_key)
    if slot is None or slot.part is not None or not slot.weight.endswith(".weight"):
        return None
    comp, _, rel = slot.weight[: -len(".weight")].partition(".")
    if comp in TE_COMPONENTS:
        rel = "text_model." + rel.removeprefix("text_model.")
    return f"{comp}.{rel}"


def _dora_to_peft(t: torch.Tensor, out_dim: int, path: str, module: str) -> torch.Tensor:
    """LyCORIS output-axis `dora_scale` (O,1)/(O,1,1,1) → PEFT magnitude (O,) / (1,O,1,1)."""
    if t.shape[0] != out_dim or t.numel() != out_dim:
        raise AdapterError(path, f"layer {module!r}: DoRA on the input axis (dora_scale {list(t.shape)}) has no "
                                 "PEFT/diffusers form (PEFT normalises output rows)")
    return t.reshape(1, out_dim, 1, 1) if t.ndim == 4 else t.reshape(out_dim)


def _dora_to_kohya(t: torch.Tensor, conv: bool) -> torch.Tensor:
    out = t.numel()
    return t.reshape(out, 1, 1, 1) if conv else t.reshape(out, 1)


def _family(adapter: Adapter, family: str | None) -> str:
    family = family or adapter.family
    if family not in FAMILIES:
        raise AdapterError(adapter.path, f"cannot tell the model family (detected {family!r}): pass --family "
                                         f"{'|'.join(FAMILIES)}")
    return family


def _peft_config(modules: dict[str, tuple[int, float]], use_dora: bool) -> dict:
    """One component's LoraConfig fields: the commonest (r, alpha) globally, the others as patterns."""
    ranks = Counter(r for r, _ in modules.values())
    alphas = Counter(a for _, a in modules.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    targets = sorted(modules)  # exact module paths: PEFT matches a name equal to, or ending in ".<target>"
    return {"r": r, "lora_alpha": alpha, "use_dora": use_dora, "use_rslora": False,
            "rank_pattern": {m: rr for m, (rr, _) in sorted(modules.items()) if rr != r},
            "alpha_pattern": {m: aa for m, (_, aa) in sorted(modules.items()) if aa != alpha},
            "target_modules": targets, "bias": "none", "init_lora_weights": True}


def to_peft(path: str, tensors: dict, metadata: dict, family: str | None, target: str, fold_scale: bool) -> tuple[dict, dict]:
    """(tensors, metadata) in diffusers (`target="diffusers"`) or PEFT naming, `unet.`/`text_encoder[_2].` prefixed
    (Flux: `transformer.`, convert_flux)."""
    adapter = Adapter.from_tensors(tensors, metadata, path)
    if (family or adapter.family) == "flux":
        from . import convert_flux
        return convert_flux.to_peft(path, tensors, metadata, target, fold_scale)
    family = _family(adapter, family)
    if family == "sd3":
        return convert_sd3.to_diffusers(path, tensors, metadata, target, fold_scale)
    layer_map, _ = reference_model(family)
    groups, unmatched = group_keys(tensors)
    kept = {k: tensors[k] for k in unmatched if k.startswith(BUNDLED_EMBEDDING_PREFIX)}
    refuse_unmatched(path, [k for k in unmatched if k not in kept])
    allowed = DIFFUSERS_LAYOUTS if target == "diffusers" else PEFT_LAYOUTS
    out: dict[str, torch.Tensor] = dict(kept)
    configs: dict[str, dict[str, tuple[int, float]]] = {}
    dora: dict[str, bool] = {}
    dora_layers: dict[str, set[str]] = {}
    hint = {"alpha_dtype": None, "no_alpha": [], "zero_alpha": [], "keys": {}}
    kohya_of = kohya_names(family) if adapter.key_format in ("kohya", "lycoris") else {}
    for module, params in groups.items():
        patch = adapter.layers.get(module)
        if patch is None:
            refuse_unmatched(path, [f"{module}.{p}" for p in params])
        algo = kind_name(patch)
        inner = getattr(patch, "inner", patch)
        if algo not in allowed or getattr(inner, "mid", None) is not None or getattr(inner, "extra", None) is not None \
                or getattr(inner, "t1", None) is not None or getattr(inner, "t2", None) is not None:
            what = f"{algo} with a Tucker core" if algo in allowed else algo
            where = "diffusers loads only LoRA/LoCon (use --to peft for LoHa/LoKr)" if target == "diffusers" \
                else "PEFT has no equivalent layout"
            raise AdapterError(path, f"layer {module!r} is {what}: {where}; not converted")
        name = diffusers_module(layer_map, module)
        if name is None:
            raise AdapterError(path, f"layer {module!r} matches no layer of a {family} model; not converted")
        comp, _, rel = name.partition(".")
        rank = inner.rank or 1  # LoKr with both factors full: no rank, scale 1
        alpha = effective_alpha(inner) if inner.rank else 1.0
        if "alpha" in params:
            hint["alpha_dtype"] = DTYPE_NAMES[params["alpha"].dtype]
            if not float(params["alpha"]):
                hint["zero_alpha"].append(name)
        elif adapter.key_format in ("kohya", "lycoris"):
            hint["no_alpha"].append(name)
        if kohya_of and kohya_of.get(name) != module:
            hint["keys"][name] = module
        scale_alpha = alpha if alpha is not None else float(rank)
        for param, t in params.items():
            if param == "alpha":
                continue
            if param in ("dora_scale", "lora_magnitude_vector"):
                t = _dora_to_peft(t, patch.out_dim, path, module) if param == "dora_scale" else t
                out[f"{name}.lora_magnitude_vector"] = t
                dora[comp] = True
                dora_layers.setdefault(comp, set()).add(rel)
                continue
            if fold_scale and param in FIRST_FACTORS:
                t = (t.float() * (scale_alpha / rank)).to(t.dtype)
            out[f"{name}.{PEFT_NAMES.get(param, param)}"] = t
        # PEFT matches target/pattern names as suffixes: without `text_model.` they fit transformers 4 and 5
        configs.setdefault(comp, {})[rel.removeprefix("text_model.")] = (rank, float(rank) if fold_scale else scale_alpha)
    for comp, on in dora.items():
        if on and len(dora_layers[comp]) != len(configs[comp]):
            raise AdapterError(path, f"{comp}: DoRA on {len(dora_layers[comp])} of {len(configs[comp])} layers; PEFT's "
                                     "use_dora covers every layer of a component, so this mix cannot be written")
    meta = {k: v for k, v in metadata.items() if k not in (HINT_KEY, "lora_adapter_metadata")}
    added = [k for k in ("format", "lora_adapter_metadata") if k not in metadata]
    peft_meta = {}
    for comp, modules in configs.items():
        for k, v in _peft_config(modules, dora.get(comp, False)).items():
            peft_meta[f"{comp}.{k}"] = v
    meta["format"] = metadata.get("format", "pt")
    meta["lora_adapter_metadata"] = json.dumps(peft_meta, sort_keys=True)
    if adapter.key_format in ("kohya", "lycoris") and not fold_scale:
        hint["added"] = added
        meta[HINT_KEY] = json.dumps(hint, sort_keys=True)
    return out, meta


def to_kohya(path: str, tensors: dict, metadata: dict, family: str | None) -> tuple[dict, dict]:
    """(tensors, metadata) with kohya/LyCORIS module keys and an `alpha` tensor per layer (Flux: convert_flux)."""
    adapter = Adapter.from_tensors(tensors, metadata, path)
    if (family or adapter.family) == "flux":
        from . import convert_flux
        return convert_flux.to_kohya(path, tensors, metadata)
    family = _family(adapter, family)
    if family == "sd3":
        return convert_sd3.to_kohya(path, tensors, metadata)
    layer_map, _ = reference_model(family)
    kohya_of = kohya_names(family)
    try:
        hint = json.loads(metadata.get(HINT_KEY) or "{}")
    except json.JSONDecodeError:
        hint = {}
    alpha_dtype = DTYPES.get(hint.get("alpha_dtype") or "", None)
    groups, unmatched = group_keys(tensors)
    kept = {k: tensors[k] for k in unmatched if k.startswith(BUNDLED_EMBEDDING_PREFIX)}
    refuse_unmatched(path, [k for k in unmatched if k not in kept])
    out: dict[str, torch.Tensor] = dict(kept)
    for module, params in groups.items():
        patch = adapter.layers.get(module)
        if patch is None:
            refuse_unmatched(path, [f"{module}.{p}" for p in params])
        inner = getattr(patch, "inner", patch)
        name = diffusers_module(layer_map, module)
        if name is None:
            raise AdapterError(path, f"layer {module!r} matches no layer of a {family} model; not converted")
        key = hint.get("keys", {}).get(name) or kohya_of.get(name)
        if key is None:
            raise AdapterError(path, f"layer {module!r} has no kohya name in a {family} model; not converted")
        up = params.get("lora_up.weight")
        for param, t in params.items():
            if param == "alpha":
                continue
            if param == "lora_magnitude_vector":
                t = _dora_to_kohya(t, up is not None and up.ndim == 4)
            out[f"{key}.{KOHYA_NAMES.get(param, param)}"] = t
        if name in hint.get("no_alpha", ()):
            continue
        alpha = 0.0 if name in hint.get("zero_alpha", ()) else (effective_alpha(inner) if inner.rank else 1.0)
        dtype = alpha_dtype or (params["alpha"].dtype if "alpha" in params else
                                next((t.dtype for t in params.values() if t.is_floating_point()), torch.float32))
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    meta = {k: v for k, v in metadata.items() if k != HINT_KEY}
    for k in hint.get("added", ["lora_adapter_metadata"]):
        meta.pop(k, None)
    return out, meta


def refuse_unmatched(path: str, keys: list[str]) -> None:
    if keys:
        raise AdapterError(path, f"{len(keys)} keys are not adapter layers this converter understands "
                                 f"(e.g. {keys[0]!r}); not converted")


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, to: str, family: str | None = None,
                 fold_scale: bool = False) -> dict:
    """Convert one file; nothing is written unless every layer converts. Returns a small summary."""
    src, dst = str(src), str(dst)
    if to not in TARGETS:
        raise AdapterError(None, f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise AdapterError(dst, "the output would overwrite the input")
    refuse_same_file(dst, [src])
    if not dst.endswith(".safetensors"):
        raise AdapterError(dst, "the output must be a .safetensors file")
    header, tensors = load_tensors(src, read_header(src))
    metadata = dict(header.metadata)
    if to == "kohya":
        out, meta = to_kohya(src, tensors, metadata, family)
    else:
        out, meta = to_peft(src, tensors, metadata, family, to, fold_scale)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_tensors(dst, out, meta)
    return {"layers": len(group_keys(out)[0]), "tensors": len(out), "to": to}


def run_convert(args) -> int:
    summary = convert_file(args.input, args.output, args.to, args.family, args.fold_scale)
    print(f"wrote {args.output} ({args.to}, {summary['layers']} layers, {summary['tensors']} tensors)")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("convert", help="adapter file between kohya, diffusers and PEFT naming",
                              description=__doc__)
    p.add_argument("input")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--family", choices=FAMILIES, default=None, help="override the detected family")
    p.add_argument("--fold-scale", action="store_true",
                   help="diffusers/peft: fold alpha/rank into lora_B instead of carrying it in lora_adapter_metadata")
    p.set_defaults(run=run_convert)
