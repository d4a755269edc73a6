"""The T5 text encoder (Flux's second, SD3's third): HF `T5EncoderModel` module paths (`encoder.block.N.layer.0.
SelfAttention.q`, `layer.1.DenseReluDense.wi_0`, …), wherever a model holds them.

Roots: Forge/ComfyUI `t5xxl.transformer.`, single files `text_encoders.t5xxl.transformer.`, diffusers components
(`text_encoder_2.` for Flux, `text_encoder_3.` for SD3). Adapters name the same paths behind their prefixes, which
depend on the family (kohya `lora_te3_`; OneTrainer `lora_te2_` on Flux; ComfyUI `text_encoders.t5xxl.transformer.`;
OMI `t5.`): each family module lists its own.
"""

from __future__ import annotations

from .slots import Table, find_root, native_table

MARKER = "encoder.final_layer_norm.weight"
CHECKPOINT_ROOTS = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.")
# Spellings in front of the T5 path that mean the same encoder whatever the family.
COMMON_PREFIXES = ("text_encoders_t5xxl_transformer_", "t5xxl_transformer_", "t5_")


def root(names, roots=CHECKPOINT_ROOTS) -> str | None:
    """Where a T5 encoder lives among `names` (one of `roots`), or None."""
    return find_root(names, MARKER, roots)


def table(shapes, root: str) -> Table:
    """T5 module path in `_` spelling (`encoder_block_0_layer_0_SelfAttention_q`) → Slot (text-encoder strength)."""
    return native_table(shapes, root, "te")


def is_t5(names) -> bool:
    """Whether a diffusers text-encoder component (names relative to it) is a T5 encoder."""
    return MARKER in names
