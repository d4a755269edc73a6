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


# Parameters that belong to a multi-tensor signature: present without the rest, the layer is incomplete.
PARTS: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, ...], ...]], ...] = (
    # (algorithm, parameters that mark it, the alternatives of what it needs)
    ("LoRA", ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "bias_indices", "bias_values"),
     (("lora_up.weight", "lora_down.weight"),)),
    ("LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
     (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),)),
    ("LoKr", ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
     (("lokr_w1", "lokr_w2"), ("lokr_w1", "lokr_w2_a", "lokr_w2_b"), ("lokr_w1_a", "lokr_w1_b", "lokr_w2"),
      ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"))),
    ("GLoRA", ("a1.weight", "a2.weight", "b1.weight", "b2.weight"), (("a1.weight", "a2.weight", "b1.weight", "b2.weight"),)),
    ("DoRA", DORA_PARAMS, (("the LoRA/LoHa/LoKr/GLoRA layer it scales",),)),
)


def incomplete(params: Params) -> str | None:
    """Why a layer that no algorithm took is a broken adapter layer rather than a foreign key: it holds part of a
    signature (a LoRA `lora_down` without `lora_up`, a LoKr `w1` without `w2`, …); None when it holds none."""
    for algo, marks, needs in PARTS:
        if any(k in params for k in marks):
            shortest = min(needs, key=lambda n: (sum(k not in params for k in n), -sum(k in params for k in n)))
            missing = [k for k in shortest if k not in params]
            present = sorted(k for k in params if k in marks)
            return f"incomplete {algo} layer: has {', '.join(present)} but lacks {', '.join(missing)}"
    return None


def kind_name(patch: LayerPatch) -> str:
    """The algorithm name inspect reports: lora/locon split by kernel, DoRA by its inner type."""
    return getattr(patch, "kind_detail", patch.kind)


__all__ = ["ALGORITHMS", "ALGORITHM_NAMES", "DeltaPatch", "LayerPatch", "ShapeMismatch", "detect", "incomplete", "kind_name"]
