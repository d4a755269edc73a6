"""Block weights (`lbw=`) as sd-webui-lora-block-weight defines them: the block each model layer belongs to, the
block lists of each family, presets and the preset-file reader.

Blocks are the UNet's top-level children in ldm/sgm naming: `IN00`… (`input_blocks.N`), `M00` (`middle_block`),
`OUT00`… (`output_blocks.N`), and `BASE`, the text encoders' transformer layers. A list gives one weight per
block of one of the reference's lists, by position; blocks the list does not name weigh 0. Layers in no block
(time and label embeddings, the UNet's final norm and conv, a text encoder's embeddings and final norm) keep
weight 1, as in the reference. A layer's strength is the tag's strength times its block's weight.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import AdapterError
from .unet import diffusers_to_ldm


def _blocks(inputs: Iterable[int], outputs: Iterable[int]) -> tuple[str, ...]:
    return ("BASE", *(f"IN{i:02d}" for i in inputs), "M00", *(f"OUT{i:02d}" for i in outputs))


# The reference's lists. SD1/SD2 UNet: input blocks 0-11 (0 conv_in; 3, 6, 9 downsamplers; 10-11 no attention),
# output blocks 0-11 (0-2 no attention). SDXL: input 0-8 (0 conv_in; 3, 6 downsamplers; 1-2 no attention), output
# 0-8 (6-8 no attention). The short lists hold the blocks with attention, the ones a plain LoRA trains.
LISTS: dict[int, tuple[str, ...]] = {
    17: _blocks((1, 2, 4, 5, 7, 8), range(3, 12)),
    26: _blocks(range(12), range(12)),
    12: _blocks((4, 5, 7, 8), range(6)),
    20: _blocks(range(9), range(9)),
}
FAMILY_LENGTHS = {"sd1": (17, 26), "sd2": (17, 26), "sdxl": (12, 20)}
FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}

_UNET_ROOTS = ("model.diffusion_model.", "diffusion_model.")
_TE_ROOTS = ("cond_stage_model.", "conditioner.embedders.", "text_encoder.", "text_encoder_2.", "clip_l.", "clip_g.",
             "clip_h.")
_TE_LAYERS = re.compile(r"(^|\.)(encoder\.layers|transformer\.resblocks)\.\d+\.")
_LDM_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.")


@functools.lru_cache(maxsize=65536)
def block_of(weight: str) -> str | None:
    """The block of a model weight (checkpoint, Forge or diffusers naming); None for a layer in no block."""
    if weight.startswith("unet."):
        ldm = diffusers_to_ldm(weight[len("unet."):])
        return _ldm_block(ldm) if ldm else None
    for root in _UNET_ROOTS:
        if weight.startswith(root):
            return _ldm_block(weight[len(root):])
    if weight.startswith(_TE_ROOTS):
        return "BASE" if _TE_LAYERS.search(weight.split(".", 1)[1]) else None
    return None


def _ldm_block(path: str) -> str | None:
    m = _LDM_BLOCK.match(path)
    if m is None:
        return None
    kind, index = m.group(1), int(m.group(2))
    return {"input_blocks": f"IN{index:02d}", "middle_block": "M00", "output_blocks": f"OUT{index:02d}"}[kind]


@dataclass(frozen=True)
class BlockWeights:
    """One weight per block; `of(weight)` is a model weight's multiplier (0 for a block the list leaves out)."""

    weights: Mapping[str, float]
    text: str = ""

    def of(self, weight: str) -> float:
        block = block_of(weight)
        return 1.0 if block is None else self.weights.get(block, 0.0)

    def __hash__(self):
        return hash(tuple(sorted(self.weights.items())))


# ---- presets ------------------------------------------------------------------------------------------------------

