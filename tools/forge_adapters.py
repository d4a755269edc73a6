#!/usr/bin/env python3
"""Random LyCORIS-style LoKr and diag-OFT files for the SD1.5 layout, for the by-hand Forge API check.

Writes NAME.safetensors with kohya/LyCORIS names (`lora_unet_…`, `lora_te_…`) on the same modules the harness's
LoRA targets (attention, feed-forward, proj_in/out; CLIP attention and MLP). Layer shapes come from the
harness's own SD1.5 configs (shared/hosts/forge/make_checkpoint.py, imported, not copied).
Usage: python tools/forge_adapters.py --kind lokr|oft --out models/Lora/test_lokr.safetensors
"""

import argparse
import hashlib
import os
import sys

import torch
from safetensors.torch import save_file

HARNESS = os.environ.get("FORGE_HARNESS", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "hosts", "forge"))
UNET_LEAVES = ("proj_in", "proj_out", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
               "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TE_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def generator(key: str, seed: int) -> torch.Generator:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little")
    return torch.Generator().manual_seed((seed * 1_000_003 + h) % (2**63))


def layers():
    sys.path.insert(0, os.path.abspath(HARNESS))
    from make_checkpoint import CLIP_CONFIG, UNET_CONFIG
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
    for prefix, model, leaves in (("lora_unet", unet, UNET_LEAVES), ("lora_te", clip, TE_LEAVES)):
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(leaves):
                if prefix == "lora_unet" and ".attentions." not in name:
                    continue
                out_dim, in_dim = mod.weight.shape[:2]
                yield f"{prefix}_{name.replace('.', '_')}", out_dim, in_dim


def lokr(key, out_dim, in_dim, seed, rank=4, std=0.1):
    a, c = 8, 8  # small factor: O = 8·b, I = 8·d; w2 split at `rank`
    g = generator(key, seed)
    return {
        "lokr_w1": torch.randn(a, c, generator=g) * std * 4,
        "lokr_w2_a": torch.randn(out_dim // a, rank, generator=g) * std,
        "lokr_w2_b": torch.randn(rank, in_dim // c, generator=g) * std,
        "alpha": torch.tensor(float(rank)),
    }


def oft(key, out_dim, in_dim, seed, block=16, std=0.05):
    g = generator(key, seed)
    return {"oft_blocks": torch.randn(out_dim // block, block, block, generator=g) * std, "alpha": torch.tensor(0.0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kind", choices=("lokr", "oft"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    make = {"lokr": lokr, "oft": oft}[args.kind]
    tensors = {}
    for key, out_dim, in_dim in layers():
        for param, t in make(key, out_dim, in_dim, args.seed).items():
            tensors[f"{key}.{param}"] = t.half() if t.is_floating_point() and param != "alpha" else t
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{args.kind}"}}',
            "ss_base_model_version": "sd_v1", "ss_output_name": os.path.splitext(os.path.basename(args.out))[0]}
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
