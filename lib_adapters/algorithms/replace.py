"""Replacement (`set_weight`, BFL Control LoRAs' norm scales): W' = W + s·(V − W), so 1 gives V and 0 the base.

ComfyUI and Forge copy V whatever the strength; a blend keeps strength 0 exactly "off" (README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..errors import ShapeMismatch
from .base import LayerPatch, Params, compute_dtype, fetch
from .forms import Dense, Replacement


@dataclass
class ReplacePatch(LayerPatch):
    kind = "set"
    consumes = ("set_weight",)

    value: Tensor

    @classmethod
    def from_params(cls, p: Params) -> "ReplacePatch | None":
        return cls(p["set_weight"]) if "set_weight" in p else None

    @property
    def out_dim(self):
        return int(self.value.shape[0]) if self.value.ndim else None

    def merge(self, weight, strength, bias=None):
        w = weight.to(compute_dtype(weight))
        if strength == 0:
            return w, bias
        if self.value.numel() != w.numel():
            raise ShapeMismatch(f"set_weight is {list(self.value.shape)}, the weight is {list(w.shape)}")
        value = fetch(self.value, w).reshape(w.shape)
        return (value if strength == 1 else w + strength * (value - w)), bias

    def forward_form(self, shape):
        """(1 − s)·y + s·V·x on the layer's rows."""
        if self.value.numel() != math.prod(shape):
            return None
        return Replacement(Dense(self.value.float().reshape(shape)))
