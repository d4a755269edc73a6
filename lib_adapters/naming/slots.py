"""What every naming table is made of: a Slot (one patchable weight, or rows of one) per adapter module key in `_`
spelling, and the helpers that read module paths and shapes off a model's own state-dict names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..patching import RowRanges


@dataclass(frozen=True)
class Slot:
    """One patchable layer of the model: its weight (and bias), which strength applies, and where the adapter's
    rows lie in it: `rows` (a row block of a fused weight), `part` (q/k/v third when the width is only known from
    the patch), `order` (the adapter holds the block's rows in another order, e.g. swapped halves)."""

    weight: str
    bias: str | None
    component: str
    part: int | None = None
    rows: tuple[int, int] | None = None
    order: RowRanges | None = None


Table = dict[str, Slot]
WEIGHT_SUFFIXES = ((".weight", ".bias"), (".in_proj_weight", ".in_proj_bias"))
# DiT norms keep their gain in `scale` (BFL RMSNorm); a Slot for the module targets that tensor.
DIT_WEIGHT_SUFFIXES = WEIGHT_SUFFIXES + ((".scale", None),)


def underscore(path: str) -> str:
    return path.replace(".", "_")


def shapes_of(keys) -> dict[str, tuple[int, ...] | None]:
    """Names → shapes, from a mapping of tensors/shapes or from bare names (shapes unknown)."""
    if isinstance(keys, Mapping):
        return {k: tuple(v.shape) if hasattr(v, "shape") else (tuple(v) if v is not None else None)
                for k, v in keys.items()}
    return {k: None for k in keys}


def module_paths(names: Iterable[str], root: str, suffixes=WEIGHT_SUFFIXES) -> dict[str, tuple[str, str | None]]:
    """Module path (relative to `root`) → (weight name, bias name or None) for every weight under `root`.

    OpenCLIP's fused attention counts as the module `…attn` with `in_proj_weight` / `in_proj_bias`.
    """
    names = set(names)
    found = {}
    for name in names:
        if not name.startswith(root):
            continue
        rel = name[len(root):]
        for weight_suffix, bias_suffix in suffixes:
            if rel.endswith(weight_suffix):
                module = rel[: -len(weight_suffix)]
                bias = root + module + bias_suffix if bias_suffix else None
                found[module] = (name, bias if bias in names else None)
    return found


def native_table(shapes, root: str, component: str, suffixes=WEIGHT_SUFFIXES, params: bool = False) -> Table:
    """Every module under `root` by its own path in `_` spelling; with `params`, every parameter that is no
    `.weight`/`.bias` (norm `scale`s) also by its full path, as ComfyUI names them for `.diff`/`.set_weight`
    (biases are patched through their module's `diff_b`, so one plan never writes a bias twice)."""
    table = {underscore(rel): Slot(w, b, component) for rel, (w, b) in module_paths(shapes, root, suffixes).items()}
    if params:
        for name in shapes:
            if name.startswith(root) and not name.endswith((".weight", ".bias")):
                table.setdefault(underscore(name[len(root):]), Slot(name, None, component))
    return table


def find_root(names, marker: str, roots: Iterable[str]) -> str | None:
    """The first of `roots` under which `marker` exists in `names`."""
    names = names if isinstance(names, (set, dict, Mapping)) else set(names)
    return next((r for r in roots if r + marker in names), None)


def halves(rows: int) -> tuple[tuple[int, int], ...]:
    """The row order of a (scale, shift) ↔ (shift, scale) swap: second half first."""
    half = rows // 2
    return ((half, rows), (0, half))
