"""Full-size (or --quick) SD models with cheap pseudo-random weights, and their WebUI single-file view.

Configs come from lib_adapters.models.configs (the real SD1.5 / SDXL values); --quick divides the widths, keeping
every layer and name. Weights are filled from a seeded random pool (a full randn per tensor takes ~15 s on 2 cores).
"""

from __future__ import annotations

import torch

POOL_SIZE = 1 << 24
NORM_SUFFIXES = ("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "layer_norm1.weight",
                 "layer_norm2.weight", "final_layer_norm.weight", "conv_norm_out.weight")


def full_configs(family: str) -> dict[str, dict]:
    from lib_adapters.models.configs import configs

    cfg = configs(family, "full")
    cfg.pop("vae", None)
    return cfg


def quick_configs(family: str) -> dict[str, dict]:
    """The real topology with widths divided by 10 (UNet) or 12 (text encoders); layer counts unchanged."""
    cfg = full_configs(family)
    u = cfg["unet"]
    u["block_out_channels"] = tuple(c // 10 for c in u["block_out_channels"])  # 32/64/128
    u["cross_attention_dim"] = 64 if family == "sd1" else 128
    heads = u["attention_head_dim"]
    u["attention_head_dim"] = 8 if isinstance(heads, int) else tuple(max(1, h // 5) for h in heads)
    if "projection_class_embeddings_input_dim" in u:
        u["addition_time_embed_dim"] = 16
        u["projection_class_embeddings_input_dim"] = 64 + 6 * 16
    u["sample_size"] = 16
    for comp, width in (("text_encoder", 64), ("text_encoder_2", 64)):
        if comp in cfg:
            t = cfg[comp]
            t.update(hidden_size=width, intermediate_size=4 * width, num_attention_heads=4)
            if "projection_dim" in t:
                t["projection_dim"] = width
    if family == "sdxl":
        cfg["unet"]["cross_attention_dim"] = 128
    return cfg


def _fill(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill every floating parameter from a seeded random pool at random offsets (norm scales = 1)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_SIZE, generator=g) * std
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            if name.endswith(NORM_SUFFIXES):
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            done, n = 0, flat.numel()
            while done < n:
                take = min(n - done, POOL_SIZE // 2)
                start = int(torch.randint(0, POOL_SIZE - take + 1, (1,), generator=g))
                flat[done:done + take].copy_(pool[start:start + take])
                done += take


def build(family: str = "sd1", quick: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
          device: str = "cpu") -> dict[str, torch.nn.Module]:
    """{"unet", "text_encoder"[, "text_encoder_2"]}: diffusers/transformers modules, eval mode, no grad."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = quick_configs(family) if quick else full_configs(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
    out = {"unet": unet.to_empty(device="cpu")}
    out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    if "text_encoder_2" in cfg:
        out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    for i, (name, m) in enumerate(out.items()):
        _fill(m, seed * 10 + i)
        m.eval().requires_grad_(False)
        if dtype != torch.float32 or device != "cpu":
            m.to(device=device, dtype=dtype)
    return out


def checkpoint_state_dict(components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The model as a WebUI single-file state dict (ldm/sgm names); tensors shared with the modules."""
    from lib_adapters.models import to_checkpoint

    sd = to_checkpoint({k: v.state_dict() for k, v in components.items()}, include_vae=False)
    sd.pop("alphas_cumprod", None)
    return sd


def model_bytes(components) -> int:
    return sum(p.numel() * p.element_size() for m in components.values() for p in m.parameters())


class Components(torch.nn.Module):
    """The diffusers components under one root, so that a ModuleStore names them `unet.…`, `text_encoder.…`."""

    def __init__(self, components: dict[str, torch.nn.Module]):
        super().__init__()
        for k, v in components.items():
            self.add_module(k, v)
