"""BOFT (LyCORIS butterfly OFT): `oft_blocks (m, n, b, b)`, m stages each rotating n groups of b rows.

Stage i pairs rows 2^i·b/2 apart (a butterfly permutation), rotates each group by R_i (not transposed, unlike
diag-OFT), and undoes the permutation. Strength as LyCORIS: every stage uses I + s·(R_i − I); `rescale` is blended
like OFT's, so strength 0 is the identity. Constraint c = alpha·O over all blocks of all stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeMismatch
from .base import LayerPatch, Params, as_float, compute_dtype, fetch
from .forms import Butterfly
from .into import cast_into
from .oft import blend_rescale, cayley


def butterfly_into(src: Tensor, rotations: Tensor, ws) -> Tensor:
    """`butterfly(src, rotations)` with the same bmm per stage, its permutations copied between two reused
    compute-dtype buffers (workspace slots 1 and 2) instead of fresh tensors; returns the buffer holding the result."""
    m, n, b, _ = rotations.shape
    rows, rest = src.shape[0], src.shape[1:]
    shape = (rows, *rest)
    buffers = (ws.whole(1, shape, rotations.dtype, src.device), ws.whole(2, shape, rotations.dtype, src.device))
    x = src
    for i in range(m):
        k = (2**i) * (b // 2)
        grouped, product = buffers[i % 2], buffers[(i + 1) % 2]  # alternate, so `x` is never overwritten early
        grouped.view(rows // (2 * k), k, 2, -1).copy_(x.reshape(rows // (2 * k), 2, k, -1).transpose(1, 2))
        torch.bmm(rotations[i], grouped.view(n, b, -1), out=product.view(n, b, -1))
        grouped.view(rows // (2 * k), 2, k, -1).copy_(product.view(rows // (2 * k), k, 2, -1).transpose(1, 2))
        x = grouped
    return x


def butterfly(weight: Tensor, rotations: Tensor) -> Tensor:
    """Apply the m butterfly stages `rotations (m, n, b, b)` to the rows of `weight`."""
    m, n, b, _ = rotations.shape
    rows, rest = weight.shape[0], weight.shape[1:]
    x = weight
    for i in range(m):
        k = (2**i) * (b // 2)
        x = x.reshape(rows // (2 * k), 2, k, *rest).transpose(1, 2).reshape(n, b, *rest)
        x = torch.einsum("nij,nj...->ni...", rotations[i], x)
        x = x.reshape(rows // (2 * k), k, 2, *rest).transpose(1, 2).reshape(rows, *rest)
    return x


@dataclass
class BOFTPatch(LayerPatch):
    kind = "boft"
    consumes = ("oft_blocks", "boft_blocks", "alpha", "rescale")

    blocks: Tensor
    constraint_alpha: float = 0.0
    rescale: Tensor | None = None

    @classmethod
    def from_params(cls, p: Params) -> "BOFTPatch | None":
        b = p.get("oft_blocks", p.get("boft_blocks"))
        if b is None or b.ndim != 4:
            return None
        m, n, size, size2 = b.shape
        if size != size2 or size % 2 or n & (n - 1) or 2 ** (m - 1) > n:
            raise ShapeMismatch(f"BOFT blocks {list(b.shape)} are not a butterfly (square even blocks, 2^(m-1) ≤ n, n a power of 2)")
        return cls(b, as_float(p.get("alpha")) or 0.0, p.get("rescale"))

    @property
    def out_dim(self):
        return int(self.blocks.shape[1] * self.blocks.shape[2])

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[2])

    def rotations(self, like: Tensor) -> Tensor:
        """R_i for every stage in `like`'s compute dtype and device, computed once per patch."""
        cache = self.__dict__.setdefault("_rotations", {})  # not a field: no tensor in vars(), no effect on eq
        key = (compute_dtype(like), like.device)
        if key not in cache:
            cache[key] = cayley(fetch(self.blocks, like), self.constraint_alpha * self.out_dim)
        return cache[key]

    def strength_rotations(self, like: Tensor, strength: float) -> Tensor:
        """I + s·(R_i − I) for every stage, in the compute dtype of `like`."""
        r = self.rotations(like)
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        return eye + strength * (r - eye)

    def merge(self, weight, strength, bias=None):
        self.check(weight)
        cd = compute_dtype(weight)
        w = weight.to(cd)
        if strength == 0:
            return w, bias
        out = butterfly(w, self.strength_rotations(w, strength))
        scale = blend_rescale(self.rescale, strength, w)
        if scale is not None:
            out = out * scale.reshape(-1, *[1] * (w.ndim - 1))
        return out, bias

    def forward_form(self, shape):
        """The butterfly stages on the output rows, each I + s·(R_i − I)."""
        blocks = self.blocks.float() if self.blocks.dtype != torch.float64 else self.blocks
        rescale = None if self.rescale is None else self.rescale.float().reshape(-1)
        return Butterfly(cayley(blocks, self.constraint_alpha * self.out_dim), rescale)

    def merge_into(self, src, strength, dst, ws):
        self.check(src)
        if strength == 0:
            return cast_into(src, dst)
        out = butterfly_into(src, self.strength_rotations(src, strength), ws)
        scale = blend_rescale(self.rescale, strength, src)
        if scale is not None:
            out.mul_(scale.reshape(-1, *[1] * (src.ndim - 1)))
        cast_into(out, dst)
