"""DoRA on top of any additive patch: W'' = m ⊙ (W + ΔW) / ‖W + ΔW‖, norm per output row or input column.

The axis comes from the key and shape: PEFT `lora_magnitude_vector` is always per output row; LyCORIS
`dora_scale` is (O, 1…) per output row or (1, I…) per input column. At strength 1 this equals LyCORIS and PEFT.
Strength follows A1111/ComfyUI/Forge: W + s·(W'' − W), so strength 0 is exactly the base weight (LyCORIS would
give W + ΔW at 0, PEFT m ⊙ W/‖W‖; a linear blend is the only choice where 0 means "off" — see README).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeMismatch
from .base import DeltaPatch, LayerPatch, compute_dtype, fetch
from .forms import ADDITIVE, DoRAForm


def column_norm(w: Tensor, on_output: bool) -> Tensor:
    """‖w‖ per output row (shape (O,1,…)) or per input column (shape (1,I,1,…)), plus the dtype's eps as LyCORIS."""
    eps = torch.finfo(w.dtype).eps
    if on_output:
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1)) + eps
    n = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
    return n.reshape(1, -1, *[1] * (w.ndim - 2)) + eps


@dataclass
class DoRAPatch(LayerPatch):
    kind = "dora"

    inner: DeltaPatch
    magnitude: Tensor
    on_output: bool

    @classmethod
    def wrap(cls, inner: DeltaPatch, params) -> "LayerPatch":
        """Wrap `inner` when the layer carries a magnitude vector, else return it as is."""
        if "lora_magnitude_vector" in params:
            return cls(inner, params["lora_magnitude_vector"], True)
        m = params.get("dora_scale")
        if m is None:
            return inner
        out = inner.out_dim
        if m.shape[0] == out and m.numel() == out and not (m.ndim > 1 and m.shape[0] == 1 and out != 1):
            return cls(inner, m, True)
        if m.ndim >= 2 and m.shape[0] == 1:
            return cls(inner, m, False)
        raise ShapeMismatch(f"dora_scale {list(m.shape)} fits neither {out} output rows nor the input columns")

    @property
    def rank(self):
        return self.inner.rank

    @property
    def alpha(self):
        return self.inner.alpha

    @property
    def out_dim(self):
        return self.inner.out_dim

    @property
    def in_dim(self):
        return self.inner.in_dim

    @property
    def dora(self):
        return True

    @property
    def kind_detail(self):
        return getattr(self.inner, "kind_detail", self.inner.kind)

    def tensors(self):
        return self.inner.tensors() + [self.magnitude]

    def merge(self, weight, strength, bias=None):
        self.check(weight)
        w = weight.to(compute_dtype(weight))
        if strength == 0:
            return w, bias
        merged = w + self.inner.delta(w)
        norm = column_norm(merged, self.on_output)
        m = fetch(self.magnitude, w)
        if m.numel() != norm.numel():
            raise ShapeMismatch(f"DoRA magnitude has {m.numel()} entries, the norm axis has {norm.numel()}")
        target = merged * (m.reshape(norm.shape) / norm)
        return w + strength * (target - w), bias

    def forward_form(self, shape):
        """m ⊙ (W + Δ)/‖W + Δ‖ blended by s: a row (or input-column) scale plus the inner Δ scaled by it; the norm
        needs the weight and is filled in by the engine once per switch."""
        inner = self.inner.forward_form(shape)
        if not isinstance(inner, ADDITIVE):
            return None
        return DoRAForm(inner, self.magnitude.float().reshape(-1), self.on_output)
