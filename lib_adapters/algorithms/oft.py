"""OFT: each block of b output rows is rotated, W'_k = R_kᵀ · W_k, R = Cayley(B − Bᵀ) per block.

Covers kohya `networks.oft` and LyCORIS ≥2.1 diag-OFT (`oft_blocks (n, b, b)`, `alpha` = constraint, optional
`rescale`), and LyCORIS 2.0 `oft_diag` (R stored directly). Block count and size come from the tensor (n·b = O).
Strength, as LyCORIS applies it: R_s = I + s·(R − I); `rescale` is blended the same way (1 + s·(rescale − 1)),
so strength 1 equals LyCORIS exactly and strength 0 is exactly the identity (LyCORIS leaves `rescale` on at 0).
The constraint follows LyCORIS/A1111: with c = alpha·O > 0, Q is scaled down to norm c; alpha 0 = unconstrained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeMismatch
from .base import LayerPatch, Params, as_float, compute_dtype, fetch
from .forms import BlockRotation
from .into import cast_into, chunk_rows, in_compute, row_ranges, store


def cayley(blocks: Tensor, constraint: float) -> Tensor:
    """R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ, Q scaled to Frobenius norm `constraint` (over all blocks) if above it."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def blend_rescale(rescale: Tensor | None, strength: float, like: Tensor) -> Tensor | None:
    return None if rescale is None else 1 + strength * (fetch(rescale, like) - 1)


@dataclass
class OFTPatch(LayerPatch):
    kind = "oft"
    consumes = ("oft_blocks", "oft_diag", "alpha", "rescale")

    blocks: Tensor
    constraint_alpha: float = 0.0
    rescale: Tensor | None = None
    is_rotation: bool = False  # LyCORIS 2.0 `oft_diag`: the rotation itself is stored

    @classmethod
    def from_params(cls, p: Params) -> "OFTPatch | None":
        if "oft_blocks" in p and p["oft_blocks"].ndim == 3:
            b = p["oft_blocks"]
            rotation = False
        elif "oft_diag" in p and p["oft_diag"].ndim == 3:
            b = p["oft_diag"]
            rotation = True
        else:
            return None
        if b.shape[1] != b.shape[2]:
            raise ShapeMismatch(f"OFT blocks must be square, got {list(b.shape)}")
        rescale = p.get("rescale")
        if rescale is not None and rescale.shape[0] != b.shape[0] * b.shape[1]:
            raise ShapeMismatch(f"OFT rescale {list(rescale.shape)} does not match {b.shape[0]}×{b.shape[1]} rows")
        return cls(b, as_float(p.get("alpha")) or 0.0, rescale, rotation)

    @property
    def out_dim(self):
        return int(self.blocks.shape[0] * self.blocks.shape[1])

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[1])

    def rotation(self, like: Tensor) -> Tensor:
        """R per block in `like`'s compute dtype and device; the Cayley transform is computed once per patch."""
        cache = self.__dict__.setdefault("_rotations", {})  # not a field: no tensor in vars(), no effect on eq
        key = (compute_dtype(like), like.device)
        if key not in cache:
            blocks = fetch(self.blocks, like)
            cache[key] = blocks if self.is_rotation else cayley(blocks, self.constraint_alpha * self.out_dim)
        return cache[key]

    def strength_rotation(self, like: Tensor, strength: float) -> Tensor:
        """I + s·(R − I) per block, in the compute dtype of `like`."""
        r = self.rotation(like)
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        return eye + strength * (r - eye)

    def merge(self, weight, strength, bias=None):
        self.check(weight)
        cd = compute_dtype(weight)
        w = weight.to(cd)
        if strength == 0:
            return w, bias
        r = self.strength_rotation(w, strength)
        n, b = self.blocks.shape[0], self.block_size
        out = torch.einsum("knm,kn...->km...", r, w.reshape(n, b, *w.shape[1:])).reshape(w.shape)
        scale = blend_rescale(self.rescale, strength, w)
        if scale is not None:
            out = out * scale.reshape(-1, *[1] * (w.ndim - 1))
        return out, bias

    def forward_form(self, shape):
        """Each block of output rows rotated: y_k ← y_k·(I + s·(R_k − I)), rows ⊙ blended rescale."""
        blocks = self.blocks.float() if self.blocks.dtype != torch.float64 else self.blocks
        rotation = blocks if self.is_rotation else cayley(blocks, self.constraint_alpha * self.out_dim)
        rescale = None if self.rescale is None else self.rescale.float().reshape(-1)
        return BlockRotation(rotation, rescale)

    def merge_into(self, src, strength, dst, ws):
        """The same block products (one bmm per chunk of blocks, as einsum runs them), each chunk rescaled in cache."""
        self.check(src)
        cd = compute_dtype(src)
        if strength == 0:
            return cast_into(src, dst)
        r = self.strength_rotation(src, strength).transpose(1, 2)
        n, b = self.blocks.shape[0], self.block_size
        scale = blend_rescale(self.rescale, strength, src)
        scale = None if scale is None else scale.reshape(n, b, 1)
        src3, dst3 = src.view(n, b, -1), dst.view(n, b, -1)
        direct = dst.dtype == cd and dst.data_ptr() != src.data_ptr()  # bmm may write straight into dst
        per_chunk = n if direct and scale is None else max(1, chunk_rows(src) // b)  # else rescale/cast in cache
        for lo, hi in row_ranges(n, per_chunk):
            x = in_compute(src3[lo:hi], cd, ws, 0)
            out = dst3[lo:hi] if direct else ws.chunk(1, x.numel(), cd, src.device).view(x.shape)
            torch.bmm(r[lo:hi], x, out=out)
            if scale is not None:
                out.mul_(scale[lo:hi])
            store(out, dst3[lo:hi])
