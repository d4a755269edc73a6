"""SD3/SD3.5 models for tests and benchmarks: seeded diffusers components (MMDiT, CLIP-L, CLIP-G, T5) and their
single-file checkpoint twin (SAI `model.diffusion_model.joint_blocks…` + `text_encoders.{clip_l,clip_g,t5xxl}.
transformer.`).

The twin is built by the naming tables of `naming.sd3` (q/k/v fused by row blocks, `norm_out` and the last
`norm1_context` swapped to (shift, scale)); diffusers' own SD3 single-file converter reads it back exactly.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from ..naming.sd3 import diffusers_to_sai, is_swapped, last_block
from .build import _seeded

VARIANTS = ("sd3-medium", "sd3.5-large", "sd3.5-medium")
_TINY_MMDIT = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                   num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                   pooled_projection_dim=40, pos_embed_max_size=8)
TINY_MMDIT = {
    "sd3-medium": dict(_TINY_MMDIT),
    "sd3.5-large": dict(_TINY_MMDIT, qk_norm="rms_norm"),
    "sd3.5-medium": dict(_TINY_MMDIT, qk_norm="rms_norm", dual_attention_layers=(0,)),
}
# Heads of 64 (width = 64 × depth, SAI's rule), for what reads the depth from the width (`convert`).
TINY_MMDIT["sd3.5-medium-h64"] = dict(TINY_MMDIT["sd3.5-medium"], num_layers=2, attention_head_dim=64,
                                      num_attention_heads=2, caption_projection_dim=128)
_TINY_CLIP = dict(intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=1000,
                  max_position_embeddings=77, bos_token_id=998, eos_token_id=999, pad_token_id=999)
TINY_CLIP_L = dict(_TINY_CLIP, hidden_size=16, projection_dim=16, hidden_act="quick_gelu")
TINY_CLIP_G = dict(_TINY_CLIP, hidden_size=24, intermediate_size=48, num_attention_heads=3, projection_dim=24,
                   hidden_act="gelu")
TINY_T5 = dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, feed_forward_proj="gated-gelu",
               vocab_size=1000)
ROOTS = {"transformer": "model.diffusion_model.", "text_encoder": "text_encoders.clip_l.transformer.",
         "text_encoder_2": "text_encoders.clip_g.transformer.", "text_encoder_3": "text_encoders.t5xxl.transformer."}


def build_sd3(variant: str = "sd3.5-medium", seed: int = 0, components=("transformer", "text_encoder",
              "text_encoder_2", "text_encoder_3")) -> dict[str, torch.nn.Module]:
    """Tiny seeded SD3 components: transformer (MMDiT), text_encoder (CLIP-L), text_encoder_2 (CLIP-G),
    text_encoder_3 (T5 encoder), with the real module names."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    makers = {
        "transformer": lambda: SD3Transformer2DModel(**TINY_MMDIT[variant]),
        "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_L)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_G)),
        "text_encoder_3": lambda: T5EncoderModel(T5Config(**TINY_T5)),
    }
    return {name: _seeded(makers[name](), seed * 1000 + i) for i, name in enumerate(components)}


def transformer_to_sai(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers SD3Transformer2DModel state dict → SAI names relative to `model.diffusion_model.`."""
    modules = {k.rpartition(".")[0] for k in state}
    last = last_block(modules)
    out: dict[str, Tensor] = {}
    fused: dict[str, list] = {}
    for key, t in state.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = t
            continue
        module, _, param = key.rpartition(".")
        mapped = diffusers_to_sai(module)
        if mapped is None:
            raise ValueError(f"no SAI name for MMDiT key {key!r}")
        sai, part = mapped
        if part is not None:
            fused.setdefault(f"{sai}.{param}", [None] * 3)[part] = t
        elif is_swapped(sai, last):
            shift_scale = t.chunk(2, dim=0)
            out[f"{sai}.{param}"] = torch.cat([shift_scale[1], shift_scale[0]], 0)
        else:
            out[f"{sai}.{param}"] = t
    for name, parts in fused.items():
        if any(p is None for p in parts):
            raise ValueError(f"incomplete q/k/v for {name}")
        out[name] = torch.cat(parts, 0)
    return out


def sd3_to_checkpoint(components: dict) -> dict[str, Tensor]:
    """One SD3 single-file state dict (SAI MMDiT + HF-layout text encoders under `text_encoders.`)."""
    out: dict[str, Tensor] = {}
    for comp, root in ROOTS.items():
        module = components.get(comp)
        if module is None:
            continue
        state = module.state_dict() if isinstance(module, torch.nn.Module) else dict(module)
        if comp == "transformer":
            state = transformer_to_sai(state)
        elif comp == "text_encoder_3":
            state = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}  # tied to `shared`
        else:
            state = {("" if k.startswith(("text_model.", "text_projection")) else "text_model.") + k: v
                     for k, v in state.items()}
        out.update({root + k: v for k, v in state.items()})
    return out


FULL_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   projection_dim=768, hidden_act="quick_gelu")
FULL_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   projection_dim=1280, hidden_act="gelu")
FULL_T5 = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, feed_forward_proj="gated-gelu",
               vocab_size=32128)


@lru_cache(maxsize=2)
def reference_shapes(width: int, attn2: bool = True) -> dict[str, dict[str, tuple]]:
    """Names and shapes ({"diffusers": {component.name: shape}, "checkpoint": {name: shape}}) of a full SD3
    pipeline whose MMDiT is `width` wide (depth = width / 64 heads of 64, SAI's rule for every SD3 model), built on
    the meta device; `attn2` gives every block SD3.5 Medium's second attention (names only: a superset)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    depth = width // 64
    if depth < 1 or width % 64:
        raise ValueError(f"an SD3 MMDiT is 64 × depth wide, not {width}")
    with torch.device("meta"):
        comps = {
            "transformer": SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=depth,
                attention_head_dim=64, num_attention_heads=depth, caption_projection_dim=width,
                joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=8, qk_norm="rms_norm",
                dual_attention_layers=tuple(range(depth)) if attn2 else ()),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**FULL_CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**FULL_CLIP_G)),
            "text_encoder_3": T5EncoderModel(T5Config(**FULL_T5)),
        }
        checkpoint = {k: tuple(v.shape) for k, v in sd3_to_checkpoint(comps).items()}
    diffusers = {name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for name, m in comps.items()}
    return {"diffusers": diffusers, "checkpoint": checkpoint}
