"""Peak memory of `python -m lib_adapters merge` on a full-size random-weight checkpoint (issue: ≤ about one copy).

    python -m bench.merge_memory [--family sdxl|sd1]

Builds a seeded fp16 single-file checkpoint in ldm/sgm names (SDXL: 6.9 GB) and a kohya LoRA r32 on every
attention q/k/v under bench/cache/, runs the merge command in a child process and prints its peak RSS against the
checkpoint's size.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

import torch

from lib_adapters.files import save_tensors
from lib_adapters.models.build import build
from lib_adapters.models.convert import to_checkpoint

ATTENTION = re.compile(r"model\.diffusion_model\.(.*attn[12]\.to_[qkv])\.weight$")
BASE_VERSION = {"sdxl": "sdxl_base_v1-0", "sd1": "sd_v1"}


def make_files(family: str, folder: str) -> tuple[str, str]:
    """(checkpoint path, lora folder), built once."""
    ckpt, loras = os.path.join(folder, f"{family}-fp16.safetensors"), os.path.join(folder, "loras")
    if os.path.exists(ckpt):
        return ckpt, loras
    g = torch.Generator().manual_seed(0)
    shapes = to_checkpoint(build(family, "full", device="meta"))
    tensors = {k: torch.randn(t.shape, generator=g).mul_(0.02).half() if t.is_floating_point()
               else torch.zeros(t.shape, dtype=t.dtype) for k, t in shapes.items()}
    lora = {}
    for k, w in tensors.items():
        m = ATTENTION.match(k)
        if m:
            key = "lora_unet_" + m.group(1).replace(".", "_")
            lora[f"{key}.lora_down.weight"] = (torch.randn(32, w.shape[1], generator=g) * 0.01).half()
            lora[f"{key}.lora_up.weight"] = (torch.randn(w.shape[0], 32, generator=g) * 0.01).half()
            lora[f"{key}.alpha"] = torch.tensor(16.0)
    os.makedirs(loras, exist_ok=True)
    save_tensors(os.path.join(loras, "attn_lora.safetensors"), lora, {"ss_base_model_version": BASE_VERSION[family]})
    save_tensors(ckpt, tensors)
    return ckpt, loras


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", default="sdxl", choices=sorted(BASE_VERSION))
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = os.path.join(os.path.dirname(__file__), "cache", "merge")
    os.makedirs(folder, exist_ok=True)
    if args.make_only:
        make_files(args.family, folder)
        return 0
    # build in another process: a child forked from a process that held the model would inherit its RSS peak
    subprocess.run([sys.executable, "-m", "bench.merge_memory", "--family", args.family, "--make-only"], check=True)
    ckpt, loras = make_files(args.family, folder)  # already there: only the paths
    out = os.path.join(folder, "merged.safetensors")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "lib_adapters", "merge", "--checkpoint", ckpt, "--lora-dir",
                              loras, "--out", out, "a photo <lora:attn_lora:0.8:1>"])
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the builder's
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"merge failed with exit code {child.returncode}")
    seconds = time.perf_counter() - start
    peak = usage.ru_maxrss * 1024
    size = os.path.getsize(ckpt)
    print(f"{args.family} fp16 checkpoint {size / 1e9:.2f} GB: merge peak RSS {peak / 1e9:.2f} GB "
          f"= {peak / size:.2f}× the checkpoint, {seconds:.1f} s")
    os.remove(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
