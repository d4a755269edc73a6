"""LoKr: ΔW = γ · w1 ⊗ w2, each factor full or split (`_a @ _b`), w2 optionally Tucker (`lokr_t2`).

The factor sizes (O = a·b, I = c·d) come from the shapes; γ = alpha / rank when a factor is split
(rank of w2's split if any, else w1's), else 1 — LyCORIS, A1111, ComfyUI and Forge agree (PEFT differs, D7:
a PEFT config in the file's metadata supplies alpha / r there, see peft_config.apply_peft_config). Like LoHa, this is
the LyCORIS forward, not its `merge_to` (γ applied twice, formats.md §8 D1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeMismatch
from .base import DeltaPatch, Params, as_float, compute_dtype, dense_form, fetch, rank_scale, tucker
from .forms import Kron
from .into import cast_into, chunk_rows, in_compute, out_for, row_ranges, store


def kron(w1: Tensor, w2: Tensor) -> Tensor:
    """w1 (a, c) ⊗ w2 (b, d, …) → (a·b, c·d, …) by einsum (torch.kron fails on non-contiguous Tucker w2)."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    return torch.einsum("ac,bd...->abcd...", w1, w2).reshape(a * b, c * d, *w2.shape[2:])


@dataclass
class LoKrPatch(DeltaPatch):
    kind = "lokr"
    consumes = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "scale")

    w1: Tensor | None = None
    w1a: Tensor | None = None
    w1b: Tensor | None = None
    w2: Tensor | None = None
    w2a: Tensor | None = None
    w2b: Tensor | None = None
    t2: Tensor | None = None
    alpha_value: float | None = None
    scale_override: float | None = None

    @classmethod
    def from_params(cls, p: Params) -> "LoKrPatch | None":
        has1 = "lokr_w1" in p or ("lokr_w1_a" in p and "lokr_w1_b" in p)
        has2 = "lokr_w2" in p or ("lokr_w2_a" in p and "lokr_w2_b" in p)
        if not (has1 and has2):
            return None
        patch = cls(p.get("lokr_w1"), p.get("lokr_w1_a"), p.get("lokr_w1_b"), p.get("lokr_w2"),
                    p.get("lokr_w2_a"), p.get("lokr_w2_b"), p.get("lokr_t2"),
                    as_float(p.get("alpha")), as_float(p.get("scale")))
        patch._validate()
        return patch

    def _validate(self) -> None:
        try:
            if self.w1 is None:
                assert self.w1a.shape[1] == self.w1b.shape[0]
            if self.w2 is None:
                if self.t2 is not None:
                    assert self.t2.shape[:2] == (self.w2a.shape[0], self.w2b.shape[0])
                else:
                    assert self.w2a.shape[1] == self.w2b.shape[0]
        except AssertionError:
            shapes = {k: list(v.shape) for k, v in vars(self).items() if isinstance(v, Tensor)}
            raise ShapeMismatch(f"LoKr factors have inconsistent shapes: {shapes}") from None

    @property
    def rank(self):
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        return None

    @property
    def alpha(self):
        return self.alpha_value

    @property
    def factors(self) -> tuple[int, int]:
        """(a, b) with O = a·b: rows of w1 and of w2."""
        a = (self.w1 if self.w1 is not None else self.w1a).shape[0]
        if self.w2 is not None:
            b = self.w2.shape[0]
        else:
            b = self.w2a.shape[1] if self.t2 is not None else self.w2a.shape[0]
        return int(a), int(b)

    @property
    def out_dim(self):
        a, b = self.factors
        return a * b

    @property
    def in_dim(self):
        c = (self.w1 if self.w1 is not None else self.w1b).shape[1]
        d = (self.w2 if self.w2 is not None else self.w2b).shape[1]
        return int(c * d)

    def kron_factors(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(w1 as (a, c), w2 as (b, d, …)) in the compute dtype of `like`, each built from its split or Tucker form."""
        f = lambda t: fetch(t, like)  # noqa: E731
        w1 = f(self.w1) if self.w1 is not None else f(self.w1a) @ f(self.w1b)
        if self.w2 is not None:
            w2 = f(self.w2)
        elif self.t2 is not None:
            w2 = tucker(f(self.t2), f(self.w2a), f(self.w2b))
        else:
            w2 = f(self.w2a) @ f(self.w2b)
        return w1.reshape(w1.shape[0], -1), w2

    def delta(self, weight: Tensor, multiplier: float = 1.0) -> Tensor:
        w1, w2 = self.kron_factors(weight)
        d = kron(w1, w2)
        if d.numel() != weight.numel():
            raise ShapeMismatch(f"LoKr gives {tuple(d.shape)}, the weight is {list(weight.shape)}")
        return d.reshape(weight.shape) * (rank_scale(self.alpha_value, self.rank, self.scale_override) * multiplier)

    def forward_form(self, shape):
        """w1 ⊗ w2 applied as w1·X·w2ᵀ on the input seen as a (c, d) matrix (conv: w2 as a conv on c groups of d
        channels), w2 kept split when it is; ΔW itself only when the factors do not tile the layer this way."""
        f = lambda t: t.float() if t.dtype != torch.float64 else t  # noqa: E731
        w1 = f(self.w1) if self.w1 is not None else f(self.w1a) @ f(self.w1b)
        w1 = w1.reshape(w1.shape[0], -1)
        scale = rank_scale(self.alpha_value, self.rank, self.scale_override)
        (a, c), conv = w1.shape, len(shape) == 4
        if conv or self.w2 is not None or self.t2 is not None:
            if self.w2 is not None:
                w2 = f(self.w2)
            elif self.t2 is not None:
                w2 = tucker(f(self.t2), f(self.w2a), f(self.w2b))
            else:
                w2 = f(self.w2a) @ f(self.w2b).flatten(1)
            kernel = math.prod(shape[2:]) if conv else 1
            per_group = w2[0].numel()
            fits = a * w2.shape[0] == shape[0] and per_group % kernel == 0 and c * (per_group // kernel) == shape[1]
            if not fits:
                return dense_form(self, shape)
            if conv:
                w2 = w2.reshape(w2.shape[0], shape[1] // c, *shape[2:])
            else:
                w2 = w2.reshape(w2.shape[0], -1)
            return Kron(w1, w2=w2, scale=scale)
        w2a, w2b = f(self.w2a), f(self.w2b).reshape(self.w2b.shape[0], -1)
        if a * w2a.shape[0] != shape[0] or c * w2b.shape[1] != shape[1]:
            return dense_form(self, shape)
        return Kron(w1, w2a=w2a, w2b=w2b, scale=scale)

    def _kron_blocks(self, src: Tensor, multiplier: float):
        """(ΔW's shape as (a·b, c·d·…) rows, build, [(lo, hi, block)] per chunk): `build(x, *block)` writes
        γ·s·(w1 ⊗ w2) of rows lo:hi into the compute-dtype tensor x, so ΔW is made a cache-sized block at a time."""
        w1, w2 = self.kron_factors(src)
        (a, c), b = w1.shape, w2.shape[0]
        w2f = w2.reshape(b, -1)
        e = w2f.shape[1]
        if a * b * c * e != src.numel():
            raise ShapeMismatch(f"LoKr gives {(a * b, c * w2.shape[1], *w2.shape[2:])}, the weight is {list(src.shape)}")
        k = rank_scale(self.alpha_value, self.rank, self.scale_override) * multiplier

        def build(x: Tensor, a0: int, a1: int, b0: int, b1: int) -> Tensor:
            x = torch.mul(w1[a0:a1, None, :, None], w2f[None, b0:b1, None, :], out=x.view(a1 - a0, b1 - b0, c, e))
            if k != 1.0:  # × 1.0 is exact: skipping it changes no bit
                x.mul_(k)
            return x.view(-1, c * e)

        rows = chunk_rows(src.view(a * b, c * e))
        if rows >= b:  # whole w1 rows per chunk
            blocks = [(a0 * b, a1 * b, (a0, a1, 0, b)) for a0, a1 in row_ranges(a, rows // b)]
        else:
            blocks = [(i * b + b0, i * b + b1, (i, i + 1, b0, b1)) for i in range(a) for b0, b1 in row_ranges(b, rows)]
        return (a * b, c * e), build, blocks

    def delta_into(self, src, multiplier, out, ws):
        shape, build, blocks = self._kron_blocks(src, multiplier)
        out2 = out.view(shape)
        for lo, hi, block in blocks:
            build(out2[lo:hi], *block)

    def merge_into(self, src, strength, dst, ws):
        """W + γ·s·(w1 ⊗ w2) written chunk by chunk: each chunk's Kronecker block is built in the cache, never ΔW."""
        self.check(src)
        if strength == 0:
            return cast_into(src, dst)
        cd = compute_dtype(src)
        shape, build, blocks = self._kron_blocks(src, strength)
        src2, dst2 = src.view(shape), dst.view(shape)
        for lo, hi, block in blocks:
            x = build(ws.chunk(2, (hi - lo) * shape[1], cd, src.device), *block)
            out = out_for(dst2[lo:hi], cd, ws, 1)
            torch.add(in_compute(src2[lo:hi], cd, ws, 0), x, out=out)
            store(out, dst2[lo:hi])
