"""Every algorithm, in detection order; `detect` turns one layer's tensors into its patch."""

from __future__ import annotations

from ..errors import ShapeMismatch
from .base import DeltaPatch, LayerPatch, Params
from .boft import BOFTPatch
from .dora import DoRAPatch
from .full import FullPatch
from .glora import GLoRAPatch
from .ia3 import IA3Patch
from .loha import LoHaPatch
from .lokr import LoKrPatch
from .lora import LoRAPatch
from .norm import NormPatch
from .oft import OFTPatch
from .replace import ReplacePatch

ALGORITHMS: tuple[type[LayerPatch], ...] = (
    LoRAPatch, LoHaPatch, LoKrPatch, OFTPatch, BOFTPatch, IA3Patch, GLoRAPatch, FullPatch, NormPatch, ReplacePatch,
)
DORA_PARAMS = ("dora_scale", "lora_magnitude_vector")
ALGORITHM_NAMES = ("lora", "locon", "loha", "lokr", "oft", "boft", "ia3", "glora", "full", "norm", "set")


def detect(params: Params) -> tuple[LayerPatch | None, list[str]]:
    """(patch, names of params it did not use); (None, all names) when no signature matches."""
    for algo in ALGORITHMS:
        patch = algo.from_params(params)
        if patch is None:
            continue
        used = set(algo.consumes)
        if isinstance(patch, DeltaPatch) and any(k in params for k in DORA_PARAMS):
            patch = DoRAPatch.wrap(patch, params)
            used.update(DORA_PARAMS)
        return patch, sorted(k for k in params if k not in used)
    return None, sorted(params)


def kind_name(patch: LayerPatch) -> str:
    """The algorithm name inspect reports: lora/locon split by kernel, DoRA by its inner type."""
    return getattr(patch, "kind_detail", patch.kind)


__all__ = ["ALGORITHMS", "ALGORITHM_NAMES", "DeltaPatch", "LayerPatch", "ShapeMismatch", "detect", "kind_name"]
