"""LoRA / LoCon: ΔW = γ · up @ down, with kohya's conv `lora_mid` (CP/Tucker) form; γ = alpha / rank.

Spellings (kohya `lora_up/lora_down`, PEFT `lora_A/lora_B`, diffusers `lora.up/down`, `lora_linear_layer.up/down`)
are normalised to `lora_up.weight` / `lora_down.weight` when keys are split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeMismatch
from .base import DeltaPatch, Params, as_float, fetch, flat, rank_scale, tucker

SIGNATURE = ("lora_up.weight", "lora_down.weight")


@dataclass
class LoRAPatch(DeltaPatch):
    kind = "lora"
    consumes = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "scale", "bias",
                "bias_indices", "bias_values", "bias_size")

    up: Tensor
    down: Tensor
    mid: Tensor | None = None
    alpha_value: float | None = None
    scale_override: float | None = None
    extra: Tensor | None = None  # A1111 dense `bias` or densified sparse residual: added to up@down before scaling

    @classmethod
    def from_params(cls, p: Params) -> "LoRAPatch | None":
        if not all(k in p for k in SIGNATURE):
            return None
        up, down, mid = p["lora_up.weight"], p["lora_down.weight"], p.get("lora_mid.weight")
        r = down.shape[0]
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != r:
            raise ShapeMismatch(f"lora_up {list(up.shape)} and lora_down {list(down.shape)} disagree on the rank")
        if mid is not None and (mid.ndim != 4 or tuple(mid.shape[:2]) != (r, r)):
            raise ShapeMismatch(f"lora_mid {list(mid.shape)} does not fit rank {r}")
        extra = p.get("bias")
        if "bias_indices" in p:
            size = [int(v) for v in p["bias_size"].reshape(-1).tolist()]
            extra = torch.sparse_coo_tensor(p["bias_indices"].long(), p["bias_values"].float(), size).to_dense()
        return cls(up, down, mid, as_float(p.get("alpha")), as_float(p.get("scale")), extra)

    @property
    def rank(self):
        return int(self.down.shape[0])

    @property
    def alpha(self):
        return self.alpha_value

    @property
    def out_dim(self):
        return int(self.up.shape[0])

    @property
    def in_dim(self):
        return int(self.down.shape[1])

    @property
    def kind_detail(self) -> str:
        """'locon' for a k×k convolution adapter, 'lora' otherwise."""
        conv = self.mid is not None or (self.down.ndim == 4 and tuple(self.down.shape[2:]) != (1, 1))
        return "locon" if conv else "lora"

    @property
    def scale(self) -> float:
        return rank_scale(self.alpha_value, self.rank, self.scale_override)

    def delta(self, weight: Tensor) -> Tensor:
        up, down = fetch(self.up, weight), fetch(self.down, weight)
        if self.mid is not None:
            d = tucker(fetch(self.mid, weight), flat(up).T, flat(down))
        else:
            d = flat(up) @ flat(down)
        if self.extra is not None:
            d = d.reshape(-1) + fetch(self.extra, weight).reshape(-1)
        if d.numel() != weight.numel():
            raise ShapeMismatch(f"LoRA gives {d.numel()} elements ({self.out_dim} rows), the weight is {list(weight.shape)}")
        return d.reshape(weight.shape) * self.scale
