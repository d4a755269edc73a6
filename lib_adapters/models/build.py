"""Building diffusers/transformers models from the configs, with seeded random weights."""

from __future__ import annotations

import torch

from .configs import configs


def _seeded(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Every float parameter drawn from N(0, std²) (norm weights around 1), reproducibly from `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std
            is_norm_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(noise + 1 if is_norm_scale else noise)
    return module.eval()


def build(family: str, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
          components=("unet", "text_encoder", "text_encoder_2", "vae"), device: str | None = None
          ) -> dict[str, torch.nn.Module]:
    """diffusers components of `family` ({"unet", "text_encoder", ["text_encoder_2",] "vae"}).

    device="meta" gives names and shapes without memory (full-size layer maps); weights are then not seeded.
    """
    if device == "meta":
        with torch.device("meta"):
            return _build(family, size, seed, dtype, components, seed_weights=False)
    return _build(family, size, seed, dtype, components)


def _build(family, size, seed, dtype, components, seed_weights=True) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = configs(family, size)
    out: dict[str, torch.nn.Module] = {}
    if "unet" in components:
        out["unet"] = UNet2DConditionModel(**cfg["unet"])
    if "text_encoder" in components:
        out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    if "text_encoder_2" in components and "text_encoder_2" in cfg:
        out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    if "vae" in components:
        out["vae"] = AutoencoderKL(**cfg["vae"])
    for i, name in enumerate(sorted(out)):
        if seed_weights:
            _seeded(out[name], seed * 1000 + i)
        if dtype != torch.float32:
            out[name].to(dtype)
    return out


def build_tiny(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """Tiny diffusers components of `family` with the real topology: unet, text_encoder, [text_encoder_2,] vae."""
    return build(family, "tiny", seed, dtype)
