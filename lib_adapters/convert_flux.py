"""`convert` for Flux: LoRA/DoRA files between kohya (`lora_unet_` + BFL names, fused qkv/linear1, `lora_te1_` CLIP-L,
`lora_te3_` T5) and diffusers/PEFT (`transformer.` + diffusers names, scales in `lora_adapter_metadata`,
`text_encoder.`, `text_encoder_2.`).

Any Flux spelling is read through the Flux naming tables of a model sized from the file itself (hidden width, MLP
width, block counts), so fused layers split and join exactly: a fused kohya layer becomes one LoRA per part with the
same down and its rows of the up; a kohya split-qkv layer (block-diagonal up) splits its rank too, each part at the
host-parity scale alpha/(n·r); parts joining into one fused layer share the down when they can, else stack
block-diagonally with their scales folded into the up. Final adaLN halves are swapped on the way. kohya → diffusers
→ kohya gives back the same tensors (a hint in the metadata keeps what diffusers cannot hold).
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
from .naming import LayerMap
from .naming import flux

HINT_KEY = "lib_adapters.kohya_source"
T5_COMPONENT = "text_encoder_2"
CLIP_COMPONENT = "text_encoder"
ALLOWED = {"lora"}


def _max_index(keys, pattern) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.search(pattern, k))]
    return max(found) + 1 if found else 0


def sizes_of(adapter: Adapter) -> flux.Sizes:
    """Hidden width, MLP width and block counts of the model an adapter was trained on, from its layers."""
    hidden = mlp = None
    for key, patch in adapter.layers.items():
        k = key.replace(".", "_")
        if re.search(r"(attn_(qkv|to_[qkv]|add_[qkv]_proj)|mod_lin|norm1(_context)?_linear|qkv_lora\d?)$", k):
            hidden = hidden or patch.in_dim
        if re.search(r"(img_mlp_0|txt_mlp_0|ff_net_0_proj|ff_context_net_0_proj|proj_mlp)$", k):
            mlp = mlp or patch.out_dim
    for key, patch in adapter.layers.items():
        k = key.replace(".", "_")
        if hidden and not mlp and k.endswith("linear1") and patch.out_dim:
            mlp = patch.out_dim - 3 * hidden
        if hidden and not mlp and re.search(r"(single_blocks_\d+_linear2|single_transformer_blocks_\d+_proj_out)$", k):
            mlp = patch.in_dim - hidden
    if not hidden:
        raise AdapterError(adapter.path, "cannot tell the Flux hidden width from its layers (no attention or "
                                         "modulation layer); not converted")
    keys = [k.replace(".", "_") for k in adapter.layers]
    double = max(_max_index(keys, r"double_blocks_(\d+)_"), _max_index(keys, r"(?<!single_)transformer_blocks_(\d+)_"))
    single = max(_max_index(keys, r"single_blocks_(\d+)_"), _max_index(keys, r"single_transformer_blocks_(\d+)_"))
    return flux.Sizes(hidden, mlp or 4 * hidden, max(double, 1), max(single, 1))


def model_shapes(s: flux.Sizes, width: int = 1) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a BFL Flux transformer of sizes `s` (outer input widths, which naming never reads, set to
    `width`), with CLIP-L/T5 roots so their tables exist."""
    h, m = s.hidden, s.mlp
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(name, out, inp):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    lin("img_in", h, width)
    lin("txt_in", h, width)
    for emb in ("time_in", "vector_in", "guidance_in"):
        lin(f"{emb}.in_layer", h, width)
        lin(f"{emb}.out_layer", h, h)
    for n in range(s.double):
        for st in ("img", "txt"):
            b = f"double_blocks.{n}.{st}"
            lin(f"{b}_mod.lin", 6 * h, h)
            lin(f"{b}_attn.qkv", 3 * h, h)
            lin(f"{b}_attn.proj", h, h)
            lin(f"{b}_mlp.0", m, h)
            lin(f"{b}_mlp.2", h, m)
    for n in range(s.single):
        lin(f"single_blocks.{n}.linear1", 3 * h + m, h)
        lin(f"single_blocks.{n}.linear2", h, h + m)
        lin(f"single_blocks.{n}.modulation.lin", 3 * h, h)
    lin("final_layer.linear", width, h)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


