"""Adapter files as users have them, generated on the benchmark's own model with seeded random non-zero weights.

kohya LoRA / LoCon / LyCORIS LoKr / diag-OFT come from lycoris-lora's kohya network (real kohya `lora_unet_…` /
`lora_te_…` keys); the PEFT/diffusers LoRA comes from peft on the diffusers modules (`unet.…lora_A.weight`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

UNET_ATTN = ["Transformer2DModel"]
UNET_CONV = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
TE_MODULES = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]

UNET_RESNET = ["ResnetBlock2D"]

# name → (lycoris algo, constructor kwargs, UNet preset, conv layers on)
KINDS = {
    "lora": ("lora", dict(lora_dim=32, alpha=16, conv_lora_dim=0), UNET_ATTN, False),
    "locon": ("lora", dict(lora_dim=32, alpha=16, conv_lora_dim=16, conv_alpha=8), UNET_CONV, True),
    "lokr": ("lokr", dict(lora_dim=10000, alpha=1, conv_lora_dim=0, factor=8), UNET_ATTN, False),
    "lokr-split": ("lokr", dict(lora_dim=8, alpha=4, conv_lora_dim=0, factor=-1, decompose_both=True), UNET_ATTN, False),
    "lokr-tucker": ("lokr", dict(lora_dim=16, alpha=8, conv_lora_dim=16, conv_alpha=8, factor=8, use_tucker=True),
                    UNET_RESNET, True),
    "loha": ("loha", dict(lora_dim=16, alpha=8, conv_lora_dim=0), UNET_ATTN, False),
    "oft8": ("diag-oft", dict(lora_dim=8, alpha=1, conv_lora_dim=0, constraint=0), UNET_ATTN, False),
    "oft": ("diag-oft", dict(lora_dim=32, alpha=1, conv_lora_dim=0, constraint=0), UNET_ATTN, False),
    "oft64r": ("diag-oft", dict(lora_dim=64, alpha=1, conv_lora_dim=0, constraint=1e-3, rescaled=True), UNET_ATTN, False),
    "boft": ("boft", dict(lora_dim=16, alpha=1, conv_lora_dim=0, constraint=0), UNET_ATTN, False),
    "ia3": ("ia3", dict(lora_dim=1, alpha=1, conv_lora_dim=0), UNET_ATTN, False),
    "dora-out": ("lora", dict(lora_dim=32, alpha=16, conv_lora_dim=0, weight_decompose=True, wd_on_out=True), UNET_ATTN, False),
    "dora-in": ("lora", dict(lora_dim=32, alpha=16, conv_lora_dim=0, weight_decompose=True, wd_on_out=False), UNET_ATTN, False),
}
BLOCKS = {"oft64r": 64}  # block size written directly (LyCORIS itself cannot rebuild these: see report)
STD = {"oft8": 0.002, "oft": 0.002, "oft64r": 0.002, "boft": 0.002, "ia3": 0.1}
PEFT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
PEFT_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _file_name(lora_name: str) -> str:
    """Files keep HF CLIP's `text_model` level, which transformers 5 modules lack (formats.md §5.4)."""
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        if lora_name.startswith(prefix) and not lora_name.startswith(prefix + "text_model_"):
            return prefix + "text_model_" + lora_name[len(prefix):]
    return lora_name


def _randomise(sd: dict[str, torch.Tensor], seed: int, std: float) -> dict[str, torch.Tensor]:
    """Random factors; DoRA magnitudes, OFT rescales and IA3 vectors stay near their trained scale (1 ± noise)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        v = v.detach().float()
        if k.endswith(("dora_scale", "rescale")):
            v = v * (1 + 0.1 * torch.randn(v.shape, generator=g))
        elif v.ndim >= 1 and v.numel() > 1 and not k.endswith(("alpha", "on_input")):
            v = torch.randn(v.shape, generator=g) * std
        out[k] = v
    return out


def text_encoders(components) -> list:
    return [components[k] for k in ("text_encoder", "text_encoder_2") if k in components]


def lycoris_file(kind: str, components, path: str, seed: int) -> str:
    """Write one kohya-named LyCORIS/kohya adapter of `kind` for the components to `path` (fp16, like trainers)."""
    from lycoris.kohya import LycorisNetworkKohya
    from safetensors.torch import save_file

    algo, kwargs, unet_modules, conv = KINDS[kind]
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    LycorisNetworkKohya.apply_preset({
        "enable_conv": conv, "unet_target_module": unet_modules, "unet_target_name": [],
        "text_encoder_target_module": TE_MODULES, "text_encoder_target_name": [],
        "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "exclude_name": [],
    })
    kwargs = dict(kwargs)
    tes = text_encoders(components)
    te = tes if len(tes) > 1 else tes[0]
    net = LycorisNetworkKohya(te, components["unet"], multiplier=1.0, network_module=algo, warn_on_unmatched=False, **kwargs)
    sd = {}
    for lora in net.unet_loras + net.text_encoder_loras:
        for k, v in lora.state_dict().items():
            sd[f"{_file_name(lora.lora_name)}.{k}"] = v
    if kind in BLOCKS:  # LyCORIS's factorization gives ≤ 20-row blocks on these widths: write b×b blocks as such
        b = BLOCKS[kind]
        sd = {k: v.new_zeros(v.shape[0] * v.shape[1] // b, b, b) if k.endswith("oft_blocks") else v for k, v in sd.items()}
    sd = {k: v.to(torch.float16) for k, v in _randomise(sd, seed, STD.get(kind, 0.02)).items()}
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{algo}"}}',
            "ss_base_model_version": "sdxl_base_v1-0" if "text_encoder_2" in components else "sd_v1"}
    save_file(sd, path, meta)
    return path


def peft_file(components, path: str, seed: int) -> str:
    """A diffusers-format PEFT LoRA (rank 32, unet.* and text_encoder.* keys), as pipe.save_lora_weights writes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, model in components.items():
        targets = PEFT_UNET_TARGETS if prefix == "unet" else PEFT_TE_TARGETS
        for name, mod in model.named_modules():
            if not any(name == t or name.endswith("." + t) for t in targets):
                continue
            w = getattr(mod, "weight", None)
            if w is None or w.ndim not in (2, 4):
                continue
            out_dim, in_dim = w.shape[0], w.shape[1]
            tail = tuple(w.shape[2:]) if w.ndim == 4 else ()
            a = torch.randn((32, in_dim) + ((1, 1) if tail else ()), generator=g) * 0.02
            b = torch.randn((out_dim, 32) + ((1, 1) if tail else ()), generator=g) * 0.02
            key = f"{prefix}.{'' if prefix == 'unet' else 'text_model.'}{name}"
            sd[f"{key}.lora_A.weight"] = a.to(torch.float16)
            sd[f"{key}.lora_B.weight"] = b.to(torch.float16)
    save_file(sd, path, {"format": "pt"})
    return path


CASES = ("lora", "peft") + tuple(k for k in KINDS if k != "lora")


def generate(components, out_dir: str | os.PathLike, cases=CASES) -> dict[str, tuple[str, str]]:
    """case → (file A, file B): two different adapters of the same kind, for switch and stack."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, case in enumerate(cases):
        pair = []
        for j, tag in enumerate("AB"):
            path = str(out_dir / f"{case}_{tag}.safetensors")
            if not os.path.exists(path):
                if case == "peft":
                    peft_file(components, path, 100 * i + j)
                else:
                    lycoris_file(case, components, path, 100 * i + j)
            pair.append(path)
        files[case] = tuple(pair)
    return files
