"""LoRA / LoCon: ΔW = γ · up @ down, with kohya's conv `lora_mid` (CP/Tucker) form; γ = alpha / rank.

Spellings (kohya `lora_up/lora_down`, PEFT `lora_A/lora_B`, diffusers `lora.up/down`, `lora_linear_layer.up/down`)
are normalised to `lora_up.weight` / `lora_down.weight` when keys are split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeMismatch
from .base import DeltaPatch, Params, as_float, as_kernel, fetch, flat, rank_scale, tucker
from .forms import Dense, LowRank, Sum

SIGNATURE = ("lora_up.weight", "lora_down.weight")


def densify_residual(p: Params) -> Tensor:
    """The LyCORIS extractor's sparse residual (`bias_indices` (2, nnz), `bias_values` (nnz,), `bias_size` (2,))
    as a dense (O, I·k) tensor; indices are checked first (an out-of-range index would write out of bounds)."""
    if "bias_values" not in p or "bias_size" not in p:
        raise ShapeMismatch("sparse residual needs bias_indices, bias_values and bias_size together")
    indices, values = p["bias_indices"].long(), p["bias_values"].float().reshape(-1)
    size = [int(v) for v in p["bias_size"].reshape(-1).tolist()]
    if len(size) != 2 or min(size) < 0 or indices.ndim != 2 or indices.shape != (2, values.numel()):
        raise ShapeMismatch(f"sparse residual: indices {list(indices.shape)}, values {list(values.shape)}, size {size}")
    if indices.numel() and (bool((indices < 0).any()) or bool((indices.max(dim=1).values >= torch.tensor(size)).any())):
        raise ShapeMismatch(f"sparse residual indices fall outside its size {size}")
    dense = torch.zeros(size, dtype=torch.float32)
    dense.index_put_((indices[0], indices[1]), values, accumulate=True)
    return dense


@dataclass
class LoRAPatch(DeltaPatch):
    kind = "lora"
    consumes = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "scale", "bias",
                "bias_indices", "bias_values", "bias_size", "lora_up.bias", "diff_b")

    up: Tensor
    down: Tensor
    mid: Tensor | None = None
    alpha_value: float | None = None
    scale_override: float | None = None
    extra: Tensor | None = None  # A1111 dense `bias` or densified sparse residual: added to up@down before scaling
    up_bias: Tensor | None = None  # PEFT `lora_B.bias` (BFL Control LoRAs): Δb = γ·b_up
    diff_b: Tensor | None = None  # ComfyUI's bias diff beside a LoRA: Δb = diff_b

    @classmethod
    def from_params(cls, p: Params) -> "LoRAPatch | None":
        if not all(k in p for k in SIGNATURE):
            return None
        up, down, mid = p["lora_up.weight"], p["lora_down.weight"], p.get("lora_mid.weight")
        r = down.shape[0]
        if up.ndim < 2 or down.ndim < 2 or flat(up).shape[1] != r:
            raise ShapeMismatch(f"lora_up {list(up.shape)} and lora_down {list(down.shape)} disagree on the rank")
        if mid is not None and (mid.ndim != 4 or tuple(mid.shape[:2]) != (r, r)):
            raise ShapeMismatch(f"lora_mid {list(mid.shape)} does not fit rank {r}")
        extra = p.get("bias")
        if "bias_indices" in p:
            extra = densify_residual(p)
        return cls(up, down, mid, as_float(p.get("alpha")), as_float(p.get("scale")), extra, p.get("lora_up.bias"),
                   p.get("diff_b"))

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

    def delta_bias(self, bias: Tensor | None) -> Tensor | None:
        if bias is None or (self.up_bias is None and self.diff_b is None):
            return None
        db = torch.zeros(bias.shape, dtype=torch.float32)
        for t, factor in ((self.up_bias, self.scale), (self.diff_b, 1.0)):
            if t is not None:
                if t.numel() != bias.numel():
                    raise ShapeMismatch(f"bias delta has {t.numel()} entries, the bias {bias.numel()}")
                db = db + factor * t.float().reshape(bias.shape)
        return db

    def delta(self, weight: Tensor, multiplier: float = 1.0) -> Tensor:
        up, down = fetch(self.up, weight), fetch(self.down, weight)
        if self.mid is not None:
            d = tucker(fetch(self.mid, weight), flat(up).T, flat(down))
        else:
            d = flat(up) @ flat(down)
        if self.extra is not None:
            d = d.reshape(-1) + fetch(self.extra, weight).reshape(-1)
        if d.numel() != weight.numel():
            raise ShapeMismatch(f"LoRA gives {d.numel()} elements ({self.out_dim} rows), the weight is {list(weight.shape)}")
        return d.reshape(weight.shape) * (self.scale * multiplier)

    def forward_form(self, shape):
        """y += s·γ·up(down(x)) (conv: down as the layer's conv, mid as the k×k conv between 1×1 down and up)."""
        up = flat(self.up).float()
        if self.mid is not None:
            down = flat(self.down).float()[:, :, None, None]
            form = LowRank(down, up, self.scale, self.mid.float())
        else:
            form = LowRank(as_kernel(self.down, shape), up, self.scale)
        if self.extra is not None:
            form = Sum(form, Dense(self.extra.float().reshape(shape), self.scale))
        return form

    def delta_into(self, src, multiplier, out, ws):
        """up@down straight into `out`, scaled in place (the mid and residual forms build ΔW as `delta` does)."""
        if self.mid is not None or self.extra is not None:
            return super().delta_into(src, multiplier, out, ws)
        up, down = flat(fetch(self.up, src)), flat(fetch(self.down, src))
        if up.shape[0] * down.shape[1] != src.numel():
            raise ShapeMismatch(f"LoRA gives {up.shape[0] * down.shape[1]} elements ({self.out_dim} rows), "
                                f"the weight is {list(src.shape)}")
        torch.mm(up, down, out=out.view(up.shape[0], down.shape[1]))
        k = self.scale * multiplier
        if k != 1.0:  # × 1.0 is exact: skipping it changes no bit
            out.mul_(k)
