"""LoHa: ΔW = γ · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), or the Tucker form with `hada_t1/t2`; γ = alpha / rank.

This equals the LyCORIS forward pass, not LyCORIS `merge_to`/`get_merged_weight`, which apply γ twice
(formats.md §8 D1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeMismatch
from .base import DeltaPatch, Params, as_float, as_kernel, compute_dtype, dense_form, fetch, rank_scale, tucker
from .forms import LowRank
from .into import chunk_rows, in_compute, out_for, row_ranges, store

SIGNATURE = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass
class LoHaPatch(DeltaPatch):
    kind = "loha"
    consumes = SIGNATURE + ("hada_t1", "hada_t2", "alpha", "scale")

    w1a: Tensor
    w1b: Tensor
    w2a: Tensor
    w2b: Tensor
    t1: Tensor | None = None
    t2: Tensor | None = None
    alpha_value: float | None = None
    scale_override: float | None = None

    @classmethod
    def from_params(cls, p: Params) -> "LoHaPatch | None":
        if not all(k in p for k in SIGNATURE):
            return None
        w1a, w1b, w2a, w2b = (p[k] for k in SIGNATURE)
        t1, t2 = p.get("hada_t1"), p.get("hada_t2")
        if (t1 is None) != (t2 is None):
            raise ShapeMismatch("LoHa Tucker form needs both hada_t1 and hada_t2")
        r = w1b.shape[0]
        if t1 is None:
            ok = w1a.shape[1] == r and w2a.shape[1] == w2b.shape[0] and w1a.shape[0] == w2a.shape[0] \
                and w1b.reshape(r, -1).shape[1] == w2b.reshape(w2b.shape[0], -1).shape[1]
        else:
            ok = w1a.shape[0] == r and t1.shape[:2] == (r, r) and t2.shape[0] == w2a.shape[0] == w2b.shape[0] \
                and w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1]
        if not ok:
            raise ShapeMismatch("LoHa factors have inconsistent shapes: " + ", ".join(
                f"{k} {list(p[k].shape)}" for k in SIGNATURE))
        return cls(w1a, w1b, w2a, w2b, t1, t2, as_float(p.get("alpha")), as_float(p.get("scale")))

    @property
    def rank(self):
        return int(self.w1b.shape[0])

    @property
    def alpha(self):
        return self.alpha_value

    @property
    def out_dim(self):
        return int(self.w1a.shape[1] if self.t1 is not None else self.w1a.shape[0])

    @property
    def in_dim(self):
        return int(self.w1b.shape[1])

    def delta(self, weight: Tensor, multiplier: float = 1.0) -> Tensor:
        f = lambda t: fetch(t, weight)  # noqa: E731
        if self.t1 is not None:
            m1 = tucker(f(self.t1), f(self.w1a), f(self.w1b).reshape(self.w1b.shape[0], -1))
            m2 = tucker(f(self.t2), f(self.w2a), f(self.w2b).reshape(self.w2b.shape[0], -1))
            d = m1 * m2
        else:
            d = (f(self.w1a) @ f(self.w1b).reshape(self.rank, -1)) * (f(self.w2a) @ f(self.w2b).reshape(self.w2b.shape[0], -1))
        if d.numel() != weight.numel():
            raise ShapeMismatch(f"LoHa gives {tuple(d.shape)}, the weight is {list(weight.shape)}")
        return d.reshape(weight.shape) * (rank_scale(self.alpha_value, self.rank, self.scale_override) * multiplier)

    def forward_form(self, shape):
        """(A1·B1) ⊙ (A2·B2) = Σ_pq (a1_p ⊙ a2_q)(b1_p ⊙ b2_q)ᵀ: a rank r1·r2 LoRA (Tucker: with a (r1·r2)² k×k core).
        Used when its factors are smaller than ΔW itself; else ΔW is built once (Dense)."""
        scale = rank_scale(self.alpha_value, self.rank, self.scale_override)
        f = lambda t: t.float() if t.dtype != torch.float64 else t  # noqa: E731
        if self.t1 is None:
            up = (f(self.w1a)[:, :, None] * f(self.w2a)[:, None, :]).flatten(1)
            down = (f(self.w1b).reshape(self.w1b.shape[0], 1, -1) * f(self.w2b).reshape(1, self.w2b.shape[0], -1)).flatten(0, 1)
            form = LowRank(as_kernel(down, shape), up, scale)
        else:
            up = (f(self.w1a).T[:, :, None] * f(self.w2a).T[:, None, :]).flatten(1)
            w1b, w2b = f(self.w1b).reshape(self.w1b.shape[0], -1), f(self.w2b).reshape(self.w2b.shape[0], -1)
            down = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)[:, :, None, None]
            core = torch.einsum("pqhw,PQhw->pPqQhw", f(self.t1), f(self.t2)).flatten(0, 1).flatten(1, 2)
            form = LowRank(down, up, scale, core)
        if form.nbytes() > math.prod(shape) * 4:
            return dense_form(self, shape)
        return form

    def _into(self, src: Tensor, k: float, delta: Tensor, dst: Tensor | None, ws) -> None:
        """delta = (w1a@w1b) ⊙ (w2a@w2b) · k (the two products whole, as `delta` forms them; the rest by chunks),
        then dst = src + delta when `dst` is given. Slot 2 holds the first product."""
        f = lambda t: fetch(t, src)  # noqa: E731
        w1b, w2b = f(self.w1b).reshape(self.rank, -1), f(self.w2b).reshape(self.w2b.shape[0], -1)
        rows, cols = self.w1a.shape[0], w1b.shape[1]
        if rows * cols != src.numel() or (self.w2a.shape[0], w2b.shape[1]) != (rows, cols):
            raise ShapeMismatch(f"LoHa gives {(rows, cols)}, the weight is {list(src.shape)}")
        cd = delta.dtype
        m1 = torch.mm(f(self.w1a), w1b, out=ws.whole(2, (rows, cols), cd, src.device))
        m2 = torch.mm(f(self.w2a), w2b, out=delta.view(rows, cols))
        src2 = src.view(rows, cols)
        dst2 = dst.view(rows, cols) if dst is not None else None
        for lo, hi in row_ranges(rows, chunk_rows(m2)):
            x = torch.mul(m1[lo:hi], m2[lo:hi], out=m2[lo:hi])
            if k != 1.0:  # × 1.0 is exact: skipping it changes no bit
                x.mul_(k)
            if dst2 is not None:
                out = out_for(dst2[lo:hi], cd, ws, 1)
                torch.add(in_compute(src2[lo:hi], cd, ws, 0), x, out=out)
                store(out, dst2[lo:hi])

    def delta_into(self, src, multiplier, out, ws):
        if self.t1 is not None:
            return super().delta_into(src, multiplier, out, ws)
        self._into(src, rank_scale(self.alpha_value, self.rank, self.scale_override) * multiplier, out, None, ws)

    def merge_into(self, src, strength, dst, ws):
        cd = compute_dtype(src)
        if self.t1 is not None or strength == 0:
            return super().merge_into(src, strength, dst, ws)
        self.check(src)
        delta = dst if dst.dtype == cd and dst.data_ptr() != src.data_ptr() else ws.whole(1, src.shape, cd, src.device)
        self._into(src, rank_scale(self.alpha_value, self.rank, self.scale_override) * strength, delta, dst, ws)
