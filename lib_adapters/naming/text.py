"""HF CLIP text-encoder module paths ↔ OpenCLIP (`model.transformer.resblocks.*`) paths (formats.md §5.4).

HF paths here are relative to `text_model.` (transformers 5 live models lack that level; files keep it).
OpenCLIP fuses q, k, v in `attn.in_proj_weight`: part 0/1/2 is its row block [p·d, (p+1)·d).
"""

from __future__ import annotations

import re

QKV = ("q_proj", "k_proj", "v_proj")
LAYER_HF_TO_OPENCLIP = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                        "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
LAYER_OPENCLIP_TO_HF = {v: k for k, v in LAYER_HF_TO_OPENCLIP.items()}
TOP_HF_TO_OPENCLIP = {"final_layer_norm": "ln_final", "embeddings.token_embedding": "token_embedding"}
TOP_OPENCLIP_TO_HF = {v: k for k, v in TOP_HF_TO_OPENCLIP.items()}


def openclip_to_hf(path: str) -> list[tuple[str, int | None]]:
    """HF paths (with the q/k/v part index for the fused attention) of an OpenCLIP module path (no `model.`)."""
    if path in TOP_OPENCLIP_TO_HF:
        return [(TOP_OPENCLIP_TO_HF[path], None)]
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", path)
    if not m:
        return []
    n, rest = m.groups()
    if rest == "attn":
        return [(f"encoder.layers.{n}.self_attn.{proj}", p) for p, proj in enumerate(QKV)]
    if rest in LAYER_OPENCLIP_TO_HF:
        return [(f"encoder.layers.{n}.{LAYER_OPENCLIP_TO_HF[rest]}", None)]
    return []


def hf_to_openclip(path: str) -> tuple[str, int | None] | None:
    """(OpenCLIP module path, part) of an HF CLIP module path; the module of a fused part is `…attn`."""
    if path in TOP_HF_TO_OPENCLIP:
        return TOP_HF_TO_OPENCLIP[path], None
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)$", path)
    if not m:
        return None
    n, rest = m.groups()
    if rest.startswith("self_attn.") and rest[10:] in QKV:
        return f"transformer.resblocks.{n}.attn", QKV.index(rest[10:])
    if rest in LAYER_HF_TO_OPENCLIP:
        return f"transformer.resblocks.{n}.{LAYER_HF_TO_OPENCLIP[rest]}", None
    return None
