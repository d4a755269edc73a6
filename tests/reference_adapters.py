"""Adapters built by the reference libraries themselves (LyCORIS 4.1.3, PEFT 0.21.2) on a toy model.

Each builder returns a `Built`: the base weights, the state dict exactly as the library writes it (kohya-style
`lora_unet_<layer>` prefix for LyCORIS, `get_peft_model_state_dict` for PEFT) and a function giving the reference
merged (weight, bias) of one layer at one strength, derived from the library's own forward pass or merge.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

LAYERS = ("lin", "conv3", "conv1")
NORMS = ("ln", "gn")
PREFIX = "lora_unet"


class Toy(nn.Module):
    """Linear 64→96, Conv 3×3 32→48 (pad 1), Conv 1×1 32→48, LayerNorm(96), GroupNorm(4, 48)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 96)
        self.conv3 = nn.Conv2d(32, 48, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 48, 1)
        self.ln = nn.LayerNorm(96)
        self.gn = nn.GroupNorm(4, 48)


def make_toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    toy = Toy()
    with torch.no_grad():
        for norm in (toy.ln, toy.gn):
            norm.weight.copy_(1 + 0.2 * torch.randn_like(norm.weight))
            norm.bias.copy_(0.1 * torch.randn_like(norm.bias))
    return toy


