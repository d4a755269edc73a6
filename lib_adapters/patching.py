"""Applying patches to any weight store and restoring it bit-exactly.

A plan maps each touched weight to the ordered operations on it. `Patcher.reconcile(plan)` brings the store to
exactly that plan: weights whose operations changed are recomputed from their saved originals, weights no longer
in the plan are restored, untouched ones are not read. Math in float32 (float64 stays float64), cast back once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .algorithms import DeltaPatch, LayerPatch
from .algorithms.base import compute_dtype, fetch
from .algorithms.into import Workspace
from .algorithms.lora import LoRAPatch
from .errors import AdapterError, ShapeMismatch


RowRanges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Target:
    """Where one adapter layer lands: a weight (and its bias), optionally a row block of a fused weight, whose rows
    the adapter may hold in another order (`order`: row ranges of the block, concatenated, in the adapter's order;
    e.g. the scale/shift halves of Flux's final adaLN swapped). Every algorithm sees the rows in its own order."""

    weight: str
    bias: str | None = None
    rows: tuple[int, int] | None = None
    component: str = "unet"  # "unet" or "te": which strength applies
    cols: tuple[int, int] | None = None  # input-channel block: a 4-channel conv_in adapter on an inpainting UNet
    order: RowRanges | None = None  # relative to `rows` (or the whole weight)


@dataclass(frozen=True)
class Operation:
    """One patch at one strength on one target; `source` identifies adapter + layer for change tracking."""

    patch: LayerPatch
    strength: float
    target: Target
    source: str

    @property
    def signature(self) -> tuple:
        return (self.source, self.strength, self.target.rows, self.target.cols, self.target.order)


Plan = dict[str, list[Operation]]


def nonzero(plan: Plan) -> Plan:
    """The plan without its zero-strength operations (a weight left with none is dropped: not touched)."""
    kept = {w: [op for op in ops if op.strength] for w, ops in plan.items()}
    return {w: ops for w, ops in kept.items() if ops}


class WeightStore(Protocol):
    """Anything holding named weights: a state dict, an nn.Module, a host's model."""

    def get(self, name: str) -> Tensor: ...

    def set(self, name: str, value: Tensor) -> None: ...

    def has(self, name: str) -> bool: ...


class StateDictStore:
    """A plain dict of tensors; `set` replaces the entry."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors

    def get(self, name):
        return self.tensors[name]

    def set(self, name, value):
        self.tensors[name] = value

    def has(self, name):
        return name in self.tensors


class ModuleStore:
    """An nn.Module's parameters and buffers by dotted name; `set` copies in place (no new storage)."""

    in_place = True  # Patcher may compute straight into the live tensors

    def __init__(self, module: torch.nn.Module, prefix: str = ""):
        self.prefix = prefix
        self.tensors = {prefix + k: v for k, v in module.state_dict(keep_vars=True).items()}

    def get(self, name):
        return self.tensors[name].data

    def set(self, name, value):
        with torch.no_grad():
            self.tensors[name].data.copy_(value)

    def has(self, name):
        return name in self.tensors


class FusedStore:
    """A store seen with virtual fused weights: `fused[name]` lists (member, first row, end row); reading the name
    concatenates its members' rows, writing it splits them back (bit-exact, each member keeps its dtype)."""

    def __init__(self, store: WeightStore, fused: dict[str, tuple[tuple[str, int, int], ...]]):
        self.store = store
        self.fused = fused
        self.in_place = getattr(store, "in_place", False)

    def get(self, name):
        if name not in self.fused:
            return self.store.get(name)
        return torch.cat([self.store.get(member) for member, _, _ in self.fused[name]])

    def set(self, name, value):
        if name not in self.fused:
            return self.store.set(name, value)
        for member, lo, hi in self.fused[name]:
            current = self.store.get(member)
            self.store.set(member, value[lo:hi].to(device=current.device, dtype=current.dtype))

    def has(self, name):
        return all(self.store.has(m) for m, _, _ in self.fused[name]) if name in self.fused else self.store.has(name)


def rows_view(t: Tensor, target: Target) -> Tensor:
    """The target's rows of `t` (weight or bias) in the adapter's row order: a view unless reordered."""
    lo, hi = target.rows if target.rows is not None else (0, t.shape[0])
    block = t[lo:hi]
    if target.order is None:
        return block
    return torch.cat([block[a:b] for a, b in target.order])


def write_rows(t: Tensor, target: Target, value: Tensor) -> None:
    """Put `value` (rows in the adapter's order) back into the target's rows of `t`, in place."""
    lo, hi = target.rows if target.rows is not None else (0, t.shape[0])
    if target.order is None:
        if value.data_ptr() != t[lo:hi].data_ptr():
            t[lo:hi] = value
        return
    at = 0
    for a, b in target.order:
        t[lo + a:lo + b] = value[at:at + b - a]
        at += b - a


def _low_rank(patch: LayerPatch, w: Tensor) -> tuple[Tensor, Tensor, float] | None:
    """(up, down, γ) as 2-D compute-dtype matrices for a plain LoRA whose product fits `w`; None otherwise."""
    if type(patch) is not LoRAPatch or patch.mid is not None or patch.extra is not None \
            or patch.up_bias is not None or patch.diff_b is not None:
        return None
    up = patch.up.reshape(patch.up.shape[0], -1)
    down = patch.down.reshape(patch.down.shape[0], -1)
    if w.ndim < 1 or up.shape[0] != w.shape[0] or up.shape[0] * down.shape[1] != w.numel() or not w.is_contiguous():
        return None
    return fetch(up, w), fetch(down, w), patch.scale


def _bias_after(op: Operation, bias: Tensor | None, cd: torch.dtype) -> Tensor | None:
    """The bias after `op` (what its `merge` returns): additive patches add s·Δb, the others keep it."""
    if isinstance(op.patch, DeltaPatch):
        return op.patch.bias_after(bias, op.strength, cd)
    return bias


def _merge_one(op: Operation, w: Tensor, b: Tensor | None, ws: Workspace) -> Tensor | None:
    """One operation on (w, b) in place, on its row block in the adapter's row order; returns the new bias. Plain
    LoRA is one in-place addmm, patches with a `merge_into` write straight into w (the same bits as their `merge`,
    see algorithms/into.py)."""
    if op.target.cols is not None:  # leading input channels only: the same as zero-padding ΔW on that axis
        lo, hi = op.target.cols
        new_w, b = op.patch.merge(w[:, lo:hi], op.strength, b)
        w[:, lo:hi] = new_w
        return b
    whole = op.target.rows is None and op.target.order is None
    part = w if whole else rows_view(w, op.target)
    factors = _low_rank(op.patch, part) if op.target.order is None else None
    if factors is not None:
        up, down, scale = factors
        part.view(part.shape[0], -1).addmm_(up, down, alpha=op.strength * scale)
        return b
    sub_b = rows_view(b, op.target) if b is not None and not whole else b
    if hasattr(op.patch, "merge_into") and part.is_contiguous():
        op.patch.merge_into(part, op.strength, part, ws)
        new_w, new_b = part, _bias_after(op, sub_b, w.dtype)
    else:
        new_w, new_b = op.patch.merge(part, op.strength, sub_b)
    if whole:
        if new_w is not w:
            w.copy_(new_w)
        return new_b
    write_rows(w, op.target, new_w)
    if new_b is not None and b is not None:
        write_rows(b, op.target, new_b)
    return b


def _first_into(op: Operation, weight: Tensor, w: Tensor, ws: Workspace) -> bool:
    """Run a whole-weight first operation from `weight` straight into `w` (compute dtype, or the live weight's own
    dtype when `w` is it); False when it has no such path (then `w` is left untouched)."""
    if op.target.rows is not None or op.target.cols is not None or op.target.order is not None \
            or not weight.is_contiguous():
        return False
    cd = compute_dtype(weight)
    factors = _low_rank(op.patch, weight) if weight.dtype == cd and w.dtype == cd else None
    if factors is not None:  # W' = W + s·γ·up@down in one pass over W
        up, down, scale = factors
        torch.addmm(weight.view(weight.shape[0], -1), up, down, alpha=op.strength * scale, out=w.view(w.shape[0], -1))
        return True
    if _low_rank(op.patch, w) is not None or not hasattr(op.patch, "merge_into"):
        return False  # fp16/bf16 LoRA: one addmm_ on the compute-dtype copy, as before
    op.patch.merge_into(weight, op.strength, w, ws)
    return True


def compute(ops: list[Operation], weight: Tensor, bias: Tensor | None, out: Tensor | None = None,
            workspace: Workspace | None = None) -> tuple[Tensor, Tensor | None]:
    """Apply `ops` in order to (weight, bias), each on its row block; returns compute-dtype tensors, or `out`.

    `out` (optional): a tensor of the weight's shape (a live weight, any floating dtype) to build the result in: the
    math runs in the compute dtype and is cast into it once; it is returned as the result when used, and holds
    `weight` again if an operation fails. `workspace`: buffers reused from call to call (none: fresh ones).
    """
    cd = compute_dtype(weight)
    ws = workspace if workspace is not None else Workspace()
    active = [op for op in ops if op.strength != 0]
    usable = (out is not None and out.is_floating_point() and out.shape == weight.shape and out.device == weight.device
              and out.is_contiguous() and out.data_ptr() != weight.data_ptr())
    b = bias.to(cd, copy=True) if bias is not None else None
    op = active[0] if active else None
    try:
        if usable and out.dtype != cd and len(active) == 1 and _first_into(op, weight, out, ws):
            return out, _bias_after(op, b, cd)  # one operation on a fp16/bf16 weight: computed and cast by chunks
        if usable and out.dtype == cd:
            w = out
        elif usable:
            w = ws.whole(0, weight.shape, cd, weight.device)  # cast into `out` once at the end
        else:
            w = torch.empty(weight.shape, dtype=cd, device=weight.device)
        if op is not None and _first_into(op, weight, w, ws):
            b = _bias_after(op, b, cd)
            active = active[1:]
        else:
            w.copy_(weight)
        for op in active:
            b = _merge_one(op, w, b, ws)
        if usable and w is not out:
            out.copy_(w)
            w = out
    except (ShapeMismatch, RuntimeError, IndexError) as e:  # a layer whose tensors do not fit, caught late
        if usable:
            out.copy_(weight)
        if op is None or out_of_memory(e):
            raise
        path, _, rest = op.source.partition("|")
        raise AdapterError(path, f"layer {rest.rpartition('|')[2] or op.target.weight!r} does not fit "
                                 f"{op.target.weight}: {e}") from None
    return w, b


def out_of_memory(e: BaseException) -> bool:
    """An allocation failure (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError): not the adapter's fault."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "not enough memory" in str(e) \
        or "out of memory" in str(e).lower()


def compute_bias(ops: list[Operation], bias: Tensor) -> Tensor:
    """The bias after `ops` alone (compute dtype), the same arithmetic as `compute` (for hosts that merge a bias on
    its own): additive patches add s·Δb on their rows, in the adapter's row order; other patches keep it."""
    b = bias.to(compute_dtype(bias), copy=True)
    for op in ops:
        if op.strength == 0 or not isinstance(op.patch, DeltaPatch):
            continue
        part = rows_view(b, op.target)
        db = op.patch.delta_bias(part)
        if db is not None:
            write_rows(b, op.target, part + op.strength * db.to(device=b.device, dtype=b.dtype).reshape(part.shape))
    return b


class Patcher:
    """Keeps the originals of every weight it touched; `reconcile` and `restore` return the store to them exactly."""

    def __init__(self, store: WeightStore, backup_device: str | torch.device | None = "cpu"):
        self.store = store
        self.backup_device = backup_device
        self.originals: dict[str, Tensor] = {}
        self.applied: dict[str, tuple] = {}
        self.bias_of: dict[str, str] = {}
        self.dirty: set[str] = set()  # weights being written: neither original nor as `applied` says
        self.workspace = Workspace()  # compute buffers reused from weight to weight; released when nothing is applied

    def _original(self, name: str) -> Tensor:
        if name not in self.originals:
            t = self.store.get(name)
            self.originals[name] = t.detach().to(self.backup_device, copy=True) if self.backup_device else t.detach().clone()
        return self.originals[name]

    def _write(self, name: str, value: Tensor) -> None:
        current = self.store.get(name)
        if value.data_ptr() == current.data_ptr() and value.dtype == current.dtype:
            return  # computed in place, into an in-place store's live tensor
        if getattr(self.store, "in_place", False) and value.device == current.device:
            self.store.set(name, value)  # copy_ casts on the way: no extra cast pass
        else:
            self.store.set(name, value.to(device=current.device, dtype=current.dtype))

    def reconcile(self, plan: Plan) -> dict[str, int]:
        """Make the store equal originals + `plan`; returns counts of recomputed, restored and kept weights.

        Any exception on the way (a layer that does not fit, out of memory, KeyboardInterrupt) puts every touched
        weight back at its original, nothing counted as applied, and propagates; a call interrupted even inside
        that clean-up is finished by the next call (weights being written are marked dirty until done).
        """
        stats = {"recomputed": 0, "restored": 0, "kept": 0}
        try:
            self._settle()
            for name in list(self.applied):
                if name not in plan:
                    self._restore_one(name)
                    stats["restored"] += 1
            for name, ops in plan.items():
                bias_name = next((op.target.bias for op in ops if op.target.bias), None)
                signature = tuple(op.signature for op in ops)
                if self.applied.get(name) == signature:
                    stats["kept"] += 1
                    continue
                self._recompute(name, ops, bias_name)
                self.applied[name] = signature
                self.dirty.discard(name)
                stats["recomputed"] += 1
        except BaseException:
            self._rollback()
            raise
        if not self.applied:
            self.workspace.release()
        return stats

    def _recompute(self, name: str, ops: list[Operation], bias_name: str | None) -> None:
        """Write originals + `ops` into one weight (and its bias); it stays dirty until the caller records it."""
        current = self.store.get(name)
        weight = self._original(name).to(current.device)  # compute where the model lives (GPU), not on the backup
        bias = self._original(bias_name).to(current.device) if bias_name and self.store.has(bias_name) else None
        self.dirty.add(name)
        self.applied.pop(name, None)
        if bias is not None:
            self.bias_of[name] = bias_name
        if getattr(self.store, "in_place", False):
            live = current
        else:  # the store takes a new tensor: build it in the store's dtype (cast once, no float32 copy)
            live = torch.empty(current.shape, dtype=current.dtype, device=current.device)
        new_w, new_b = compute(ops, weight, bias, out=live, workspace=self.workspace)
        self._write(name, new_w)
        if bias is not None:
            self._write(bias_name, new_b)

    def _put_back(self, name: str) -> None:
        """One weight (and its bias) at its original, backups kept."""
        if name in self.originals:
            self.store.set(name, self.originals[name])
        bias_name = self.bias_of.get(name)
        if bias_name in self.originals:
            self.store.set(bias_name, self.originals[bias_name])

    def _settle(self) -> None:
        """Weights an interrupted call left half-written go back to their originals."""
        for name in list(self.dirty):
            self._put_back(name)
            self.applied.pop(name, None)
            self.bias_of.pop(name, None)
            self.dirty.discard(name)

    def _rollback(self) -> None:
        """Every touched weight back at its original, nothing applied: the state after any failed reconcile."""
        self.dirty.update(self.applied)
        self.applied.clear()
        self._settle()
        for name, t in list(self.originals.items()):  # biases and weights reset earlier in this call
            self.store.set(name, t)
        self.originals.clear()

    def _restore_one(self, name: str) -> None:
        self.dirty.add(name)
        del self.applied[name]
        self._put_back(name)
        bias_name = self.bias_of.pop(name, None)
        self.originals.pop(bias_name, None)
        self.originals.pop(name, None)
        self.dirty.discard(name)

    def restore(self) -> None:
        """Put every touched weight back, bit-exactly."""
        self.reconcile({})
        for name, t in list(self.originals.items()):
            self.store.set(name, t)
        self.originals.clear()
