"""GLoRA: ΔW = γ · (W·a1·a2 + b1·b2) (LyCORIS ≥3.0 layout) or γ · (b2·b1 + W·a2·a1) (2023 layout).

W·a1·a2 contracts W's input-channel axis, so GLoRA reads the current weight. The layout is told apart by
shapes: new a1 (I, r), a2 (r, I), b1 (O, r), b2 (r, I·k); old a1 (r, I), a2 (I, r), b1 (r, I), b2 (O, r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeMismatch
from .base import DeltaPatch, Params, as_float, as_kernel, fetch, flat, rank_scale
from .forms import GLoRAForm, InputMix, LowRank

SIGNATURE = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


@dataclass
class GLoRAPatch(DeltaPatch):
    kind = "glora"
    consumes = SIGNATURE + ("alpha", "scale")

    a1: Tensor
    a2: Tensor
    b1: Tensor
    b2: Tensor
    new_layout: bool = True
    alpha_value: float | None = None
    scale_override: float | None = None

    @classmethod
    def from_params(cls, p: Params) -> "GLoRAPatch | None":
        if not all(k in p for k in SIGNATURE):
            return None
        a1, a2, b1, b2 = (p[k] for k in SIGNATURE)
        new = b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0] and a1.shape[0] == a2.shape[1]
        old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1] and a1.shape[1] == a2.shape[0]
        if new and old:  # square case: the rank is the smaller side
            new = a1.shape[1] <= a1.shape[0]
        elif not (new or old):
            raise ShapeMismatch("GLoRA factors have inconsistent shapes: " + ", ".join(
                f"{k} {list(p[k].shape)}" for k in SIGNATURE))
        return cls(a1, a2, b1, b2, new, as_float(p.get("alpha")), as_float(p.get("scale")))

    @property
    def rank(self):
        return int(self.a2.shape[0] if self.new_layout else self.a1.shape[0])

    @property
    def alpha(self):
        return self.alpha_value

    @property
    def out_dim(self):
        return int(self.b1.shape[0] if self.new_layout else self.b2.shape[0])

    @property
    def in_dim(self):
        return int(self.a1.shape[0] if self.new_layout else self.a1.shape[1])

    def delta(self, weight: Tensor, multiplier: float = 1.0) -> Tensor:
        f = lambda t: flat(fetch(t, weight))  # noqa: E731
        if self.new_layout:
            a, b, c, d = f(self.a1), f(self.a2), f(self.b1), f(self.b2)
        else:
            a, b, c, d = f(self.a2), f(self.a1), f(self.b2), f(self.b1)
        # a (I, r), b (r, I), c (O, r), d (r, I·k)
        wa = torch.einsum("oi...,iq,qj->oj...", weight, a, b)
        bb = c @ d
        if bb.numel() != weight.numel():
            raise ShapeMismatch(f"GLoRA gives {tuple(bb.shape)}, the weight is {list(weight.shape)}")
        return (wa + bb.reshape(weight.shape)) * (rank_scale(self.alpha_value, self.rank, self.scale_override) * multiplier)

    def forward_form(self, shape):
        """W·(I + s·γ·A·B) + s·γ·C·D: the input mixed by x + s·γ·A(B(x)) (per pixel), plus a LoRA C·D."""
        f = lambda t: flat(t).float()  # noqa: E731
        a, b, c, d = (f(self.a1), f(self.a2), f(self.b1), f(self.b2)) if self.new_layout else \
            (f(self.a2), f(self.a1), f(self.b2), f(self.b1))
        scale = rank_scale(self.alpha_value, self.rank, self.scale_override)
        return GLoRAForm(InputMix(a, b, scale), LowRank(as_kernel(d, shape), c, scale))
