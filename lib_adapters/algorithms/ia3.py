"""(IA)³: W' = W ⊙ (1 + s·w), w scaling output rows (`on_input` 0) or input columns (`on_input` 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeMismatch
from .base import LayerPatch, Params, compute_dtype, fetch
from .forms import Scale
from .into import cast_into, chunk_rows, in_compute, out_for, row_ranges, store


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

    def factor(self, like: Tensor, strength: float) -> Tensor:
        """1 + s·w, shaped to broadcast over `like`'s rows or input columns."""
        axis = 1 if self.on_input else 0
        if self.scale_vector.numel() != like.shape[axis]:
            raise ShapeMismatch(f"IA3 vector has {self.scale_vector.numel()} entries, the weight is {list(like.shape)} (axis {axis})")
        shape = [1] * like.ndim
        shape[axis] = -1
        return 1 + strength * fetch(self.scale_vector, like).reshape(shape)

    def merge(self, weight, strength, bias=None):
        self.check(weight)
        w = weight.to(compute_dtype(weight))
        if strength == 0:
            return w, bias
        return w * self.factor(w, strength), bias

    def forward_form(self, shape):
        """Output rows (or the input columns) ⊙ (1 + s·w)."""
        axis = 1 if self.on_input else 0
        if self.scale_vector.numel() != shape[axis]:
            return None
        return Scale(self.scale_vector.float().reshape(-1), self.on_input)

    def merge_into(self, src, strength, dst, ws):
        """One scaling pass, chunk by chunk, from src to dst."""
        self.check(src)
        if strength == 0:
            return cast_into(src, dst)
        cd = compute_dtype(src)
        factor = self.factor(src, strength)
        for lo, hi in row_ranges(src.shape[0], chunk_rows(src)):
            out = out_for(dst[lo:hi], cd, ws, 1)
            torch.mul(in_compute(src[lo:hi], cd, ws, 0), factor if self.on_input else factor[lo:hi], out=out)
            store(out, dst[lo:hi])
