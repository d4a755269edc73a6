"""Quantized models: the forward path against Forge's offline way, at Flux width (3072 / 12288), per storage type.

    python -m bench.quantized [--blocks N] [--tokens T] [--rank 16] [--quick]

Builds N Flux double blocks (BFL names and shapes: img/txt qkv 3072→9216, proj 3072→3072, mlp 3072→12288→3072,
mod 3072→18432) whose Linears store fp8 e4m3fn, GGUF Q8_0 or GGUF Q4_K and dequantize per forward to the compute
dtype, as Forge's layer classes do (the GGUF decoders here are written from the format and checked against the
`gguf` package's reference each run). Per storage, one child process each, it measures:

* switch A→B (two rank-r LoRAs on every Linear) with the forward path, against the adapter's own size (a copy of
  its factors: the floor) and against Forge's offline way on the same layers (dequantize → float32 merge →
  re-quantize, keeping a backup of the originals; Q4_K: Forge has no re-quantizer and raises);
* per-step cost: a forward of the blocks on T tokens, without adapters and with the rank-r LoRA attached;
* memory: factors held (bytes), peak RSS over the model for the switch and for Forge's offline merge.

Results: bench/results/quantized.md (+ .json). Timings on one thread; the lead re-runs final figures quietly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

RESULTS = os.path.join(os.path.dirname(__file__), "results")
DOUBLE_BLOCK = (("img_attn.qkv", 3, 1), ("img_attn.proj", 1, 1), ("img_mlp.0", 4, 1), ("img_mlp.2", 1, 4),
                ("img_mod.lin", 6, 1), ("txt_attn.qkv", 3, 1), ("txt_attn.proj", 1, 1), ("txt_mlp.0", 4, 1),
                ("txt_mlp.2", 1, 4), ("txt_mod.lin", 6, 1))  # (name, out ×H, in ×H)
STORAGES = ("fp8", "gguf Q8_0", "gguf Q4_K")


# ---- GGUF blocks in torch (from the format: Q8_0 = fp16 d + 32 int8; Q4_K = fp16 d, dmin, 12 bytes of 6-bit
# scales/mins for 8 sub-blocks, 128 bytes of 4-bit values, 256 values per block) ----------------------------------

def q8_0_encode(w: torch.Tensor) -> torch.Tensor:
    blocks = w.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(d > 0, blocks / d, torch.zeros_like(blocks)).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([d.half().view(torch.uint8).reshape(-1, 2), q.view(torch.uint8)], dim=1)


def q8_0_decode(raw: torch.Tensor, dtype) -> torch.Tensor:
    return raw[:, :2].contiguous().view(torch.float16).to(dtype) * raw[:, 2:].view(torch.int8).to(dtype)


def q4_k_random(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    raw = torch.randint(0, 256, (rows * cols // 256, 144), generator=g, dtype=torch.uint8)
    scales = (torch.rand(raw.shape[0], 2, generator=g) * 0.002 + 0.0005).half()
    raw[:, :4] = scales.view(torch.uint8).reshape(-1, 4)
    return raw


def q4_k_decode(raw: torch.Tensor, dtype) -> torch.Tensor:
    d = raw[:, 0:2].contiguous().view(torch.float16).to(dtype)
    dmin = raw[:, 2:4].contiguous().view(torch.float16).to(dtype)
    s = raw[:, 4:16].to(torch.int32)
    low = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], dim=1)   # 8 scales
    mins = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)  # 8 mins
    qs = raw[:, 16:].reshape(-1, 4, 32)
    q = torch.stack([qs & 15, qs >> 4], dim=2).reshape(-1, 8, 32).to(dtype)  # sub-block 2c: low, 2c+1: high
    return (d[:, :, None] * low[:, :, None].to(dtype) * q - dmin[:, :, None] * mins[:, :, None].to(dtype)).reshape(-1, 256)


def check_decoders() -> None:
    """Our torch decoders equal the gguf package's reference on random blocks."""
    from gguf import GGMLQuantizationType as Q, quants

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 256, generator=g)
    raw = q8_0_encode(w)
    ref = quants.dequantize(raw.reshape(4, -1).numpy(), Q.Q8_0)
    assert np.allclose(q8_0_decode(raw, torch.float32).reshape(4, 256).numpy(), ref, atol=1e-6)
    raw = q4_k_random(4, 256, g)
    ref = quants.dequantize(raw.reshape(4, -1).numpy(), Q.Q4_K)
    assert np.allclose(q4_k_decode(raw, torch.float32).reshape(4, 256).numpy(), ref, atol=1e-5)


