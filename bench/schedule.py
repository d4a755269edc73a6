"""Per-step cost of a step schedule: a kohya LoRA r32 with `0@0,1@1` (its strength changes at every step) against the
same LoRA at a fixed strength, on the full-size SD1.5 UNet (random weights, real config).

    python -m bench.schedule [--latent 64] [--steps 4] [--rounds 2] [--device cpu] [--quick]

Rows, each timed per sampling step (the step's host work + one UNet forward): `none` (no adapter), `fixed` (merged
once: nothing per step), `re-merge` (StepPlan + Patcher.reconcile: the scheduled layers recomputed from their
originals at every step where their strength changes) and `forward` (lib_adapters.forward: the scheduled layers
applied in the forward pass from their factors, the strength a number). The rows take turns step by step (setting
a row up is not timed), so a load that changes during the run touches every row alike. On the CPU the times are
this process's CPU time (one thread by default), which other processes on a shared machine do not inflate; on a GPU,
wall time. Results: bench/results/schedule.md (+ .json).
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
ROWS = ("none", "fixed", "re-merge", "forward")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps of the schedule")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "results" / "schedule"))
    args = ap.parse_args(argv)
    from lib_adapters.adapter import Adapter
    from lib_adapters.forward import ForwardEngine
    from lib_adapters.naming import LayerMap
    from lib_adapters.patching import ModuleStore, Patcher
    from lib_adapters.schedules import StepEntry, StepPlan, parse_strength

    from .adapters import lycoris_file
    from .memory import sync
    from .models import Components, build
    from .step import _inputs
    from .worker import quiet

    quiet()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.device != "cpu" else time.process_time
    components = build("sd1", args.quick, device=args.device)
    cache = ROOT / "cache" / ("schedule-quick" if args.quick else "schedule")
    cache.mkdir(parents=True, exist_ok=True)
    path = str(cache / "lora_r32.safetensors")
    if not os.path.exists(path):
        lycoris_file("lora", {k: v.cpu() for k, v in components.items()}, path, seed=7)
    adapter = Adapter.load(path)
    root = Components(components)
    layer_map = LayerMap.for_diffusers({k: m.state_dict() for k, m in components.items()})
    unet = components["unet"]
    x, t, ctx, kw = _inputs(unet, args.latent, args.device, torch.float32)
    n = args.steps
    fixed = StepPlan([StepEntry(adapter, 1.0, 1.0)], layer_map)
    scheduled = StepPlan([StepEntry(adapter, parse_strength(SCHEDULE), 1.0)], layer_map)
    keep = frozenset({0})
    patcher = Patcher(ModuleStore(root))
    engine = ForwardEngine(root)

    def setup(row: str) -> None:
        """Untimed: the model as the row starts a step (merged, originals, or originals with the forward path)."""
        engine.restore()
        if row == "fixed":
            patcher.reconcile(fixed.plan_at(0, n))
        elif row == "forward":
            patcher.reconcile({})
            engine.reconcile(scheduled.plan(scheduled.values(0, n), keep))
        else:
            patcher.reconcile({})

    def work(row: str, i: int) -> None:
        """Timed: the row's host work at step i (what the cfg_denoiser callback does)."""
        if row == "re-merge":
            patcher.reconcile(scheduled.plan_at(i, n))
        elif row == "forward":
            engine.reconcile(scheduled.plan(scheduled.values(i, n), keep))

    unet(x, t, ctx, **kw)  # warm-up
    res: dict = {"latent": args.latent, "steps": n, "rounds": args.rounds, "device": args.device,
                 "clock": "wall" if args.device != "cpu" else "process CPU",
                 "threads": torch.get_num_threads(), "adapter": os.path.basename(path), "schedule": SCHEDULE,
                 "touched_weights": len(fixed.plan_at(0, n)), "scheduled_weights": len(scheduled.scheduled_weights)}
    for row in ROWS:
        res[row], res[row + " work"] = [], []
    res["re-merge changing"] = []
    for _ in range(args.rounds):
        for i in range(n):
            for row in ROWS:
                setup(row)
                if row == "re-merge" and i:
                    patcher.reconcile(scheduled.plan_at(i - 1, n))  # as after the previous step
                if row == "forward" and i:
                    engine.reconcile(scheduled.plan(scheduled.values(i - 1, n), keep))
                sync(args.device)
                t0 = clock()
                work(row, i)
                sync(args.device)
                t1 = clock()
                unet(x, t, ctx, **kw)
                sync(args.device)
                res[row].append(clock() - t0)
                res[row + " work"].append(t1 - t0)
                if row == "re-merge" and i:
                    res["re-merge changing"].append(t1 - t0)
    engine.restore()
    patcher.restore()
    res["forward_bytes"] = forward_bytes(root, scheduled, keep, n)
    if args.device == "cpu":
        res["layers"] = layer_overhead(args.threads)
    write(res, args.out)
    return 0


