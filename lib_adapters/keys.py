"""Splitting file keys into (module key, parameter) by known parameter suffixes, longest first.

Module keys may contain dots (diffusers/PEFT), so keys are never split at the first dot. Spellings of the same
parameter are normalised (PEFT `lora_A.weight` → `lora_down.weight`, …); the raw spellings tell the key format.
"""

from __future__ import annotations

import re
from collections import defaultdict

from torch import Tensor

SPELLINGS: dict[str, str] = {
    "lora_up.weight": "lora_up.weight",
    "lora_down.weight": "lora_down.weight",
    "lora_mid.weight": "lora_mid.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.weight": "lora_down.weight",
    "lora_B.bias": "lora_up.bias",
    "lora.up.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_magnitude_vector.weight": "lora_magnitude_vector",
    "lora_magnitude_vector": "lora_magnitude_vector",
    "a1.weight": "a1.weight",
    "a2.weight": "a2.weight",
    "b1.weight": "b1.weight",
    "b2.weight": "b2.weight",
    "bm.weight": "bm.weight",
}
PLAIN_PARAMS = (
    "alpha", "dora_scale", "scale", "bias_indices", "bias_values", "bias_size",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
    "oft_blocks", "oft_diag", "boft_blocks", "rescale", "on_input", "diff", "diff_b", "w_norm", "b_norm",
    "set_weight",
)
SPELLINGS.update({p: p for p in PLAIN_PARAMS})
MAX_SUFFIX_PARTS = max(s.count(".") + 1 for s in SPELLINGS)
# Parameters that only count beside other adapter parameters of the same module.
COMPANION_ONLY = {"weight", "bias"}

_PEFT_ADAPTER_NAME = re.compile(r"\.(lora_[AB]|lora_magnitude_vector|hada_\w+|lokr_\w+)\.default(?=\.weight$|$)")
_PROCESSOR = re.compile(r"^(.*?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$")
_TE_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# XLabs Flux processors: `double_blocks.N.processor.qkv_lora1.down.weight` (module = the processor's LoRA).
_XLABS = re.compile(r"^(.*\.processor\.(?:qkv|proj)_lora\d?)\.(up|down)\.weight$")


def normalise_key(key: str) -> str:
    """Rewrite PEFT adapter names and attention-processor spellings to the plain module.param form."""
    key = _PEFT_ADAPTER_NAME.sub(r".\1", key)
    m = _XLABS.match(key)
    if m:
        return f"{m.group(1)}.lora_{m.group(2)}.weight"
    m = _PROCESSOR.match(key)
    if m:
        module, proj, side = m.groups()
        if "self_attn" in module:  # text-encoder processors name HF CLIP projections
            proj = _TE_PROCESSOR[proj]
        elif proj == "to_out":
            proj = "to_out.0"
        key = f"{module}.{proj}.lora.{side}.weight"
    return key


def split_key(key: str) -> tuple[str, str] | None:
    """(module, canonical param) for a key that ends in a known parameter suffix (longest suffix wins)."""
    parts = key.split(".")
    for n in range(min(MAX_SUFFIX_PARTS, len(parts) - 1), 0, -1):
        param = SPELLINGS.get(".".join(parts[-n:]))
        if param is not None:
            return ".".join(parts[:-n]), param
    return None


def group_keys(tensors: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Group tensors by module; return (groups, keys that belong to no adapter module)."""
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    leftovers: dict[str, Tensor] = {}
    for key, t in tensors.items():
        split = split_key(normalise_key(key))
        if split:
            groups[split[0]][split[1]] = t
        else:
            leftovers[key] = t
    unmatched = []
    for key, t in leftovers.items():
        module, _, param = key.rpartition(".")
        if param in COMPANION_ONLY and module in groups:
            groups[module][param] = t
        else:
            unmatched.append(key)
    return dict(groups), sorted(unmatched)


def key_format(keys: list[str]) -> str:
    """kohya, lycoris, peft, diffusers, ldm, xlabs, bfl-control or unknown, from the spellings of the keys."""
    if not keys:
        return "unknown"
    if any(".processor.qkv_lora" in k or ".processor.proj_lora" in k for k in keys):
        return "xlabs"
    if any(k.endswith("img_in.lora_A.weight") for k in keys) and any(k.endswith("_norm.scale") for k in keys):
        return "bfl-control"
    lyco_params = ("hada_", "lokr_", "oft_blocks", "oft_diag", ".diff", "w_norm", "on_input", ".a1.weight", "dora_scale")
    if any(k.startswith(("lora_unet_", "lora_te", "oft_unet_", "lycoris_")) for k in keys):
        if any(k.startswith("lycoris_") for k in keys) or any(p in k for k in keys for p in lyco_params):
            return "lycoris"
        return "kohya"
    if any(".lora_A" in k or ".lora_B" in k for k in keys):
        return "peft"
    if any(".lora.down." in k or "lora_linear_layer" in k or "_lora.down." in k for k in keys):
        return "diffusers"
    if any(k.startswith(("diffusion_model", "model.diffusion_model", "cond_stage_model", "conditioner")) for k in keys):
        return "ldm"
    return "unknown"