class FluxNames:
    """Where each file layer lands, in BFL and diffusers terms, for a Flux model sized from the file."""

    def __init__(self, adapter: Adapter):
        self.sizes = sizes_of(adapter)
        shapes = model_shapes(self.sizes)
        self.layer_map = LayerMap.for_checkpoint(shapes)
        self.parts: dict[str, tuple[tuple[str, int, int], ...]] = {}  # BFL module → (diffusers module, lo, hi)
        self.swapped: set[str] = set()
        for rel in flux.relations(self.sizes):
            lo, parts = 0, []
            for part, width in zip(rel.parts, rel.widths or (None,)):  # one part: the whole weight
                parts.append((part, lo, None if width is None else lo + width))
                lo += width or 0
            self.parts[rel.bfl] = tuple(parts)
            if rel.swap:
                self.swapped.add(rel.bfl)

    def target(self, key: str):
        """(component, module, rows, reordered): component "transformer" with a BFL module (and the row block a
        diffusers-named layer holds; `reordered` when the file holds the final adaLN in diffusers' (scale, shift)
        order), or "text_encoder"/"text_encoder_2" with the HF module path; None when it is no Flux layer."""
        slot = self.layer_map.slot(key)
        if slot is None:
            te = text_encoder_path(key)
            return None if te is None else (*te, None, False)
        return "transformer", slot.weight[: -len(".weight")], slot.rows, slot.order is not None


CLIP_PREFIXES = ("lora_te1_", "lora_te_", "text_encoders_clip_l_transformer_", "clip_l_transformer_", "clip_l_",
                 "text_encoder_")
T5_PREFIXES = ("lora_te3_", "lora_te2_", "text_encoders_t5xxl_transformer_", "t5xxl_transformer_", "t5_",
               "text_encoder_2_")
CLIP_MODULE = re.compile(r"^(text_model_)?encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")
T5_MODULE = re.compile(r"^encoder_block_(\d+)_layer_(0_SelfAttention_[qkvo]|1_DenseReluDense_(wi_0|wi_1|wo))$")


def text_encoder_path(key: str):
    """(component, HF module path) of a CLIP-L or T5 adapter key, by its prefix and path shape."""
    k = key.replace(".", "_")
    for prefixes, pattern, comp in ((T5_PREFIXES, T5_MODULE, T5_COMPONENT), (CLIP_PREFIXES, CLIP_MODULE, CLIP_COMPONENT)):
        for prefix in sorted(prefixes, key=len, reverse=True):
            if k.startswith(prefix) and (m := pattern.match(k[len(prefix):])):
                return comp, _dotted(m, comp)
    return None


