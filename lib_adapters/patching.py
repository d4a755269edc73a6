"""Applying patches to any weight store and restoring it bit-exactly.

A plan maps each touched weight to the ordered operations on it. `Patcher.reconcile(plan)` brings the store to
exactly that plan: weights whose operations changed are recomputed from their saved originals, weights no longer
in the plan are restored, untouched ones are not read. Math in float32 (float64 stays float64), cast back once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch
from torch import Tensor

from .algorithms import LayerPatch
from .algorithms.base import compute_dtype
from .errors import AdapterError, ShapeMismatch


@dataclass(frozen=True)
class Target:
    """Where one adapter layer lands: a weight (and its bias), optionally a row block of a fused weight."""

    weight: str
    bias: str | None = None
    rows: tuple[int, int] | None = None
    component: str = "unet"  # "unet" or "te": which strength applies


@dataclass(frozen=True)
class Operation:
    """One patch at one strength on one target; `source` identifies adapter + layer for change tracking."""

    patch: LayerPatch
    strength: float
    target: Target
    source: str

    @property
    def signature(self) -> tuple:
        return (self.source, self.strength, self.target.rows)


Plan = dict[str, list[Operation]]


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

    def names(self) -> Iterable[str]:
        return self.tensors.keys()


class ModuleStore:
    """An nn.Module's parameters and buffers by dotted name; `set` copies in place (no new storage)."""

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

    def names(self) -> Iterable[str]:
        return self.tensors.keys()


def compute(ops: list[Operation], weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Apply `ops` in order to (weight, bias), each on its row block; returns compute-dtype tensors."""
    cd = compute_dtype(weight)
    w = weight.to(cd, copy=True)
    b = bias.to(cd, copy=True) if bias is not None else None
    for op in ops:
        if op.strength == 0:
            continue
        try:
            if op.target.rows is None:
                w, b = op.patch.merge(w, op.strength, b)
            else:
                lo, hi = op.target.rows
                sub_b = b[lo:hi] if b is not None else None
                new_w, new_b = op.patch.merge(w[lo:hi], op.strength, sub_b)
                w[lo:hi] = new_w
                if new_b is not None and b is not None:
                    b[lo:hi] = new_b
        except ShapeMismatch as e:
            path, _, rest = op.source.partition("|")
            raise AdapterError(path, f"layer {rest.rpartition('|')[2] or op.target.weight!r} does not fit "
                                     f"{op.target.weight}: {e}") from None
    return w, b


class Patcher:
    """Keeps the originals of every weight it touched; `reconcile` and `restore` return the store to them exactly."""

    def __init__(self, store: WeightStore, backup_device: str | torch.device | None = "cpu"):
        self.store = store
        self.backup_device = backup_device
        self.originals: dict[str, Tensor] = {}
        self.applied: dict[str, tuple] = {}
        self.bias_of: dict[str, str] = {}

    def _original(self, name: str) -> Tensor:
        if name not in self.originals:
            t = self.store.get(name)
            self.originals[name] = t.detach().to(self.backup_device, copy=True) if self.backup_device else t.detach().clone()
        return self.originals[name]

    def _write(self, name: str, value: Tensor) -> None:
        current = self.store.get(name)
        self.store.set(name, value.to(device=current.device, dtype=current.dtype))

    def reconcile(self, plan: Plan) -> dict[str, int]:
        """Make the store equal originals + `plan`; returns counts of recomputed, restored and kept weights.

        An AdapterError (a layer that does not fit its weight) leaves the failing weight untouched; reconcile again
        without that adapter to reach a consistent state.
        """
        stats = {"recomputed": 0, "restored": 0, "kept": 0}
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
            weight = self._original(name)
            bias = self._original(bias_name) if bias_name and self.store.has(bias_name) else None
            new_w, new_b = compute(ops, weight, bias)
            self._write(name, new_w)
            if bias_name and bias is not None:
                self._write(bias_name, new_b)
                self.bias_of[name] = bias_name
            self.applied[name] = signature
            stats["recomputed"] += 1
        return stats

    def _restore_one(self, name: str) -> None:
        self.store.set(name, self.originals.pop(name))
        bias_name = self.bias_of.pop(name, None)
        if bias_name in self.originals:
            self.store.set(bias_name, self.originals.pop(bias_name))
        del self.applied[name]

    def restore(self) -> None:
        """Put every touched weight back, bit-exactly."""
        self.reconcile({})
        for name, t in list(self.originals.items()):
            self.store.set(name, t)
        self.originals.clear()
