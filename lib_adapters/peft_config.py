"""The scales PEFT/diffusers files carry in their `lora_adapter_metadata` JSON instead of alpha tensors:
`r`, `lora_alpha` (`alpha` for LoHa/LoKr), `use_rslora`, `rank_pattern`, `alpha_pattern` (per component prefix:
`unet.r`, `text_encoder.lora_alpha`, … as diffusers writes them). Bad values are refused, never guessed."""

from __future__ import annotations

import math

from .algorithms import LayerPatch
from .errors import AdapterError
from .files import json_value
from .patterns import pattern_value

PEFT_FIELDS = ("r", "lora_alpha", "alpha", "use_rslora", "alpha_pattern", "rank_pattern")
PEFT_MODEL_PREFIX = "base_model.model."


def peft_configs(metadata: dict[str, str], path: str = "<memory>") -> dict[str, dict]:
    """Component prefix ("" for a bare PEFT model, "unet", "text_encoder", …) → its PEFT config fields."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json_value(raw)
    except ValueError as e:
        raise AdapterError(path, f"lora_adapter_metadata is not usable JSON ({e})") from None
    configs: dict[str, dict] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            prefix, _, name = key.rpartition(".")
            if name in PEFT_FIELDS:
                configs.setdefault(prefix, {})[name] = value
    return configs


def _number(value, what: str, path: str, integer: bool = False) -> float | int | None:
    """A finite (positive, for ranks) number from the config; None stays None; anything else is refused."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            ok = math.isfinite(float(value)) and (not integer or (value == int(value) and value > 0))
        except OverflowError:
            ok = False
    if not ok:
        kind = "a positive whole number" if integer else "a finite number"
        raise AdapterError(path, f"lora_adapter_metadata: {what} is {value!r}, not {kind}")
    return int(value) if integer else value


def _lookup(config: dict, field: str, module: str, path: str):
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise AdapterError(path, f"lora_adapter_metadata: {field} is not an object")
    try:
        return pattern_value(patterns, module)
    except ValueError as e:
        raise AdapterError(path, f"lora_adapter_metadata: a {field} key is not a pattern this loader runs ({e})") from None


def apply_peft_config(layers: dict[str, LayerPatch], metadata: dict[str, str], path: str = "<memory>") -> None:
    """Give LoRA/LoHa/LoKr layers without an alpha tensor the scale their PEFT config sets: alpha / r
    (alpha / √r with use_rslora), per-module alpha_pattern overrides; full-full LoKr uses the config's r (PEFT)."""
    needing = {}
    for module, patch in layers.items():
        inner = getattr(patch, "inner", patch)
        if hasattr(inner, "scale_override") and inner.alpha_value is None and inner.scale_override is None:
            needing[module] = inner
    configs = peft_configs(metadata, path) if needing else {}
    if not configs:
        return
    for module, inner in needing.items():
        name = module[len(PEFT_MODEL_PREFIX):] if module.startswith(PEFT_MODEL_PREFIX) else module
        prefix = next((p for p in configs if p and name.startswith(p + ".")), "")
        config = configs.get(prefix)
        if config is None:
            continue
        name = name[len(prefix) + 1:] if prefix else name
        alpha = _lookup(config, "alpha_pattern", name, path)
        field = "alpha_pattern" if alpha is not None else "lora_alpha" if "lora_alpha" in config else "alpha"
        alpha = _number(alpha if alpha is not None else config.get(field), field, path)
        if alpha is None:
            continue
        rank = inner.rank
        if not rank:
            pattern_rank = _lookup(config, "rank_pattern", name, path)
            field = "rank_pattern" if pattern_rank is not None else "r"
            rank = _number(pattern_rank if pattern_rank is not None else config.get("r"), field, path, integer=True)
        if not rank:
            continue
        if config.get("use_rslora"):
            inner.scale_override = alpha / math.sqrt(rank)
        elif inner.rank is None:
            inner.scale_override = alpha / rank
        inner.alpha_value = float(alpha)