# The reference's shipped presets (17 weights: SD1/SD2), and the family-free ones for SDXL's 12 blocks.
COMMON_PRESETS = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5
NONE:0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5
"""
PRESET_FILE = "lbwpresets.txt"
REFERENCE_EXTENSION = "sd-webui-lora-block-weight"


@dataclass
class Presets:
    """Preset name → its weight lists by length (a name may have one list per length, e.g. SD1 and SDXL)."""

    lists: dict[str, dict[int, tuple[str, ...]]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def read_text(self, text: str, source: str = "") -> None:
        """Lines `NAME:w,w,…` as the reference reads them: a line with `#`, without `:` or whose count is no
        known list length is skipped; a later line of the same name and length replaces the earlier one."""
        for line in text.splitlines():
            if "#" in line or ":" not in line:
                continue
            name, values = line.split(":", 1)
            items = tuple(v.strip() for v in values.split(","))
            if len(items) in LISTS and name.strip():
                self.lists.setdefault(name.strip(), {})[len(items)] = items
        if source:
            self.sources.append(source)

    def read_file(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                self.read_text(f.read(), path)
        except OSError:
            pass

    def find(self, name: str, lengths: tuple[int, ...]) -> tuple[str, ...] | None:
        """The preset's list of one of `lengths` (the first that exists), None if it has none."""
        by_length = self.lists.get(name, {})
        return next((by_length[n] for n in lengths if n in by_length), None)


def load_presets(folders: Iterable[str] = ()) -> Presets:
    """The common presets, then `lbwpresets.txt` from each folder that has one (later files win)."""
    presets = Presets()
    presets.read_text(COMMON_PRESETS)
    for folder in folders:
        path = os.path.join(folder, PRESET_FILE)
        if os.path.isfile(path):
            presets.read_file(path)
    return presets


# ---- parsing `lbw=` -------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INHERIT = re.compile(r"X(?:([+-])(\d+\.?\d*|\.\d+))?")


def _weight(item: str, x: float, tag: str) -> float:
    """One list item: a number, or `X`, `X+d`, `X-d` (the tag's `x=` value, 1 when it has none)."""
    if _NUMBER.fullmatch(item):
        value = float(item)
    elif m := _INHERIT.fullmatch(item):
        offset = float(m.group(2)) if m.group(2) else 0.0
        value = x + offset if m.group(1) != "-" else x - offset
    elif item in ("R", "U"):
        raise AdapterError(None, f"{tag}: block weight {item} (a random value) is not supported: the image could not "
                                 f"be made again from its prompt; write the number")
    else:
        raise AdapterError(None, f"{tag}: block weight {item!r} is not a number (or X, X+d, X-d)")
    if not math.isfinite(value):
        raise AdapterError(None, f"{tag}: block weight {item!r} is not a finite number")
    return value


def expected(family: str) -> str:
    """What an `lbw=` value may be for a model of `family`, in words."""
    lengths = FAMILY_LENGTHS.get(family, tuple(LISTS))
    counts = " or ".join(str(n) for n in lengths)
    return f"a preset name or {counts} comma-separated weights ({', '.join(LISTS[lengths[0]])})"


def parse_block_weights(value: str, family: str, presets: Presets, x: float = 1.0, tag: str = "") -> BlockWeights:
    """`lbw=` value → BlockWeights for a model of `family`; AdapterError naming the tag and what was expected."""
    tag = tag or f"lbw={value}"
    value = value.strip()
    lengths = FAMILY_LENGTHS.get(family, tuple(LISTS))
    where = FAMILY_NAMES.get(family, family)
    if "," in value:
        items = tuple(v.strip() for v in value.split(","))
        if len(items) not in lengths:
            raise AdapterError(None, f"{tag}: {len(items)} block weights, a {where} model takes {expected(family)}")
    else:
        if not value:
            raise AdapterError(None, f"{tag}: lbw= is empty; expected {expected(family)}")
        items = presets.find(value, lengths)
        if items is None:
            known = presets.lists.get(value)
            if known:
                have = " and ".join(str(n) for n in sorted(known))
                raise AdapterError(None, f"{tag}: preset {value!r} has {have} weights, a {where} model takes "
                                         f"{' or '.join(map(str, lengths))}; add such a line to {PRESET_FILE}")
            names = sorted(n for n, by_length in presets.lists.items() if any(k in by_length for k in lengths))
            raise AdapterError(None, f"{tag}: unknown block-weight preset {value!r}; expected {expected(family)} "
                                     f"(presets: {', '.join(names)})")
    weights = dict(zip(LISTS[len(items)], (_weight(item, x, tag) for item in items)))
    return BlockWeights(weights, value)