def forward_bytes(root, scheduled, keep, n) -> int:
    from lib_adapters.forward import ForwardEngine

    engine = ForwardEngine(root)
    engine.reconcile(scheduled.plan(scheduled.values(0, n), keep))
    try:
        return engine.nbytes()
    finally:
        engine.restore()


def layer_overhead(threads: int) -> list[dict]:
    """Per layer (SD1.5 shapes, 2×1024 tokens, rank 32, one thread): the plain forward, the forward path's, and
    the least a forward-path LoRA costs (the two thin products and one add into the output)."""
    import torch.nn.functional as F
    from torch import nn

    from lib_adapters.algorithms.lora import LoRAPatch
    from lib_adapters.forward import ForwardEngine
    from lib_adapters.patching import Operation, Target

    def timed(fn, n=10):
        fn()
        t0 = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t0) / n

    rows = []
    g = torch.Generator().manual_seed(0)
    for kind, cin, cout in (("Linear", 320, 320), ("Linear", 320, 2560), ("Linear", 1280, 1280), ("Conv2d 1×1", 320, 320)):
        root = nn.Module()
        conv = kind.startswith("Conv")
        root.layer = nn.Conv2d(cin, cout, 1) if conv else nn.Linear(cin, cout)
        x = torch.randn(2, cin, 32, 32, generator=g) if conv else torch.randn(2, 1024, cin, generator=g)
        up, down = torch.randn(cout, 32, generator=g) * 0.01, torch.randn(32, cin, generator=g) * 0.01
        plain = timed(lambda: root.layer(x))

        def least():
            y = root.layer(x)
            if conv:
                y.add_(F.conv2d(F.conv2d(x, down[:, :, None, None]), up[:, :, None, None]), alpha=0.5)
            else:
                y.view(-1, cout).addmm_(x.reshape(-1, cin) @ down.T, up.T, alpha=0.5)
            return y

        ideal = timed(least)
        patch = LoRAPatch(up[:, :, None, None] if conv else up, down[:, :, None, None] if conv else down)
        engine = ForwardEngine(root)
        engine.reconcile({"layer.weight": [Operation(patch, 0.5, Target("layer.weight", "layer.bias"), "a|0|l")]})
        path = timed(lambda: root.layer(x))
        engine.restore()
        rows.append({"layer": f"{kind} {cin}→{cout}", "plain": plain, "forward path": path, "least": ideal})
    return rows


def write(res: dict, out: str) -> None:
    base = statistics.median(res["none"] + res["fixed"])
    remerge = statistics.median(res["re-merge changing"] or res["re-merge work"])
    lines = [f"# Step schedule cost (SD1.5 UNet, {res['latent'] * 8} px, {res['device']}, {res['threads']} threads)",
             "", f"kohya LoRA r32 ({res['touched_weights']} UNet+TE weights, {res['scheduled_weights']} scheduled), "
             f"schedule `{res['schedule']}` over {res['steps']} steps × {res['rounds']} rounds, rows taking turns; "
             f"median {res['clock']} seconds per step (host work + one UNet forward). Forward path factors: "
             f"{res['forward_bytes'] / 2**20:.1f} MiB.", "",
             "| row | step | host work | vs unscheduled |", "| --- | --- | --- | --- |"]
    for row in ROWS:
        med = statistics.median(res[row])
        lines.append(f"| {row} | {med:.3f} s | {statistics.median(res[row + ' work']):.4f} s | {med / base:.3f}× |")
    lines += ["", f"Unscheduled step (none and fixed): {base:.3f} s. Re-merge adds {remerge:.3f} s at each step where "
              f"the strength changes: {1 + remerge / base:.3f}× the unscheduled step (the steady figure: the UNet "
              f"forward itself varies by more than that between rows on a shared machine)."]
    if res.get("layers"):
        lines += ["", "Forward path per layer (2×1024 tokens, rank 32, one thread, ms): plain forward, the forward "
                  "path, and the least a forward-path LoRA costs (two thin products, one add into the output).", "",
                  "| layer | plain | forward path | least |", "| --- | --- | --- | --- |"]
        for r in res["layers"]:
            lines.append(f"| {r['layer']} | {r['plain'] * 1e3:.2f} | {r['forward path'] * 1e3:.2f} "
                         f"(+{(r['forward path'] / r['plain'] - 1) * 100:.0f} %) | {r['least'] * 1e3:.2f} "
                         f"(+{(r['least'] / r['plain'] - 1) * 100:.0f} %) |")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    Path(out + ".json").write_text(json.dumps(res, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