def _dotted(m, comp) -> str:
    if comp == T5_COMPONENT:
        block, rest = m.group(1), m.group(2)
        layer, _, name = rest.partition("_")
        inner = name.replace("SelfAttention_", "SelfAttention.").replace("DenseReluDense_", "DenseReluDense.")
        return f"encoder.block.{block}.layer.{layer}.{inner}"
    layer, rest = m.group(2), m.group(3)
    inner = {"mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}.get(rest, rest.replace("self_attn_", "self_attn."))
    return f"text_model.encoder.layers.{layer}.{inner}"


def _check(adapter: Adapter, key: str, patch) -> None:
    algo = kind_name(patch)
    inner = getattr(patch, "inner", patch)
    if algo not in ALLOWED or getattr(inner, "mid", None) is not None or getattr(inner, "extra", None) is not None \
            or getattr(inner, "up_bias", None) is not None or getattr(inner, "diff_b", None) is not None:
        raise AdapterError(adapter.path, f"layer {key!r} is {algo}{' with bias terms' if algo in ALLOWED else ''}: "
                                         "only LoRA/DoRA layers convert between kohya and diffusers Flux; not converted")


def _scale(patch) -> float:
    return getattr(patch, "inner", patch).scale


# ---- kohya (or any Flux spelling) → diffusers / PEFT -------------------------------------------------------

def to_peft(path: str, tensors: dict, metadata: dict, target: str, fold_scale: bool) -> tuple[dict, dict]:
    from .convert import _peft_config  # the PEFT config writer shared with SD

    adapter = Adapter.from_tensors(tensors, metadata, path)
    if adapter.unmatched:
        raise AdapterError(path, f"{len(adapter.unmatched)} keys are not adapter layers (e.g. "
                                 f"{adapter.unmatched[0]!r}); not converted")
    names = FluxNames(adapter)
    out: dict[str, torch.Tensor] = {}
    configs: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
    dora: dict[str, bool] = {}
    hint = {"layers": {}, "alpha_dtype": None, "keys": {}, "split": []}
    for key, patch in adapter.layers.items():
        _check(adapter, key, patch)
        where = names.target(key)
        if where is None:
            raise AdapterError(path, f"layer {key!r} matches no Flux layer; not converted")
        comp, module, rows, reordered = where
        inner = getattr(patch, "inner", patch)
        if f"{key}.alpha" in tensors:
            hint["alpha_dtype"] = DTYPE_NAMES[tensors[f"{key}.alpha"].dtype]
        if inner.alpha_value is not None:
            hint["layers"][key] = inner.alpha_value
        swap = module in names.swapped and not reordered
        if len(names.parts.get(module, ())) > 1 and rows is None and flux.split_qkv_parts(key, inner):
            hint["split"].append(key)
        for name, down, up, magnitude, alpha, rank in _split(names, comp, module, rows, patch, key):
            if swap:
                up = flux_swap(up)
                magnitude = flux_swap(magnitude) if magnitude is not None else None
            if fold_scale:
                up = (up.float() * (alpha / rank)).to(up.dtype)
                alpha = float(rank)
            full = f"{comp}.{name}"
            out[f"{full}.lora_A.weight"] = down.contiguous()
            out[f"{full}.lora_B.weight"] = up.contiguous()
            if magnitude is not None:
                out[f"{full}.lora_magnitude_vector"] = magnitude.reshape(-1).contiguous()
                dora[comp] = True
            configs[comp][name] = (rank, alpha)
            hint["keys"][full] = key
    meta = {k: v for k, v in metadata.items() if k not in (HINT_KEY, "lora_adapter_metadata")}
    peft_meta = {}
    for comp, modules in configs.items():
        for k, v in _peft_config(modules, dora.get(comp, False)).items():
            peft_meta[f"{comp}.{k}"] = v
    meta["format"] = metadata.get("format", "pt")
    meta["lora_adapter_metadata"] = json.dumps(peft_meta, sort_keys=True)
    if adapter.key_format in ("kohya", "lycoris") and not fold_scale:
        meta[HINT_KEY] = json.dumps(hint, sort_keys=True)
    return out, meta


def flux_swap(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def _split(names: FluxNames, comp, module, rows, patch, key):
    """[(diffusers module, down, up, magnitude, alpha, rank)] for one file layer."""
    inner = getattr(patch, "inner", patch)
    down, up = inner.down.reshape(inner.down.shape[0], -1), inner.up.reshape(inner.up.shape[0], -1)
    magnitude = getattr(patch, "magnitude", None)
    if magnitude is not None and not getattr(patch, "on_output", True):
        raise AdapterError(None, f"layer {key!r}: DoRA on the input axis has no PEFT form; not converted")
    rank, alpha = down.shape[0], _scale(patch) * down.shape[0]
    if comp != "transformer":
        return [(module, down, up, magnitude, alpha, rank)]
    lo0 = rows[0] if rows else 0
    parts = [(p, lo, hi) for p, lo, hi in names.parts[module]
             if rows is None or (hi is not None and lo >= rows[0] and hi <= rows[1])]
    if rows is not None and (not parts or parts[0][1] != rows[0] or parts[-1][2] != rows[1]):
        raise AdapterError(None, f"layer {key!r} covers rows {rows} of {module}, which are no whole diffusers layers")
    split = flux.split_qkv_parts(key, inner) if len(parts) > 1 else None
    out = []
    for j, (part, lo, hi) in enumerate(parts):
        end = None if hi is None else hi - lo0
        part_up = up[lo - lo0:end]
        part_m = magnitude.reshape(-1)[lo - lo0:end] if magnitude is not None else None
        if split == len(parts):  # block-diagonal: each part keeps its own rank-r slice, scale alpha/(n·r)
            r = rank // split
            out.append((part, down[j * r:(j + 1) * r], part_up[:, j * r:(j + 1) * r], part_m, alpha / split, r))
        else:
            out.append((part, down, part_up, part_m, alpha, rank))
    return out


# ---- diffusers / PEFT (or any Flux spelling) → kohya ----------------------------------------------------------

def to_kohya(path: str, tensors: dict, metadata: dict) -> tuple[dict, dict]:
    adapter = Adapter.from_tensors(tensors, metadata, path)
    if adapter.unmatched:
        raise AdapterError(path, f"{len(adapter.unmatched)} keys are not adapter layers (e.g. "
                                 f"{adapter.unmatched[0]!r}); not converted")
    try:
        hint = json.loads(metadata.get(HINT_KEY) or "{}")
    except json.JSONDecodeError:
        hint = {}
    names = FluxNames(adapter)
    alpha_dtype = DTYPES.get(hint.get("alpha_dtype") or "", torch.float32)
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for key, patch in adapter.layers.items():
        _check(adapter, key, patch)
        where = names.target(key)
        if where is None:
            raise AdapterError(path, f"layer {key!r} matches no Flux layer; not converted")
        comp, module, rows, reordered = where
        groups[(comp, module)].append((key, patch, rows, reordered))
    out: dict[str, torch.Tensor] = {}
    for (comp, module), layers in groups.items():
        original = _hinted_key(hint, comp, module, layers)
        kohya_key = original or _kohya_key(comp, module)
        split = original is not None and original in hint.get("split", ())
        down, up, magnitude, alpha = _join(names, comp, module, layers, adapter.path, split)
        if original and original in hint.get("layers", {}):
            alpha = hint["layers"][original]
        out[f"{kohya_key}.lora_down.weight"] = down.contiguous()
        out[f"{kohya_key}.lora_up.weight"] = up.contiguous()
        out[f"{kohya_key}.alpha"] = torch.tensor(float(alpha), dtype=alpha_dtype)
        if magnitude is not None:
            out[f"{kohya_key}.dora_scale"] = magnitude.reshape(-1, 1).contiguous()
    meta = {k: v for k, v in metadata.items() if k not in (HINT_KEY, "lora_adapter_metadata", "format")}
    for k in ("format",):
        if k in metadata and HINT_KEY not in metadata:
            meta[k] = metadata[k]
    return out, meta


def _hinted_key(hint, comp, module, layers) -> str | None:
    keys = hint.get("keys") or {}
    found = {keys.get(k) for k, *_ in layers}
    if len(found) == 1 and None not in found:
        return found.pop()
    return None


def _kohya_key(comp: str, module: str) -> str:
    prefix = {"transformer": "lora_unet_", CLIP_COMPONENT: "lora_te1_", T5_COMPONENT: "lora_te3_"}[comp]
    return prefix + module.replace(".", "_")


def _join(names: FluxNames, comp, module, layers, path, block_diagonal: bool = False):
    """(down, up, magnitude, alpha) of one kohya layer from the file layers on `module` (parts or whole)."""
    if len(layers) == 1 and layers[0][2] is None:
        key, patch, _, reordered = layers[0]
        inner = getattr(patch, "inner", patch)
        up = inner.up.reshape(inner.up.shape[0], -1)
        magnitude = getattr(patch, "magnitude", None)
        if reordered:
            up, magnitude = flux_swap(up), flux_swap(magnitude.reshape(-1)) if magnitude is not None else None
        return inner.down.reshape(inner.down.shape[0], -1), up, magnitude, _scale(patch) * inner.down.shape[0]
    rows_total = names.parts[module][-1][2]
    layers = sorted(layers, key=lambda item: item[2][0])
    downs = [getattr(p, "inner", p).down.reshape(getattr(p, "inner", p).down.shape[0], -1) for _, p, _, _ in layers]
    scales = [_scale(p) for _, p, _, _ in layers]
    magnitudes = [getattr(p, "magnitude", None) for _, p, _, _ in layers]
    if any(m is not None for m in magnitudes):
        covered = sum(r[1] - r[0] for _, _, r, _ in layers)
        if any(m is None for m in magnitudes) or covered != rows_total:
            raise AdapterError(path, f"DoRA on some parts of {module} only: a fused kohya layer would renormalise "
                                     "the others; not converted")
    shared = not block_diagonal and all(torch.equal(d, downs[0]) for d in downs) and \
        all(s == scales[0] for s in scales)
    rank = downs[0].shape[0] if shared else sum(d.shape[0] for d in downs)
    up = torch.zeros(rows_total, rank, dtype=getattr(layers[0][1], "inner", layers[0][1]).up.dtype)
    col = 0
    for (key, patch, (lo, hi), _), down, s in zip(layers, downs, scales):
        inner = getattr(patch, "inner", patch)
        part_up = inner.up.reshape(inner.up.shape[0], -1)
        if shared:
            up[lo:hi] = part_up
        else:
            up[lo:hi, col:col + down.shape[0]] = (part_up.float() * (s / scales[0])).to(up.dtype)
            col += down.shape[0]
    down = downs[0] if shared else torch.cat(downs)
    magnitude = torch.cat([m.reshape(-1) for m in magnitudes]) if magnitudes[0] is not None else None
    return down, up, magnitude, scales[0] * rank