class QuantLinear(nn.Module):
    """A Linear storing fp8 or GGUF blocks, dequantized per forward to the input's dtype (Forge's manual cast)."""

    def __init__(self, out_features: int, in_features: int, storage: str, g: torch.Generator):
        super().__init__()
        self.shape, self.storage = (out_features, in_features), storage
        if storage == "fp8":
            data = (torch.randn(out_features, in_features, generator=g) * 0.02).to(torch.float8_e4m3fn)
        elif storage == "gguf Q8_0":
            data = q8_0_encode(torch.randn(out_features, in_features, generator=g) * 0.02)
        else:
            data = q4_k_random(out_features, in_features, g)
        self.weight = nn.Parameter(data, requires_grad=False)
        self.weight.gguf_cls = None if storage == "fp8" else GGUFType(storage)
        self.weight.real_shape = torch.Size(self.shape)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)

    def dequantize(self, dtype) -> torch.Tensor:
        if self.storage == "fp8":
            return self.weight.to(dtype)
        return self.weight.gguf_cls.dequantize_pytorch(self.weight).to(dtype)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.dequantize(x.dtype), self.bias.to(x.dtype))


class GGUFType:
    """`gguf_cls` as Forge's parameters carry it (qtype, dequantize_pytorch on the baked blocks)."""

    def __init__(self, storage: str):
        self.__name__ = storage.split()[1]
        self.decode = q8_0_decode if storage == "gguf Q8_0" else q4_k_decode

    def dequantize_pytorch(self, x):
        return self.decode(x.data, torch.float32).reshape(x.real_shape)


def build(storage: str, blocks: int, width: int) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    root = nn.Module()
    root.double_blocks = nn.ModuleList()
    for _ in range(blocks):
        block = nn.Module()
        for name, out_mult, in_mult in DOUBLE_BLOCK:
            parent, leaf = name.rsplit(".", 1)
            if not hasattr(block, parent):
                block.add_module(parent, nn.Module())
            getattr(block, parent).add_module(leaf, QuantLinear(out_mult * width, in_mult * width, storage, g))
        root.double_blocks.append(block)
    return root


def lora_plan(root: nn.Module, rank: int, seed: int, strength: float = 1.0):
    from lib_adapters.algorithms.lora import LoRAPatch
    from lib_adapters.patching import Operation, Target

    g = torch.Generator().manual_seed(seed)
    plan = {}
    for name, module in root.named_modules():
        if isinstance(module, QuantLinear):
            o, i = module.shape
            patch = LoRAPatch((torch.randn(o, rank, generator=g) * 0.01).half(),
                              (torch.randn(rank, i, generator=g) * 0.01).half(), alpha_value=float(rank))
            plan[name + ".weight"] = [Operation(patch, strength, Target(name + ".weight"), f"lora{seed}|0|{name}")]
    return plan


def rss_mib(field: str = "VmHWM") -> float:
    """Peak (VmHWM, since the last reset_peak) or current (VmRSS) resident memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def forge_offline(root: nn.Module, plan) -> tuple[float, str]:
    """Forge's baked path on the same layers: backup, dequantize, float32 merge, re-quantize in place."""
    from lib_adapters.patching import compute

    t0 = time.perf_counter()
    backups = {}
    for name, ops in plan.items():
        layer = root.get_submodule(name.rsplit(".", 1)[0])
        backups[name] = layer.weight.data
        merged, _ = compute(ops, layer.dequantize(torch.float32), None)
        if layer.storage == "fp8":
            layer.weight.data = merged.to(torch.float8_e4m3fn)
        elif layer.storage == "gguf Q8_0":
            layer.weight.data = q8_0_encode(merged)
        else:
            return time.perf_counter() - t0, "raises NotImplementedError (no Q4_K re-quantizer in Forge)"
    seconds = time.perf_counter() - t0
    for name, data in backups.items():
        root.get_submodule(name.rsplit(".", 1)[0]).weight.data = data
    return seconds, ""


