"""Tiny Flux.1 test material, no downloads: a diffusers `FluxTransformer2DModel` (2 double + 2 single blocks, H=16,
M=64, guidance embedder), its BFL-named twin built by the documented mapping (modern-models.md §6: qkv = cat(to_q,
to_k, to_v), linear1 = cat(q, k, v, proj_mlp), final adaLN = swapped norm_out halves, norm `scale` = `weight`),
tiny CLIP-L and T5 encoders, and single-file checkpoints in every layout Flux ships in.

The mapping here is written out independently of `lib_adapters.naming.flux`, so tests check that module against it.
"""

from __future__ import annotations

import re

import torch

H, HEADS, HEAD_DIM, M = 16, 2, 8, 64
CONFIG = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=HEAD_DIM,
              num_attention_heads=HEADS, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
              axes_dims_rope=(2, 2, 4))
CLIP_CONFIG = dict(hidden_size=20, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
                   max_position_embeddings=16)
T5_CONFIG = dict(d_model=24, d_ff=48, num_layers=2, num_heads=3, d_kv=8, feed_forward_proj="gated-gelu",
                 vocab_size=99)

DOUBLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mod.lin": "norm1.linear",
          "txt_mod.lin": "norm1_context.linear", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
          "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
       "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
       "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
       "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
       "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
       "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
       "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}


def seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (biases too), norm gains around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1 + noise if p.ndim == 1 and "norm" in name and name.endswith("weight") else noise)
    return module.eval()


def transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    return seeded(FluxTransformer2DModel(**CONFIG), seed)


def clip_l(seed: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel

    return seeded(CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)), seed)


def t5(seed: int = 2):
    from transformers import T5Config, T5EncoderModel

    return seeded(T5EncoderModel(T5Config(**T5_CONFIG)), seed)


def swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, 0)
    return torch.cat([b, a])


def module_pairs(double: int = CONFIG["num_layers"], single: int = CONFIG["num_single_layers"]):
    """(BFL module, diffusers module) for every one-to-one layer (norms included)."""
    for n in range(double):
        for b, d in {**DOUBLE, **DOUBLE_NORMS}.items():
            yield f"double_blocks.{n}.{b}", f"transformer_blocks.{n}.{d}"
    for n in range(single):
        for b, d in {**SINGLE, **SINGLE_NORMS}.items():
            yield f"single_blocks.{n}.{b}", f"single_transformer_blocks.{n}.{d}"
    yield from TOP.items()


def fused_groups(double: int = CONFIG["num_layers"], single: int = CONFIG["num_single_layers"]):
    """(BFL fused module, its diffusers parts in row order)."""
    for n in range(double):
        for b, parts in DOUBLE_QKV.items():
            yield f"double_blocks.{n}.{b}", tuple(f"transformer_blocks.{n}.{p}" for p in parts)
    for n in range(single):
        yield f"single_blocks.{n}.linear1", tuple(f"single_transformer_blocks.{n}.{p}" for p in LINEAR1)


def to_bfl(state: dict[str, torch.Tensor], double: int = CONFIG["num_layers"],
           single: int = CONFIG["num_single_layers"]) -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer state dict in BFL names (what Forge and ComfyUI hold)."""
    out = {}
    for bfl, dif in module_pairs(double, single):
        if f"{dif}.weight" not in state:
            continue
        if bfl.endswith("_norm"):
            out[f"{bfl}.scale"] = state[f"{dif}.weight"]
            continue
        for p in ("weight", "bias"):
            if f"{dif}.{p}" in state:
                out[f"{bfl}.{p}"] = state[f"{dif}.{p}"]
    for bfl, parts in fused_groups(double, single):
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = torch.cat([state[f"{part}.{p}"] for part in parts])
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap(state[f"norm_out.linear.{p}"])
    return out


def from_bfl(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_bfl`."""
    out = {}
    for b, dif in module_pairs():
        if b.endswith("_norm"):
            if f"{b}.scale" in bfl:
                out[f"{dif}.weight"] = bfl[f"{b}.scale"]
            continue
        for p in ("weight", "bias"):
            if f"{b}.{p}" in bfl:
                out[f"{dif}.{p}"] = bfl[f"{b}.{p}"]
    for b, parts in fused_groups():
        widths = [H, H, H, M][: len(parts)]
        for p in ("weight", "bias"):
            for part, t in zip(parts, torch.split(bfl[f"{b}.{p}"], widths)):
                out[f"{part}.{p}"] = t
    for p in ("weight", "bias"):
        out[f"norm_out.linear.{p}"] = swap(bfl[f"final_layer.adaLN_modulation.1.{p}"])
    return out


