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
def _dit(letter: str, count: int) -> tuple[str, ...]:
    return tuple(f"{letter}{i:02d}" for i in range(count))


# Flux (the reference's 61): CLIP-L, T5, the input embedders (img_in, txt_in, time_in, vector_in, guidance_in),
# double blocks D00-D18, single blocks S00-S37, OUT (final_layer). SD3 (ours, in the same spirit): CLIP (CLIP-L and
# CLIP-G), T5, IN (x/context/t/y embedders, pos_embed), joint blocks J00… (24: SD3 Medium, SD3.5 Medium; 38: SD3.5
# Large), OUT (final_layer).
LISTS: dict[int, tuple[str, ...]] = {
    17: _blocks((1, 2, 4, 5, 7, 8), range(3, 12)),
    26: _blocks(range(12), range(12)),
    12: _blocks((4, 5, 7, 8), range(6)),
    20: _blocks(range(9), range(9)),
    61: ("CLIP", "T5", "IN", *_dit("D", 19), *_dit("S", 38), "OUT"),
    28: ("CLIP", "T5", "IN", *_dit("J", 24), "OUT"),
    42: ("CLIP", "T5", "IN", *_dit("J", 38), "OUT"),
}
FAMILY_LENGTHS = {"sd1": (17, 26), "sd2": (17, 26), "sdxl": (12, 20), "flux": (61,), "sd3": (28, 42)}
FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux": "Flux", "sd3": "SD3"}
SD_LENGTHS = (12, 17, 20, 26)

_UNET_ROOTS = ("model.diffusion_model.", "diffusion_model.")
_TE_ROOTS = ("cond_stage_model.", "conditioner.embedders.", "text_encoder.", "text_encoder_2.", "clip_l.", "clip_g.",
             "clip_h.")
_TE_LAYERS = re.compile(r"(^|\.)(encoder\.layers|transformer\.resblocks)\.\d+\.")
_LDM_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.")


_DIT_ROOTS = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_DIT_BLOCKS = {"flux": {"double_blocks": "D", "transformer_blocks": "D", "single_blocks": "S",
                        "single_transformer_blocks": "S"},
               "sd3": {"joint_blocks": "J", "transformer_blocks": "J"}}
_DIT_IN = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "x_embedder", "context_embedder",
           "time_text_embed", "t_embedder", "y_embedder", "pos_embed")
_DIT_OUT = ("final_layer", "norm_out", "proj_out")
_DIT_BLOCK = re.compile(r"([a-z_]+)\.(\d+)\.")
_T5 = ("text_encoders.t5xxl.", "t5xxl.", "t5.")
_CLIP = ("text_encoders.clip_l.", "text_encoders.clip_g.", "clip_l.", "clip_g.")


@functools.lru_cache(maxsize=65536)
def block_of(weight: str, family: str | None = None) -> str | None:
    """The block of a model weight (checkpoint, Forge or diffusers naming; a virtual fused weight by its first
    member); None for a layer in no block. Flux and SD3 names need their `family`."""
    weight = weight.split("+", 1)[0]
    if family in _DIT_BLOCKS:
        return _dit_block(weight, family)
    if weight.startswith("unet."):
        ldm = diffusers_to_ldm(weight[len("unet."):])
        return _ldm_block(ldm) if ldm else None
    for root in _UNET_ROOTS:
        if weight.startswith(root):
            return _ldm_block(weight[len(root):])
    if weight.startswith(_TE_ROOTS):
        return "BASE" if _TE_LAYERS.search(weight.split(".", 1)[1]) else None
    return None


def _dit_block(weight: str, family: str) -> str | None:
    t5 = "text_encoder_3." if family == "sd3" else "text_encoder_2."
    if weight.startswith(_T5 + (t5,)):
        return "T5"
    if weight.startswith(_CLIP + ("text_encoder.", "text_encoder_2.")):
        return "CLIP"
    path = next((weight[len(r):] for r in _DIT_ROOTS if weight.startswith(r)), weight)
    m = _DIT_BLOCK.match(path)
    if m and m.group(1) in _DIT_BLOCKS[family]:
        return f"{_DIT_BLOCKS[family][m.group(1)]}{int(m.group(2)):02d}"
    head = path.split(".", 1)[0]
    return "IN" if head in _DIT_IN else "OUT" if head in _DIT_OUT else None


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
    family: str | None = None

    def of(self, weight: str) -> float:
        block = block_of(weight, self.family if self.family in _DIT_BLOCKS else None)
        return 1.0 if block is None else self.weights.get(block, 0.0)

    def __hash__(self):
        return hash((tuple(sorted(self.weights.items())), self.family))


# ---- presets ------------------------------------------------------------------------------------------------------

# The reference's shipped presets (17 weights: SD1/SD2; FLUXALL: Flux), and the family-free ones for SDXL's 12.
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
FLUXALL:""" + ",".join(["1"] * 61) + "\n"
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


def describe(blocks: tuple[str, ...]) -> str:
    """Block names for a message, runs of three or more written as `D00…D18`."""
    out, run = [], []
    for b in blocks + ("",):
        m = re.fullmatch(r"([A-Z]+)(\d+)", b)
        prev = re.fullmatch(r"([A-Z]+)(\d+)", run[-1]) if run else None
        if m and prev and m.group(1) == prev.group(1) and int(m.group(2)) == int(prev.group(2)) + 1:
            run.append(b)
            continue
        out += [f"{run[0]}…{run[-1]}"] if len(run) > 2 else run
        run = [b] if b else []
    return ", ".join(out)


def expected(family: str) -> str:
    """What an `lbw=` value may be for a model of `family`, in words."""
    lengths = FAMILY_LENGTHS.get(family, SD_LENGTHS)
    counts = " or ".join(str(n) for n in lengths)
    return f"a preset name or {counts} comma-separated weights ({describe(LISTS[lengths[0]])})"


def parse_block_weights(value: str, family: str, presets: Presets, x: float = 1.0, tag: str = "") -> BlockWeights:
    """`lbw=` value → BlockWeights for a model of `family`; AdapterError naming the tag and what was expected."""
    tag = tag or f"lbw={value}"
    value = value.strip()
    lengths = FAMILY_LENGTHS.get(family, SD_LENGTHS)
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
    return BlockWeights(weights, value, family)
