"""Norm patches (LyCORIS `train_norm`): γ' = γ + s·w_norm, β' = β + s·b_norm on LayerNorm/GroupNorm."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import ShapeMismatch
from .base import DeltaPatch, Params, fetch


@dataclass
class NormPatch(DeltaPatch):
    kind = "norm"
    consumes = ("w_norm", "b_norm")

    w_norm: Tensor
    b_norm: Tensor | None = None

    @classmethod
    def from_params(cls, p: Params) -> "NormPatch | None":
        return cls(p["w_norm"], p.get("b_norm")) if "w_norm" in p else None

    @property
    def out_dim(self):
        return int(self.w_norm.numel())

    def delta(self, weight, multiplier=1.0):
        return fetch(self.w_norm, weight).reshape(weight.shape) * multiplier

    def delta_bias(self, bias):
        if self.b_norm is not None and bias is not None and self.b_norm.numel() != bias.numel():
            raise ShapeMismatch(f"b_norm is {list(self.b_norm.shape)}, the bias is {list(bias.shape)}")
        return self.b_norm