def checkpoint(model=None, root: str = "model.diffusion_model.", encoders: bool = True, vae: bool = True,
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A single-file Flux checkpoint: BFL transformer under `root` (ComfyUI/Forge all-in-one layout with
    `text_encoders.clip_l.transformer.`, `text_encoders.t5xxl.transformer.`, `vae.`), or transformer only."""
    model = model if model is not None else transformer()
    out = {root + k: v.detach().clone() for k, v in to_bfl(model.state_dict()).items()}
    if encoders:
        out.update({"text_encoders.clip_l.transformer.text_model." + k.removeprefix("text_model."): v.detach().clone()
                    for k, v in clip_l().state_dict().items()})
        t5_state = t5().state_dict()
        out.update({"text_encoders.t5xxl.transformer." + k: v.detach().clone() for k, v in t5_state.items()
                    if k != "encoder.embed_tokens.weight"})
    if vae:
        g = torch.Generator().manual_seed(5)
        out["vae.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3, generator=g)
        out["vae.encoder.conv_out.weight"] = torch.randn(32, 8, 3, 3, generator=g)
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


def bfl_of(diffusers_module: str, h: int = H, m: int = M, double: int = CONFIG["num_layers"],
           single: int = CONFIG["num_single_layers"]) -> tuple[str, tuple[int, int] | None, bool]:
    """(BFL module, row block or None, swapped) holding a diffusers module, by the documented mapping."""
    for bfl, dif in module_pairs(double, single):
        if dif == diffusers_module:
            return bfl, None, False
    for bfl, parts in fused_groups(double, single):
        if diffusers_module in parts:
            j = parts.index(diffusers_module)
            return bfl, (j * h, j * h + (m if j == 3 else h)), False
    if diffusers_module == "norm_out.linear":
        return "final_layer.adaLN_modulation.1", None, True
    raise KeyError(diffusers_module)


def kohya_name(bfl_module: str) -> str:
    return "lora_unet_" + bfl_module.replace(".", "_")


def diffusers_layers(model) -> list[str]:
    """Every Linear module path of the diffusers transformer."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def block_index(path: str) -> int | None:
    m = re.search(r"blocks\.(\d+)\.", path)
    return int(m.group(1)) if m else None


class DoubleStreamBlock(torch.nn.Module):
    """The Linear layout of BFL's double block (class name as LyCORIS's presets target it)."""

    def __init__(self):
        super().__init__()
        lin = torch.nn.Linear
        for s in ("img", "txt"):
            mod, attn = torch.nn.Module(), torch.nn.Module()
            mod.lin = lin(H, 6 * H)
            attn.qkv, attn.proj = lin(H, 3 * H), lin(H, H)
            setattr(self, f"{s}_mod", mod)
            setattr(self, f"{s}_attn", attn)
            setattr(self, f"{s}_mlp", torch.nn.Sequential(lin(H, M), torch.nn.GELU(approximate="tanh"), lin(M, H)))


class SingleStreamBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = torch.nn.Linear(H, 3 * H + M)
        self.linear2 = torch.nn.Linear(H + M, H)
        self.modulation = torch.nn.Module()
        self.modulation.lin = torch.nn.Linear(H, 3 * H)


def bfl_module(bfl_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The BFL twin's blocks as modules named and classed like BFL's (Forge's `IntegratedFluxTransformer2DModel`),
    holding `bfl_state`'s weights (norms and top-level layers left out)."""
    root = torch.nn.Module()
    root.double_blocks = torch.nn.ModuleList(DoubleStreamBlock() for _ in range(CONFIG["num_layers"]))
    root.single_blocks = torch.nn.ModuleList(SingleStreamBlock() for _ in range(CONFIG["num_single_layers"]))
    own = root.state_dict()
    root.load_state_dict({k: bfl_state[k] for k in own})
    return root.eval()