def case(storage: str, blocks: int, width: int, tokens: int, rank: int) -> dict:
    from lib_adapters.forward import ForwardEngine

    torch.set_num_threads(1)
    root = build(storage, blocks, width)
    model_bytes = sum(m.weight.numel() * m.weight.element_size() for m in root.modules() if isinstance(m, QuantLinear))
    plan_a, plan_b = lora_plan(root, rank, 1), lora_plan(root, rank, 2)
    factors = sum(t.numel() * t.element_size() for ops in plan_b.values() for t in ops[0].patch.tensors())
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(3))
    out = {"storage": storage, "blocks": blocks, "tokens": tokens, "rank": rank, "model_mb": model_bytes / 2**20,
           "adapter_mb": factors / 2**20}

    wide = x.repeat(1, 4)

    def step():
        """One forward of the first block's Linears (the per-step ratio does not depend on the block count)."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            for name, _, in_mult in DOUBLE_BLOCK:
                root.double_blocks[0].get_submodule(name)(x if in_mult == 1 else wide)
        return time.perf_counter() - t0

    engine = ForwardEngine(root)
    step()
    plain, adapted = [], []
    for _ in range(3):  # alternate, so drift in machine load hits both sides alike
        plain.append(step())
        engine.reconcile(plan_a)
        adapted.append(step())
        engine.restore()
    out["step_plain_s"], out["step_adapted_s"] = min(plain), min(adapted)
    before = rss_mib("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    engine.reconcile(plan_a)
    out["apply_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.reconcile(plan_b)
    out["switch_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.reconcile({k: [type(v[0])(v[0].patch, 0.5, v[0].target, v[0].source)] for k, v in plan_b.items()})
    out["strength_s"] = time.perf_counter() - t0
    out["switch_peak_mb"] = max(0.0, rss_mib() - before)
    out["held_mb"] = engine.nbytes() / 2**20
    engine.restore()
    t0 = time.perf_counter()
    copies = [t.clone() for ops in plan_b.values() for t in ops[0].patch.tensors()]
    out["floor_s"] = time.perf_counter() - t0
    del copies
    before = rss_mib("VmRSS")
    reset_peak()
    out["forge_offline_s"], out["forge_offline_note"] = forge_offline(root, plan_b)
    out["forge_offline_peak_mb"] = max(0.0, rss_mib() - before)
    return out


def sd15_memory(mode: str) -> dict:
    """Issue #12 item 6 in-process: an SD1.5-size UNet (diffusers config, every Linear/Conv2d fp8 e4m3fn) with a
    rank-4 LoRA on its 160 attention/feed-forward Linears, applied three times with changing strengths. "baked":
    what Forge's LoraLoader does on fp8 (keep the original as backup, float32 working copy, our merge math, cast back
    to fp8); "forward": the forward path. Peak RSS over the model (VmHWM)."""
    from diffusers import UNet2DConditionModel

    from lib_adapters.algorithms.lora import LoRAPatch
    from lib_adapters.forward import ForwardEngine
    from lib_adapters.patching import Operation, Target, compute

    torch.set_num_threads(1)
    with torch.device("meta"):
        ref = UNet2DConditionModel(cross_attention_dim=768)
    g = torch.Generator().manual_seed(0)
    root, targets = nn.Module(), []
    for name, mod in ref.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            new = QuantLinear(mod.weight.shape[0], mod.weight[0].numel(), "fp8", g)
            parent = root
            for part in name.split(".")[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(name.rsplit(".", 1)[-1], new)
            if isinstance(mod, nn.Linear) and "attentions" in name and ("attn" in name or "ff" in name):
                targets.append(name)
    del ref
    model_mb = rss_mib("VmRSS")
    reset_peak()
    engine, backups = ForwardEngine(root), {}
    t0 = time.perf_counter()
    for i in range(3):
        plan = {}
        for t in targets:
            o, n_in = root.get_submodule(t).shape
            patch = LoRAPatch(torch.randn(o, 4, generator=g), torch.randn(4, n_in, generator=g), alpha_value=4.0)
            plan[t + ".weight"] = [Operation(patch, 1.0 - 0.1 * i, Target(t + ".weight"), f"{i}|0|{t}")]
        if mode == "forward":
            engine.reconcile(plan)
            continue
        for name, ops in plan.items():
            layer = root.get_submodule(name.rsplit(".", 1)[0])
            original = backups.setdefault(name, layer.weight.data)
            merged, _ = compute(ops, original.to(torch.float32), None)
            layer.weight.data = merged.to(torch.float8_e4m3fn)
    seconds = (time.perf_counter() - t0) / 3
    return {"mode": mode, "model_mib": model_mb, "peak_over_model_mib": rss_mib() - model_mb,
            "layers": len(targets), "params_m": sum(m.weight.numel() for m in root.modules()
                                                     if isinstance(m, QuantLinear)) / 1e6, "seconds": seconds}


def table(rows: list[dict]) -> str:
    lines = ["| storage | blocks (model) | LoRA r (size) | switch A→B | strength only | floor (copy factors) | "
             "Forge offline (deq→merge→req) | step plain (1 block) | step + LoRA | overhead | factors held | switch peak RSS |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        forge = f"{r['forge_offline_s']:.3f} s" + (f" ({r['forge_offline_note']})" if r["forge_offline_note"] else
                                                  f" = {r['forge_offline_s'] / r['switch_s']:.0f}× ours")
        lines.append(
            f"| {r['storage']} | {r['blocks']} ({r['model_mb']:.0f} MB) | {r['rank']} ({r['adapter_mb']:.1f} MB) | "
            f"{r['switch_s']:.3f} s | {r['strength_s'] * 1e3:.1f} ms | {r['floor_s']:.3f} s | {forge} | "
            f"{r['step_plain_s']:.3f} s | {r['step_adapted_s']:.3f} s | "
            f"{(r['step_adapted_s'] / r['step_plain_s'] - 1) * 100:+.1f} % | {r['held_mb']:.1f} MB | "
            f"{r['switch_peak_mb']:.0f} MB |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--quick", action="store_true", help="width 256, 1 block, 32 tokens")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--sd15-memory", action="store_true", help="SD1.5-size fp8 UNet: peak RSS baked vs forward path")
    ap.add_argument("--sd15-mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sd15_mode:
        print(json.dumps(sd15_memory(args.sd15_mode)))
        return
    if args.sd15_memory:
        for mode in ("baked", "forward"):
            done = subprocess.run([sys.executable, "-m", "bench.quantized", "--sd15-mode", mode], capture_output=True,
                                  text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"SD1.5 fp8 UNet ({r['params_m']:.0f}M params, {r['layers']} LoRA layers), {mode}: "
                  f"{r['seconds']:.2f} s per switch, peak {r['peak_over_model_mib']:.0f} MiB over the model "
                  f"({r['model_mib']:.0f} MiB)", flush=True)
        return
    if args.quick:
        args.width, args.blocks, args.tokens = 256, 1, 32
    if args.case:
        print(json.dumps(case(args.case, args.blocks, args.width, args.tokens, args.rank)))
        return
    check_decoders()
    rows = []
    for storage in STORAGES:
        cmd = [sys.executable, "-m", "bench.quantized", "--case", storage, "--blocks", str(args.blocks),
               "--tokens", str(args.tokens), "--rank", str(args.rank), "--width", str(args.width)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = (f"Flux width {args.width}, {args.blocks} double blocks, {args.tokens} tokens, rank-{args.rank} LoRA on "
            f"every Linear, CPU, 1 thread, float32 compute ({time.strftime('%Y-%m-%d')}).\n\n" + table(rows) + "\n")
    print(text)
    if not args.quick:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "quantized.md"), "w") as f:
            f.write("# bench.quantized\n\n" + text)
        with open(os.path.join(RESULTS, "quantized.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