def base_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    out = {}
    for name in LAYERS + NORMS:
        layer = getattr(model, name, None)
        if layer is not None:
            out[name] = (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
    return out


@torch.no_grad()
def effective_weight(layer: nn.Module, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight, bias) a Linear/Conv2d forward actually applies, read off its outputs on basis inputs."""
    if len(shape) == 2:
        n_in = shape[1]
        zero = layer(torch.zeros(1, n_in))
        out = layer(torch.eye(n_in)) - zero
        return out.T.contiguous(), zero[0]
    o, i, kh, kw = shape
    basis = torch.eye(i * kh * kw).reshape(i * kh * kw, i, kh, kw)
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    full = layer(basis)
    zero = layer(torch.zeros(1, i, kh, kw))
    centre = (full - zero)[:, :, ph, pw]  # the output pixel that sees the whole kernel
    return centre.T.reshape(o, i, kh, kw).contiguous(), zero[0, :, ph, pw]


@dataclass
class Built:
    """One reference adapter: what was saved, the base, and the reference merge."""

    name: str
    state_dict: dict[str, torch.Tensor]
    base: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    reference: Callable[[str, float], tuple[torch.Tensor, torch.Tensor | None]]
    layers: tuple[str, ...] = LAYERS
    metadata: dict[str, str] = field(default_factory=dict)
    module_prefix: str = f"{PREFIX}_"
    extra: dict = field(default_factory=dict)

    def module_key(self, layer: str) -> str:
        return f"{self.module_prefix}{layer}"


def _quiet():
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    return contextlib.redirect_stdout(io.StringIO())


def _fill(module: nn.Module, gen: torch.Generator, amp: float) -> None:
    """Random non-zero values; DoRA magnitudes and OFT rescales stay near their init (×(1 + 0.1·noise))."""
    from lycoris.modules.full import FullModule

    with torch.no_grad():
        for pname, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if pname.endswith(("dora_scale", "rescale")):
                p.mul_(1 + 0.1 * noise)
            elif isinstance(module, FullModule):
                p.add_(0.05 * noise)
            else:
                p.copy_(amp * noise)


def _lycoris_state_dict(net_or_modules) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in net_or_modules.state_dict().items()}


def build_lycoris(name: str, seed: int = 0, amp: float = 0.3, **kwargs) -> Built:
    """`create_lycoris` over the toy model with the kohya-style prefix, every parameter randomised."""
    from lycoris import LycorisNetwork, create_lycoris

    model = make_toy(seed)
    base = base_weights(model)
    targets = ["Linear", "Conv2d"] + (["LayerNorm", "GroupNorm"] if kwargs.get("train_norm") else [])
    LycorisNetwork.apply_preset({"target_module": targets, "target_name": [], "lora_prefix": PREFIX})
    with _quiet():
        net = create_lycoris(model, 1.0, **kwargs)
    net.apply_to()
    gen = torch.Generator().manual_seed(seed + 1)
    for lora in net.loras:
        _fill(lora, gen, amp)
    state_dict = _lycoris_state_dict(net)
    by_layer = {lora.lora_name[len(PREFIX) + 1:]: lora for lora in net.loras}

    def reference(layer: str, strength: float):
        return lycoris_reference(by_layer[layer], getattr(model, layer), strength, base[layer])

    layers = tuple(n for n in LAYERS + NORMS if n in by_layer)
    return Built(name, state_dict, base, reference, layers, extra={"modules": by_layer, "model": model})


@torch.no_grad()
def lycoris_reference(lora, layer: nn.Module, strength: float, base) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference merged weight of one LyCORIS module, in our strength semantics.

    Additive algorithms: the LyCORIS forward at multiplier s. OFT/BOFT: the forward at multiplier s with
    `rescale` set to 1 + s(rescale − 1). DoRA: W + s·(W'' − W), W'' from the forward at multiplier 1.
    Norm patches: `get_merged_weight` (no weight-reading forward exists for them).
    """
    from lycoris.modules.norms import NormModule

    if isinstance(lora, NormModule):
        lora.multiplier = strength
        w, b = lora.get_merged_weight(strength)
        return w.clone(), b.clone()
    dora = getattr(lora, "wd", False)
    rescale = getattr(lora, "rescale", None) if getattr(lora, "rescaled", False) else None
    saved = rescale.detach().clone() if rescale is not None else None
    try:
        if rescale is not None:
            rescale.copy_(1 + strength * (saved - 1))
        lora.multiplier = 1.0 if dora else strength
        w, b = effective_weight(layer, base[0].shape)
    finally:
        lora.multiplier = 1.0
        if rescale is not None:
            rescale.copy_(saved)
    if dora:
        w0, b0 = base
        w = w0 + strength * (w - w0)
    return w, b


def build_ia3(on_input: bool, seed: int = 0) -> Built:
    """`IA3Module` used directly (the wrapper ignores `train_on_input`)."""
    from lycoris.modules.ia3 import IA3Module

    model = make_toy(seed)
    base = base_weights(model)
    gen = torch.Generator().manual_seed(seed + 1)
    modules, state_dict = {}, {}
    with _quiet():
        for layer in LAYERS:
            m = IA3Module(f"{PREFIX}_{layer}", getattr(model, layer), 1.0, train_on_input=on_input)
            m.apply_to()
            _fill(m, gen, 0.3)
            modules[layer] = m
            state_dict.update({f"{PREFIX}_{layer}.{k}": v.detach().clone() for k, v in m.state_dict().items()})

    def reference(layer, strength):
        return lycoris_reference(modules[layer], getattr(model, layer), strength, base[layer])

    return Built(f"ia3-{'in' if on_input else 'out'}", state_dict, base, reference, extra={"modules": modules})


def build_peft(kind: str, seed: int = 0, **config) -> Built:
    """PEFT LoRA/LoHa/LoKr on the toy model; the file is `get_peft_model_state_dict` plus the config as
    `lora_adapter_metadata` (as diffusers writes it); the reference is PEFT's `merge_and_unload`."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model, get_peft_model_state_dict

    cls = {"lora": LoraConfig, "loha": LoHaConfig, "lokr": LoKrConfig}[kind]
    init = {"init_lora_weights": False} if kind == "lora" else {"init_weights": False}
    cfg = cls(target_modules=list(LAYERS), **init, **config)
    model = make_toy(seed)
    base = base_weights(model)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_magnitude_vector" in pname:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    state_dict = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.to_dict().items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True, default=str)}
    dora = bool(config.get("use_dora"))

    @torch.no_grad()
    def reference(layer, strength):
        m = copy.deepcopy(peft_model)
        target = m.base_model.model.get_submodule(layer)
        target.set_scale("default", 1.0 if dora else strength)
        merged = m.merge_and_unload().get_submodule(layer)
        w, b = merged.weight.detach().clone(), merged.bias.detach().clone()
        if dora:
            w0 = base[layer][0]
            w = w0 + strength * (w - w0)
        return w, b

    return Built(f"peft-{kind}", state_dict, base, reference, metadata=metadata, module_prefix="base_model.model.",
                 extra={"config": cfg, "model": peft_model})


def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours − ref| / max |ref|."""
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())
