"""The embedded default: a tiny pipeline with the real SD1 topology and seeded weights, plus three adapters
(LoRA, LoKr, OFT) that the project writes itself, so `generate` runs on a fresh machine without any download.

The adapter files use kohya/LyCORIS naming (`lora_unet_<diffusers path with _>`, `lora_te_text_model_…`), as real
SD1 files do; their weights are seeded random values sized to change the picture visibly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .configs import load_config, tiny_tokenizer
from .files import save_tensors

DEMO_SEED = 20240
DEMO_ADAPTERS = ("demo_lora", "demo_lokr", "demo_oft")
ATTN_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
TE_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def build_demo_pipeline(seed: int = DEMO_SEED, dtype: torch.dtype = torch.float32):
    """StableDiffusionPipeline from the shipped demo config; the same seed gives the same weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(load_config("demo", "unet"))
        vae = AutoencoderKL.from_config(load_config("demo", "vae"))
        te_config = {k: v for k, v in load_config("demo", "text_encoder").items() if k != "architectures"}
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
        _liven(unet)
    scheduler = PNDMScheduler.from_config(load_config("demo", "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _liven(unet: torch.nn.Module) -> None:
    """Scale the output conv up so the tiny random UNet's noise prediction is strong enough to leave visible
    structure in a few steps (a seeded, deterministic tweak of the demo weights)."""
    with torch.no_grad():
        unet.conv_out.weight.mul_(4.0)


def unet_targets(unet: torch.nn.Module) -> list[str]:
    """Diffusers paths of the UNet's attention projections (what most trainers target)."""
    return [n for n, m in unet.named_modules() if n.endswith(ATTN_PROJECTIONS) and isinstance(m, torch.nn.Linear)]


def te_targets(text_encoder: torch.nn.Module) -> list[str]:
    """HF CLIP paths with the `text_model.` level that adapter files carry (transformers 5 drops it in modules)."""
    names = [n for n, m in text_encoder.named_modules() if n.endswith(TE_PROJECTIONS) and isinstance(m, torch.nn.Linear)]
    return [n if n.startswith("text_model.") else "text_model." + n for n in names]


def _kohya(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def _weights(module: torch.nn.Module, paths: list[str]) -> dict[str, torch.Tensor]:
    named = dict(module.named_modules())
    return {p: named[p.removeprefix("text_model.") if p not in named else p].weight.detach() for p in paths}


def lora_tensors(pipe, gen: torch.Generator, rank: int = 4, alpha: float = 2.0, size: float = 0.6) -> dict:
    """A kohya LoRA on UNet attention and text-encoder projections; ‖ΔW‖ ≈ size·‖W‖ per layer at strength 1."""
    out = {}
    for prefix, module, paths in (("lora_unet_", pipe.unet, unet_targets(pipe.unet)),
                                  ("lora_te_", pipe.text_encoder, te_targets(pipe.text_encoder))):
        for path, w in _weights(module, paths).items():
            o, i = w.shape
            down = torch.randn(rank, i, generator=gen) / math.sqrt(i)
            up = torch.randn(o, rank, generator=gen)
            delta = (alpha / rank) * up @ down
            up *= size * w.norm() / delta.norm()
            key = _kohya(prefix, path)
            out[f"{key}.lora_down.weight"] = down
            out[f"{key}.lora_up.weight"] = up
            out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def lokr_tensors(pipe, gen: torch.Generator, factor: int = 4, size: float = 0.6) -> dict:
    """A LyCORIS LoKr (full w1, low-rank w2) on the UNet's attention projections."""
    out = {}
    for path, w in _weights(pipe.unet, unet_targets(pipe.unet)).items():
        o, i = w.shape
        a, c = factor, factor
        b, d = o // a, i // c
        w1 = torch.randn(a, c, generator=gen)
        w2a = torch.randn(b, 2, generator=gen)
        w2b = torch.randn(2, d, generator=gen) / math.sqrt(d)
        delta = torch.kron(w1, w2a @ w2b)
        w1 *= size * w.norm() / delta.norm()
        key = _kohya("lora_unet_", path)
        out.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b,
                    f"{key}.alpha": torch.tensor(2.0)})
    return out


def oft_tensors(pipe, gen: torch.Generator, block: int = 8, size: float = 0.3) -> dict:
    """A LyCORIS diag-OFT (blocks of 8 rows, unconstrained) on the UNet's attention projections."""
    out = {}
    for path, w in _weights(pipe.unet, unet_targets(pipe.unet)).items():
        n = w.shape[0] // block
        key = _kohya("lora_unet_", path)
        out[f"{key}.oft_blocks"] = size * torch.randn(n, block, block, generator=gen)
        out[f"{key}.alpha"] = torch.tensor(0.0)
    return out


def demo_metadata(name: str, algo: str) -> dict[str, str]:
    return {"ss_output_name": name, "ss_network_module": "lycoris.kohya" if algo != "lora" else "networks.lora",
            "ss_network_args": '{"algo": "%s"}' % algo, "ss_base_model_version": "sd_v1",
            "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": f"lib_adapters {name}"}


def write_demo_adapters(folder: str | os.PathLike, pipe=None, seed: int = DEMO_SEED) -> dict[str, Path]:
    """Write demo_lora / demo_lokr / demo_oft .safetensors into `folder` (same bytes for the same seed)."""
    pipe = pipe or build_demo_pipeline(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed + 1)
    built = {"demo_lora": (lora_tensors(pipe, gen), "lora"), "demo_lokr": (lokr_tensors(pipe, gen), "lokr"),
             "demo_oft": (oft_tensors(pipe, gen), "diag-oft")}
    paths = {}
    for name, (tensors, algo) in built.items():
        path = folder / f"{name}.safetensors"
        save_tensors(path, {k: v.float().contiguous() for k, v in tensors.items()}, demo_metadata(name, algo))
        paths[name] = path
    return paths
