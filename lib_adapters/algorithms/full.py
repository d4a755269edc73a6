"""Full diff: W' = W + s·diff, b' = b + s·diff_b (either may come alone: ComfyUI writes bias-only `diff_b`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeMismatch
from .base import DeltaPatch, Params, fetch
from .forms import Dense


@dataclass
class FullPatch(DeltaPatch):
    kind = "full"
    consumes = ("diff", "diff_b")

    diff: Tensor | None
    diff_b: Tensor | None = None

    @classmethod
    def from_params(cls, p: Params) -> "FullPatch | None":
        return cls(p.get("diff"), p.get("diff_b")) if "diff" in p or "diff_b" in p else None

    @property
    def is_zero(self) -> bool:
        """All-zero diffs (extracted/mixture files pad with them): no work to do."""
        return all(t is None or not bool(t.any()) for t in (self.diff, self.diff_b))

    @property
    def out_dim(self):
        t = self.diff if self.diff is not None else self.diff_b
        return int(t.shape[0]) if t.ndim else None

    @property
    def in_dim(self):
        return int(self.diff.shape[1]) if self.diff is not None and self.diff.ndim > 1 else None

    def delta(self, weight, multiplier=1.0):
        if self.diff is None:
            return torch.zeros_like(weight)
        if self.diff.numel() != weight.numel():
            raise ShapeMismatch(f"diff is {list(self.diff.shape)}, the weight is {list(weight.shape)}")
        return fetch(self.diff, weight).reshape(weight.shape) * multiplier

    def delta_bias(self, bias):
        if self.diff_b is not None and bias is not None and self.diff_b.numel() != bias.numel():
            raise ShapeMismatch(f"diff_b is {list(self.diff_b.shape)}, the bias is {list(bias.shape)}")
        return self.diff_b

    def forward_form(self, shape):
        return Dense(self.diff.float().reshape(shape))
