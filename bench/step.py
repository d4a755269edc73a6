"""Per-step cost: one UNet forward with no adapter, with ours merged, with PEFT's unfused layers, with PEFT fused."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .memory import sync
from .models import build


def _inputs(unet, latent: int, device: str, dtype):
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g).to(device, dtype),
                                       "time_ids": torch.tensor([[latent * 8.0] * 2 + [0, 0] + [latent * 8.0] * 2]).to(device, dtype)}
    return x, torch.tensor([500], device=device), ctx, kwargs


def timed_forward(unet, inputs, n: int, device: str) -> list[float]:
    x, t, ctx, kw = inputs
    out = []
    for _ in range(n):
        start = time.perf_counter()
        unet(x, t, ctx, **kw)
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--family", default="sd1")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px; 64 = 512 px)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    from .rows import OursRow, PeftRow
    from .worker import start

    files = start(args)
    a = files["lora"][0]
    components = build(args.family, args.quick, device=args.device)
    unet = components["unet"]
    inputs = _inputs(unet, args.latent, args.device, torch.float32)
    timed_forward(unet, inputs, 1, args.device)  # warm-up
    res = {"latent": args.latent}
    res["base"] = timed_forward(unet, inputs, args.n, args.device)
    ours = OursRow(dict(components), args.device, "module")
    ours.goto(((a, 1.0),))
    res["ours_merged"] = timed_forward(unet, inputs, args.n, args.device)
    ours.goto(())
    peft = PeftRow(components, args.device)
    peft.pipe.load_lora_weights(a, adapter_name="a")
    res["peft_unfused"] = timed_forward(unet, inputs, args.n, args.device)
    peft.pipe.fuse_lora()
    res["peft_fused"] = timed_forward(unet, inputs, args.n, args.device)
    json.dump(res, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
