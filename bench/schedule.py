"""Per-step cost of a step schedule: a kohya LoRA r32 with `0@0,1@1` (its strength changes at every step) against the
same LoRA at a fixed strength, on the full-size SD1.5 UNet (random weights, real config).

    python -m bench.schedule [--latent 64] [--steps 6] [--device cpu] [--quick]

Rows, each timed per sampling step (host work of the step + one UNet forward): `none` (no adapter), `fixed` (merged
once, nothing per step), `re-merge` (StepPlan + Patcher.reconcile: the scheduled layers recomputed from their
originals whenever their strength changes) and, when the forward-path engine exists, `forward` (scheduled layers
applied in the forward pass, the strength a number). Results: bench/results/schedule.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SCHEDULE = "0@0,1@1"


def _timed_steps(unet, inputs, steps: int, device: str, before_step=None) -> tuple[list[float], list[float]]:
    """(whole step seconds, host-work seconds) for `steps` steps; `before_step(i)` is the per-step host work."""
    from .memory import sync
    from .step import timed_forward

    whole, work = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        if before_step is not None:
            before_step(i)
            sync(device)
        t1 = time.perf_counter()
        timed_forward(unet, inputs, 1, device)
        whole.append(time.perf_counter() - t0)
        work.append(t1 - t0)
    return whole, work


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results" / "schedule"))
    args = ap.parse_args(argv)
    from lib_adapters.adapter import Adapter
    from lib_adapters.naming import LayerMap
    from lib_adapters.patching import ModuleStore, Patcher
    from lib_adapters.schedules import StepEntry, StepPlan, parse_strength

    from .adapters import lycoris_file
    from .models import Components, build
    from .step import _inputs
    from .worker import quiet

    quiet()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    components = build("sd1", args.quick, device=args.device)
    cache = ROOT / "cache" / ("schedule-quick" if args.quick else "schedule")
    cache.mkdir(parents=True, exist_ok=True)
    path = str(cache / "lora_r32.safetensors")
    if not os.path.exists(path):
        lycoris_file("lora", {k: v.cpu() for k, v in components.items()}, path, seed=7)
    adapter = Adapter.load(path)
    root = Components(components)
    store = ModuleStore(root)
    layer_map = LayerMap.for_diffusers({k: m.state_dict() for k, m in components.items()})
    unet = components["unet"]
    inputs = _inputs(unet, args.latent, args.device, torch.float32)
    n = args.steps
    res: dict = {"latent": args.latent, "steps": n, "device": args.device, "threads": torch.get_num_threads(),
                 "adapter": os.path.basename(path), "schedule": SCHEDULE}

    _timed_steps(unet, inputs, 1, args.device)  # warm-up
    res["none"] = _timed_steps(unet, inputs, n, args.device)[0]

    fixed = StepPlan([StepEntry(adapter, 1.0, 1.0)], layer_map)
    patcher = Patcher(store)
    patcher.reconcile(fixed.plan_at(0, n))
    res["fixed"] = _timed_steps(unet, inputs, n, args.device)[0]
    patcher.restore()
    res["touched_weights"] = len(fixed.plan_at(0, n))

    scheduled = StepPlan([StepEntry(adapter, parse_strength(SCHEDULE), 1.0)], layer_map)
    patcher = Patcher(store)
    res["re-merge"], res["re-merge work"] = _timed_steps(
        unet, inputs, n, args.device, lambda i: patcher.reconcile(scheduled.plan_at(i, n)))
    patcher.restore()

    try:
        from lib_adapters import forward  # noqa: F401  (the forward-path engine, when it exists)
    except ImportError:
        res["forward"] = None
    else:
        res["forward"], res["forward work"] = forward_row(forward, unet, inputs, n, args.device, store, scheduled)

    fixed_again = Patcher(store)
    fixed_again.reconcile(fixed.plan_at(0, n))
    res["fixed (again)"] = _timed_steps(unet, inputs, n, args.device)[0]
    fixed_again.restore()
    write(res, args.out)
    return 0


def forward_row(forward, unet, inputs, n, device, store, scheduled):
    """The scheduled layers in the forward pass (lib_adapters.forward), strengths set per step."""
    engine = forward.ForwardAdapters(store)
    engine.apply(scheduled.plan_at(0, n))
    try:
        return _timed_steps(unet, inputs, n, device, lambda i: engine.apply(scheduled.plan_at(i, n)))
    finally:
        engine.remove()


def write(res: dict, out: str) -> None:
    base = statistics.median(res["fixed"] + res["fixed (again)"])
    lines = [f"# Step schedule cost (SD1.5 UNet, {res['latent'] * 8} px, {res['device']}, {res['threads']} threads)",
             "", f"kohya LoRA r32 ({res['touched_weights']} UNet+TE weights), schedule `{res['schedule']}` over "
             f"{res['steps']} steps; median seconds per step (host work + one UNet forward).", "",
             "| row | step | host work | vs fixed |", "| --- | --- | --- | --- |"]
    for row in ("none", "fixed", "re-merge", "forward", "fixed (again)"):
        times = res.get(row)
        if not times:
            continue
        work = res.get(f"{row} work")
        med = statistics.median(times)
        lines.append(f"| {row} | {med:.3f} s | {statistics.median(work):.3f} s | {med / base:.3f}× |" if work else
                     f"| {row} | {med:.3f} s | – | {med / base:.3f}× |")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    Path(out + ".json").write_text(json.dumps(res, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
