"""Forward-path forms: what a patch does to a layer's output, from its factors, with the strength as a plain number.

A weight op W → L·W·R + Δ (L on output rows, R on input columns, Δ additive) acts on y = W·x as
y → L·(W·(R·x)) + Δ·x. Each patch's `forward_form()` (beside its merge math) returns one of these, built once per
adapter (strength-independent); `lib_adapters.forward` runs them per step. Rows are the last axis here: linear
outputs already are, conv outputs are moved (channels last) by the caller. All functions are pure.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Geometry:
    """How the layer applies its weight: F.linear, or F.conv2d with these arguments."""

    conv: bool = False
    stride: tuple = (1, 1)
    padding: tuple | str = (0, 0)
    dilation: tuple = (1, 1)


@dataclass
class Form:
    """Base: tensors are dataclass fields (moved/cast together by `map_tensors`)."""

    def map_tensors(self, fn) -> "Form":
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                changes[f.name] = fn(v)
            elif isinstance(v, Form):
                changes[f.name] = v.map_tensors(fn)
        return replace(self, **changes)

    def nbytes(self) -> int:
        total = 0
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                total += v.numel() * v.element_size()
            elif isinstance(v, Form):
                total += v.nbytes()
        return total


# ---- additive forms: y += s·Δx (plus s·Δb) -----------------------------------------------------------------------

@dataclass
class LowRank(Form):
    """Δ = scale · up · mid · down: down (r, I[, kh, kw]) as the layer's own conv, mid (r2, r, kh, kw) optional
    (then down is 1×1), up (O, r2) 1×1. LoRA/LoCon, LoHa (rank r1·r2), GLoRA's b-part."""

    down: Tensor
    up: Tensor
    scale: float = 1.0
    mid: Tensor | None = None

    def add(self, x: Tensor, g: Geometry) -> Tensor:
        if not g.conv:
            return F.linear(F.linear(x, self.down), self.up) * self.scale
        if self.mid is None:
            h = F.conv2d(x, self.down, None, g.stride, g.padding, g.dilation)
        else:
            h = F.conv2d(F.conv2d(x, self.down), self.mid, None, g.stride, g.padding, g.dilation)
        return F.conv2d(h, self.up[:, :, None, None]) * self.scale


