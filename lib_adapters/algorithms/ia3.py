"""(IA)³: W' = W ⊙ (1 + s·w), w scaling output rows (`on_input` 0) or input columns (`on_input` 1)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import ShapeMismatch
from .base import LayerPatch, Params, compute_dtype, fetch
from .forms import Scale


@dataclass
class IA3Patch(LayerPatch):
    kind = "ia3"
    consumes = ("weight", "on_input")

    scale_vector: Tensor
    on_input: bool = False

    @classmethod
    def from_params(cls, p: Params) -> "IA3Patch | None":
        if "weight" not in p or "on_input" not in p:
            return None
        return cls(p["weight"], bool(int(p["on_input"].reshape(-1)[0])))

    @property
    def out_dim(self):
        return None if self.on_input else int(self.scale_vector.numel())

    def merge(self, weight, strength, bias=None):
        self.check(weight)
        w = weight.to(compute_dtype(weight))
        if strength == 0:
            return w, bias
        axis = 1 if self.on_input else 0
        if self.scale_vector.numel() != w.shape[axis]:
            raise ShapeMismatch(f"IA3 vector has {self.scale_vector.numel()} entries, the weight is {list(w.shape)} (axis {axis})")
        shape = [1] * w.ndim
        shape[axis] = -1
        return w * (1 + strength * fetch(self.scale_vector, w).reshape(shape)), bias

    def forward_form(self, shape):
        """Output rows (or the input columns) ⊙ (1 + s·w)."""
        axis = 1 if self.on_input else 0
        if self.scale_vector.numel() != shape[axis]:
            return None
        return Scale(self.scale_vector.float().reshape(-1), self.on_input)
