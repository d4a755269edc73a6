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
from .into import add_into, cast_into, chunk_rows, in_compute, out_for, row_ranges, store


def _viewable(t: Tensor, shape) -> bool:
    try:
        t.view(shape)
    except RuntimeError:
        return False
    return True


def column_norm(w: Tensor, on_output: bool, scratch: Tensor | None = None) -> Tensor:
    """‖w‖ per output row (shape (O,1,…)) or per input column (shape (1,I,1,…)), plus the dtype's eps as LyCORIS.

    `scratch` (optional, w's numel): where the column case puts its transposed copy instead of a new tensor."""
    eps = torch.finfo(w.dtype).eps
    if on_output:
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1)) + eps
    t = w.transpose(0, 1)
    if scratch is None or _viewable(t, (w.shape[1], -1)):
        columns = t.reshape(w.shape[1], -1)  # a strided view for linear weights, a contiguous copy for k×k convs
    else:
        columns = scratch.view(t.shape).copy_(t).view(w.shape[1], -1)  # the copy reshape would make
    n = columns.norm(dim=1)
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

    def scale_factor(self, merged: Tensor, scratch: Tensor | None = None) -> Tensor:
        """m / ‖W + ΔW‖ on the norm axis, broadcastable over the weight."""
        norm = column_norm(merged, self.on_output, scratch)
        m = fetch(self.magnitude, merged)
        if m.numel() != norm.numel():
            raise ShapeMismatch(f"DoRA magnitude has {m.numel()} entries, the norm axis has {norm.numel()}")
        return m.reshape(norm.shape) / norm

    def merge(self, weight, strength, bias=None):
        self.check(weight)
        w = weight.to(compute_dtype(weight))
        if strength == 0:
            return w, bias
        merged = w + self.inner.delta(w)
        target = merged * self.scale_factor(merged)
        return w + strength * (target - w), bias

    def forward_form(self, shape):
        """m ⊙ (W + Δ)/‖W + Δ‖ blended by s: a row (or input-column) scale plus the inner Δ scaled by it; the norm
        needs the weight and is filled in by the engine once per switch."""
        inner = self.inner.forward_form(shape)
        if not isinstance(inner, ADDITIVE):
            return None
        return DoRAForm(inner, self.magnitude.float().reshape(-1), self.on_output)

    def merge_into(self, src, strength, dst, ws):
        """W + ΔW built once in place (dst or slot 1), its norms, then the blend by chunks."""
        self.check(src)
        if strength == 0:
            return cast_into(src, dst)
        cd = compute_dtype(src)
        merged = dst if dst.dtype == cd and dst.data_ptr() != src.data_ptr() else ws.whole(1, src.shape, cd, src.device)
        self.inner.delta_into(src, 1.0, merged, ws)
        add_into(src, merged, merged, ws)
        factor = self.scale_factor(merged, None if self.on_output else ws.whole(2, (src.numel(),), cd, src.device))
        for lo, hi in row_ranges(src.shape[0], chunk_rows(src)):
            w = in_compute(src[lo:hi], cd, ws, 0)
            t = torch.mul(merged[lo:hi], factor[lo:hi] if self.on_output else factor, out=merged[lo:hi])
            torch.sub(t, w, out=t).mul_(strength)
            out = out_for(dst[lo:hi], cd, ws, 1)
            torch.add(w, t, out=out)
            store(out, dst[lo:hi])
