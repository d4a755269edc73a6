"""What every layer patch offers, and the small helpers their math shares.

A patch is built from one layer's tensors by its algorithm's `from_params` (None when the signature does not
match) and answers one question: given the current weight (and bias) and a strength, what is the new weight.
Math runs in float32, or float64 when the weight is float64; callers cast the result back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ShapeMismatch
from .into import add_into, cast_into

Params = dict[str, Tensor]


def compute_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def as_float(t: Tensor | None) -> float | None:
    """A scalar tensor of any dtype and shape () or (1,) as a Python float."""
    if t is None:
        return None
    if t.numel() != 1:
        raise ShapeMismatch(f"expected a scalar, got shape {list(t.shape)}")
    return float(t.reshape(-1)[0].to(torch.float64))


def flat(t: Tensor) -> Tensor:
    """(O, I, kh, kw) → (O, I·kh·kw) in PyTorch's own memory order."""
    return t.reshape(t.shape[0], -1)


def rank_scale(alpha: float | None, rank: int | None, explicit_scale: float | None = None) -> float:
    """alpha / rank; a missing or zero alpha means 1 (as the trainers store it), an explicit `scale` key wins."""
    if explicit_scale is not None:
        return explicit_scale
    if alpha is None or rank is None or alpha == 0:
        return 1.0
    return alpha / rank


def check_numel(delta: Tensor, weight_shape: torch.Size, what: str) -> None:
    if delta.numel() != math.prod(weight_shape):
        raise ShapeMismatch(f"{what} has {tuple(delta.shape)} elements' worth {delta.numel()}, the weight is {tuple(weight_shape)}")


def tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """M[o,i,h,w] = Σ_{p,q} core[p,q,h,w] · a[p,o] · b[q,i] (LoHa/LoKr Tucker, LoRA mid with a = upᵀ)."""
    return torch.einsum("pqhw,po,qi->oihw", core, a, b)


@dataclass
class LayerPatch:
    """One adapter layer's effect on one weight."""

    kind: ClassVar[str] = "?"
    consumes: ClassVar[tuple[str, ...]] = ()

    def merge(self, weight: Tensor, strength: float, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """New (weight, bias) at `strength`, in the compute dtype of `weight`."""
        raise NotImplementedError

    @property
    def rank(self) -> int | None:
        return None

    @property
    def alpha(self) -> float | None:
        return None

    @property
    def dora(self) -> bool:
        return False

    @property
    def out_dim(self) -> int | None:
        """Output rows this patch expects, where its tensors tell; None where they do not."""
        return None

    @property
    def in_dim(self) -> int | None:
        """Input width (channels) this patch was trained on, where its tensors tell."""
        return None

    def check(self, weight: Tensor) -> None:
        """Refuse a weight whose output rows differ from the patch's."""
        if self.out_dim is not None and self.out_dim != weight.shape[0]:
            raise ShapeMismatch(f"{self.kind} patch has {self.out_dim} output rows, the weight is {list(weight.shape)}")

    def tensors(self) -> list[Tensor]:
        return [v for v in vars(self).values() if isinstance(v, Tensor)]

    def forward_form(self, shape: tuple[int, ...]):
        """This patch as a forward-path form (`forms.py`) on a layer block of weight shape `shape`; None when it has
        none (the engine reports the layer)."""
        return None


@dataclass
class DeltaPatch(LayerPatch):
    """Additive patches: W' = W + s·ΔW (ΔW may read W, as GLoRA does), b' = b + s·Δb."""

    def delta(self, weight: Tensor, multiplier: float = 1.0) -> Tensor:
        """ΔW · multiplier shaped like `weight`, in its compute dtype, alpha/rank scale included.

        The strength comes in as one factor with the scale (γ·s), as PEFT/diffusers fuse it, so results agree to the bit.
        """
        raise NotImplementedError

    def delta_bias(self, bias: Tensor | None) -> Tensor | None:
        return None

    def merge(self, weight, strength, bias=None):
        self.check(weight)
        cd = compute_dtype(weight)
        w = weight.to(cd)
        new_w = w + self.delta(w, strength) if strength != 0 else w
        return new_w, self.bias_after(bias, strength, cd)

    def bias_after(self, bias: Tensor | None, strength: float, cd: torch.dtype) -> Tensor | None:
        """b + s·Δb in `cd` (the weight's compute dtype); `bias` itself when nothing changes it."""
        db = self.delta_bias(bias)
        if db is not None and bias is not None and strength != 0:
            return bias.to(cd) + strength * db.to(device=bias.device, dtype=cd).reshape(bias.shape)
        return bias

    def delta_into(self, src: Tensor, multiplier: float, out: Tensor, ws) -> None:
        """`out` (compute dtype, shaped like `src`) = delta(src, multiplier), bit for bit; overridden where ΔW can be
        built without a temporary."""
        w = src if src.dtype == out.dtype else src.to(out.dtype)
        out.copy_(self.delta(w, multiplier))

    def merge_into(self, src: Tensor, strength: float, dst: Tensor, ws) -> None:
        """`dst` = merge(src, strength)[0] bit for bit, cast once to dst's dtype; `dst` may be `src` (into.py)."""
        self.check(src)
        cd = compute_dtype(src)
        if strength == 0:
            return cast_into(src, dst)
        delta = dst if dst.dtype == cd and dst.data_ptr() != src.data_ptr() else ws.whole(1, src.shape, cd, src.device)
        self.delta_into(src, strength, delta, ws)
        add_into(src, delta, dst, ws)


def as_kernel(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A factor (r, I[·kh·kw]) shaped for a layer of weight shape `shape`: (r, I) for a linear, (r, I, kh, kw) for a
    conv; float32 (float64 stays float64)."""
    t = t.float() if t.dtype != torch.float64 else t
    if len(shape) == 2:
        return t.reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], shape[1], *shape[2:]) if t[0].numel() == shape[1] * shape[2] * shape[3] \
        else t.reshape(t.shape[0], -1, 1, 1)


def dense_form(patch: "DeltaPatch", shape: tuple[int, ...]):
    """ΔW built once from the merge math (a patch whose ΔW does not read W), as a Dense form."""
    from .forms import Dense

    return Dense(patch.delta(torch.zeros(shape)))


def fetch(t: Tensor, like: Tensor) -> Tensor:
    """A patch tensor on the weight's device in its compute dtype."""
    return t.to(device=like.device, dtype=compute_dtype(like))
