"""Writing a patch's result straight into a destination tensor: the reused workspace and the row-chunked passes.

Each algorithm's `merge_into(src, strength, dst, ws)` does exactly the operations of its `merge`, in the same order
(the results are bit-identical, tests/test_merge_into.py), but never allocates a whole weight: element-wise steps
run over row chunks that stay in the CPU cache, products that need the whole weight go into the workspace, which
is reused from layer to layer. `src` and `dst` may be the same tensor, and either may be fp16/bf16: chunks are
converted to the compute dtype on the way in and cast once on the way out.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 1 << 18  # elements per chunk on the CPU (1 MB in float32: a chunk stays in L2/L3, Python's per-chunk cost
#                   stays small next to the chunk's memory time)


class Workspace:
    """Compute-dtype buffers reused across weights: whole-weight slots and small chunk slots, grown on demand."""

    def __init__(self):
        self.buffers: dict[tuple, Tensor] = {}

    def _take(self, key: tuple, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self.buffers.pop(key, None)  # free the old one first: one buffer per slot at any time
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf[:numel]

    def whole(self, slot: int, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of `shape` (slot 0, 1 or 2): contents undefined, valid until the slot's next use."""
        numel = 1
        for d in shape:
            numel *= d
        return self._take(("whole", slot), numel, dtype, device).view(shape)

    def chunk(self, slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat scratch tensor of `numel` elements for one chunk's temporaries."""
        return self._take(("chunk", slot), numel, dtype, device)

    def release(self) -> None:
        self.buffers.clear()


def chunk_rows(t: Tensor) -> int:
    """Rows per chunk for a pass over `t`'s rows: about CHUNK elements on the CPU, the whole tensor elsewhere."""
    rows = t.shape[0] if t.ndim else 1
    if t.device.type != "cpu":
        return max(rows, 1)
    per_row = t[0].numel() if t.ndim and rows else 1
    return max(1, CHUNK // max(per_row, 1))


def row_ranges(rows: int, step: int):
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def in_compute(t: Tensor, cd: torch.dtype, ws: Workspace, slot: int) -> Tensor:
    """`t` itself when already in the compute dtype, else its exact conversion in a chunk slot."""
    if t.dtype == cd:
        return t
    return ws.chunk(slot, t.numel(), cd, t.device).view(t.shape).copy_(t)


def store(result: Tensor, dst: Tensor) -> None:
    """Put a compute-dtype chunk into `dst` (cast once), unless it was computed there."""
    if result.data_ptr() != dst.data_ptr() or result.dtype != dst.dtype:
        dst.copy_(result)


def out_for(dst: Tensor, cd: torch.dtype, ws: Workspace, slot: int) -> Tensor:
    """Where a chunk's compute-dtype result goes: `dst` itself when it has the compute dtype, else a chunk slot."""
    return dst if dst.dtype == cd else ws.chunk(slot, dst.numel(), cd, dst.device).view(dst.shape)


def add_into(src: Tensor, delta: Tensor, dst: Tensor, ws: Workspace) -> None:
    """dst = src + delta (compute dtype, cast once), by row chunks; `delta` is a compute-dtype tensor like `src`."""
    cd = delta.dtype
    step = chunk_rows(dst)
    for lo, hi in row_ranges(dst.shape[0], step):
        s = in_compute(src[lo:hi], cd, ws, 0)
        out = out_for(dst[lo:hi], cd, ws, 1)
        torch.add(s, delta[lo:hi], out=out)
        store(out, dst[lo:hi])


def cast_into(src: Tensor, dst: Tensor) -> None:
    """dst = src (a copy, casting once), skipped when they are the same tensor."""
    if src.data_ptr() != dst.data_ptr() or src.dtype != dst.dtype:
        dst.copy_(src)