@dataclass
class Kron(Form):
    """Δ = scale · w1 ⊗ w2, without forming it: w1 (a, c); w2 (b, d) or split w2a (b, r) · w2b (r, d) on a linear
    layer, w2 (b, d, kh, kw) on a conv (applied as a conv on c groups of d input channels)."""

    w1: Tensor
    w2: Tensor | None = None
    w2a: Tensor | None = None
    w2b: Tensor | None = None
    scale: float = 1.0

    def add(self, x: Tensor, g: Geometry) -> Tensor:
        a, c = self.w1.shape
        if not g.conv:
            lead = x.shape[:-1]
            xs = x.reshape(*lead, c, -1)                                  # (…, c, d)
            if self.w2 is None:
                u = (xs @ self.w2b.T) @ self.w2a.T                        # (…, c, b)
            else:
                u = xs @ self.w2.T
            return (self.w1 @ u).reshape(*lead, -1) * self.scale         # (…, a, b) → a·b rows
        n, ch, hh, ww = x.shape
        h = F.conv2d(x.reshape(n * c, ch // c, hh, ww), self.w2, None, g.stride, g.padding, g.dilation)
        h = h.reshape(n, c, *h.shape[1:])                                 # (n, c, b, H', W')
        return torch.einsum("ac,ncbhw->nabhw", self.w1, h).flatten(1, 2) * self.scale


@dataclass
class Dense(Form):
    """Δ given whole (full diffs, LoRA's dense residual): one extra layer-sized product per step."""

    delta: Tensor
    scale: float = 1.0

    def add(self, x: Tensor, g: Geometry) -> Tensor:
        if not g.conv:
            return F.linear(x, self.delta) * self.scale
        return F.conv2d(x, self.delta, None, g.stride, g.padding, g.dilation) * self.scale


@dataclass
class Sum(Form):
    """Several additive parts of one patch (LoRA + its dense residual)."""

    first: Form
    second: Form

    def add(self, x, g):
        return self.first.add(x, g) + self.second.add(x, g)


ADDITIVE = (LowRank, Kron, Dense, Sum)


# ---- row transforms (left: act on the output rows) -----------------------------------------------------------------

@dataclass
class BlockRotation(Form):
    """OFT: y_k ← y_k · (I + s·(R_k − I)) per block of b rows, then rows ⊙ (1 + s·(rescale − 1))."""

    rotation: Tensor                 # (n, b, b), as the merge applies it: W'_k = R_kᵀ · W_k
    rescale: Tensor | None = None    # (rows,)

    def left(self, z: Tensor, s: float) -> Tensor:
        n, b, _ = self.rotation.shape
        eye = torch.eye(b, dtype=z.dtype, device=z.device)
        r = eye + s * (self.rotation.to(z.dtype) - eye)
        out = torch.einsum("...kn,knm->...km", z.reshape(*z.shape[:-1], n, b), r).reshape(z.shape)
        if self.rescale is not None:
            out = out * (1 + s * (self.rescale.to(z.dtype) - 1))
        return out


@dataclass
class Butterfly(Form):
    """BOFT: m butterfly stages, each I + s·(R_i − I), on the output rows (as the merge does on weight rows)."""

    rotations: Tensor                # (m, n, b, b)
    rescale: Tensor | None = None

    def left(self, z: Tensor, s: float) -> Tensor:
        from .boft import butterfly

        eye = torch.eye(self.rotations.shape[-1], dtype=z.dtype, device=z.device)
        r = eye + s * (self.rotations.to(z.dtype) - eye)
        rows = z.shape[-1]
        out = butterfly(z.reshape(-1, rows).T, r).T.reshape(z.shape)
        if self.rescale is not None:
            out = out * (1 + s * (self.rescale.to(z.dtype) - 1))
        return out


@dataclass
class Scale(Form):
    """(IA)³: rows (or input columns) ⊙ (1 + s·w)."""

    vector: Tensor
    on_input: bool = False

    def left(self, z: Tensor, s: float) -> Tensor:
        return z * (1 + s * self.vector.to(z.dtype))

    def right(self, x: Tensor, s: float) -> Tensor:
        return x * (1 + s * self.vector.to(x.dtype))


@dataclass
class InputMix(Form):
    """GLoRA's W·a1·a2 part: W_k = W_{k−1}·(I + s·γ·A·B) + …, i.e. the input becomes x + s·γ·A(B(x)) (per pixel)."""

    a: Tensor   # (I, r)
    b: Tensor   # (r, I)
    scale: float = 1.0

    def right(self, x: Tensor, s: float) -> Tensor:
        return x + (s * self.scale) * F.linear(F.linear(x, self.b), self.a)


@dataclass
class GLoRAForm(Form):
    """GLoRA: an input mix (right) and an additive low-rank part, both at the same strength."""

    mix: InputMix
    add_part: LowRank


@dataclass
class Replacement(Form):
    """`set_weight`: W_s = (1 − s)·W + s·V, i.e. the rows scaled by 1 − s plus s·V·x."""

    value: Dense


@dataclass
class DoRAForm(Form):
    """DoRA: W_s = W + s·(m ⊙ (W + Δ)/‖W + Δ‖ − W); `norm` (‖W_{k−1} + Δ‖ per row or column) is computed per switch
    from the dequantized weight by the engine, `inner` is Δ's additive form at strength 1."""

    inner: Form
    magnitude: Tensor
    on_output: bool
    norm: Tensor | None = None

    def factor(self) -> Tensor:
        """c = m / ‖W + Δ‖ (rows or columns)."""
        return self.magnitude.reshape(-1).to(self.norm.dtype) / self.norm.reshape(-1)
