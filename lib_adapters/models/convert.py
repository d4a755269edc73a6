"""diffusers components → one WebUI single-file state dict in ldm (SD1/SD2) or sgm (SDXL) naming."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..naming.text import hf_to_openclip
from ..naming.unet import diffusers_to_ldm, layers_per_block_diffusers, up_blocks_with_attention

ROOTS = {
    "sd1": {"unet": "model.diffusion_model.", "text_encoder": "cond_stage_model.transformer."},
    "sd2": {"unet": "model.diffusion_model.", "text_encoder": "cond_stage_model.model."},
    "sdxl": {"unet": "model.diffusion_model.", "text_encoder": "conditioner.embedders.0.transformer.",
             "text_encoder_2": "conditioner.embedders.1.model."},
}
VAE_ROOT = "first_stage_model."
OPENCLIP = {"sd1": (), "sd2": ("text_encoder",), "sdxl": ("text_encoder_2",)}


def _state(x) -> dict[str, Tensor]:
    return x.state_dict() if isinstance(x, torch.nn.Module) else dict(x)


def unet_to_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers UNet state dict → names relative to `model.diffusion_model.` (formats.md §5.2)."""
    modules = {k.rpartition(".")[0] for k in state}
    layers, up_attn = layers_per_block_diffusers(modules), up_blocks_with_attention(modules)
    out = {}
    for key, t in state.items():
        module, _, param = key.rpartition(".")
        ldm = diffusers_to_ldm(module, layers, up_attn)
        if ldm is None:
            raise ValueError(f"no ldm name for UNet key {key!r}")
        out[f"{ldm}.{param}"] = t
    return out


def _hf_rel(key: str) -> str:
    return key[len("text_model."):] if key.startswith("text_model.") else key


def text_to_hf_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIP state dict → names relative to the `transformer.` wrapper (with `text_model.` and position_ids)."""
    out = {}
    positions = None
    for key, t in state.items():
        rel = _hf_rel(key)
        if rel.startswith("text_projection"):
            continue
        out["text_model." + rel] = t
        if rel == "embeddings.position_embedding.weight":
            positions = t.shape[0]
    if positions:
        out["text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def text_to_openclip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIP state dict → OpenCLIP names relative to `model.` (q/k/v fused into `attn.in_proj_*`)."""
    out: dict[str, Tensor] = {}
    fused: dict[str, list] = {}
    for key, t in state.items():
        rel = _hf_rel(key)
        if rel == "embeddings.position_embedding.weight":
            out["positional_embedding"] = t
            continue
        if rel == "text_projection.weight":
            out["text_projection"] = t.T.contiguous()
            continue
        if rel.startswith("embeddings.position_ids"):
            continue
        module, _, param = rel.rpartition(".")
        mapped = hf_to_openclip(module)
        if mapped is None:
            raise ValueError(f"no OpenCLIP name for text-encoder key {key!r}")
        oc, part = mapped
        if part is None:
            out[f"{oc}.{param}"] = t
        else:
            fused.setdefault(f"{oc}.in_proj_{param}", [None] * 3)[part] = t
    for name, parts in fused.items():
        if any(p is None for p in parts):
            raise ValueError(f"incomplete q/k/v for {name}")
        out[name] = torch.cat(parts, 0)
    return out


def vae_to_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict → ldm names relative to `first_stage_model.`."""
    n_up = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, t in state.items():
        new = key
        new = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                     lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", new)
        if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new):
            new = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
            if m.group(3) == "weight" and t.ndim == 2:
                t = t[:, :, None, None]
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.").replace("conv_norm_out.", "norm_out.")
        out[new] = t
    return out


def alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> Tensor:
    """The scaled-linear schedule every SD checkpoint stores (float32)."""
    betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(torch.float32)


def infer_family(components) -> str:
    """sdxl with a second text encoder, else sd2 when the UNet's proj_in is Linear (2-D), else sd1."""
    if components.get("text_encoder_2") is not None:
        return "sdxl"
    unet = components.get("unet")
    if isinstance(unet, torch.nn.Module):
        return "sd2" if getattr(unet.config, "use_linear_projection", False) else "sd1"
    proj = next((v for k, v in dict(unet or {}).items() if k.endswith("proj_in.weight")), None)
    return "sd2" if proj is not None and proj.ndim == 2 else "sd1"


def to_checkpoint(components: dict, family: str | None = None, include_vae: bool = True) -> dict[str, Tensor]:
    """One single-file state dict (WebUI naming: UNet, text encoders, `first_stage_model.` VAE, alphas_cumprod,
    position_ids) from diffusers components (modules or state dicts); tensors are shared where not fused."""
    family = family or infer_family(components)
    roots = ROOTS[family]
    out: dict[str, Tensor] = {}
    for comp, root in roots.items():
        if components.get(comp) is None:
            continue
        state = _state(components[comp])
        if comp == "unet":
            converted = unet_to_ldm(state)
        elif comp in OPENCLIP[family]:
            converted = text_to_openclip(state)
            if family == "sd2" and "text_projection" not in converted:
                width = converted["token_embedding.weight"].shape[1]
                g = torch.Generator().manual_seed(width)
                converted["text_projection"] = torch.randn(width, width, generator=g) * 0.05
        else:
            converted = text_to_hf_ldm(state)
        out.update({root + k: v for k, v in converted.items()})
    if include_vae and components.get("vae") is not None:
        out.update({VAE_ROOT + k: v for k, v in vae_to_ldm(_state(components["vae"])).items()})
    out["alphas_cumprod"] = alphas_cumprod()
    return out
