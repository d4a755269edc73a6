"""One benchmark row in its own process: build the model, time every operation per case, track peak RSS.

Usage (run.py calls it): python -m bench.worker --row ours-module --files files.json --out row.json [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings

import torch

from . import memory
from .models import build, model_bytes

BASE_OPS = ("apply", "restore", "switch", "strength")
FULL_OPS = BASE_OPS + ("stack", "reselect")
ROWS_WITH_FULL_OPS = ("floor", "floor-gemm", "ours-checkpoint", "ours-module", "peft", "lycoris")
LOW_RANK = ("lora", "locon", "peft", "lora-fp16", "lora-bf16")
ROW_CASES = {  # rows that only make sense (or only finish in reasonable time) on some cases; others run them all
    "floor-gemm": LOW_RANK,
    "ours-checkpoint": ("lora", "locon", "lokr", "oft", "peft", "lora-fp16"),
    "peft": ("lora", "locon", "peft", "lora-fp16"),
    "peft-hotswap": ("lora", "peft"),
    "lycoris": ("lora", "locon", "lokr", "lokr-split", "lokr-tucker", "loha", "oft8", "oft", "oft64r", "boft", "ia3",
                "dora-out", "dora-in", "lora-fp16"),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def case_dtype(case: str) -> torch.dtype:
    """The model dtype a case runs on: `…-fp16` / `…-bf16`, float32 otherwise."""
    return DTYPES.get(case.rpartition("-")[2], torch.float32)


def case_kind(case: str) -> str:
    """The adapter files a case uses: its name without the dtype suffix."""
    return case.rpartition("-")[0] if case.rpartition("-")[2] in DTYPES else case


def quiet() -> None:
    warnings.filterwarnings("ignore")
    import logging

    for name in ("diffusers", "transformers", "peft", "LyCORIS", "lycoris"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except Exception:
        pass


def start(args) -> dict:
    """A worker process's common start: quiet libraries, no autograd, the thread count, the adapter file list."""
    quiet()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.files) as f:
        return json.load(f)


def arithmetic(patch) -> int:
    """FLOP per weight element a merge of `patch` cannot avoid: its products (2·r per rank-r product, 2·b per b×b
    rotation); element-wise steps count 0 (they ride on the memory traffic)."""
    kind = type(patch).__name__
    if kind == "DoRAPatch":
        return arithmetic(patch.inner)
    if kind in ("LoRAPatch", "GLoRAPatch"):
        return 2 * (patch.rank or 0)
    if kind == "LoHaPatch":
        return 4 * patch.rank
    if kind == "OFTPatch":
        return 2 * patch.block_size
    if kind == "BOFTPatch":
        return 2 * patch.block_size * int(patch.blocks.shape[0])
    return 0


def touched_weights(components, paths) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
    """Adapter path → {weight name (Components naming): bytes} that its plan writes, and → {name: FLOP} its merge
    needs (arithmetic × elements)."""
    from lib_adapters.adapter import Adapter
    from lib_adapters.naming import LayerMap, build_plan

    lm = LayerMap.for_diffusers({k: m.state_dict() for k, m in components.items()})
    tensors = {f"{c}.{k}": v for c, m in components.items() for k, v in m.state_dict().items()}
    out, flops = {}, {}
    for p in paths:
        plan, _ = build_plan([(Adapter.load(p), 1.0, 1.0)], lm)
        out[p] = {w: tensors[w].numel() * tensors[w].element_size() for w in plan}
        flops[p] = {w: float(sum(arithmetic(op.patch) for op in ops) * tensors[w].numel()) for w, ops in plan.items()}
    return out, flops


def make_row(name: str, components, device: str, touched):
    from . import rows

    if name in ("floor", "floor-gemm"):
        return rows.FloorRow(components, device, touched, gemm=name == "floor-gemm")
    if name.startswith("ours-"):
        return rows.OursRow(components, device, name[len("ours-"):])
    if name == "peft":
        return rows.PeftRow(components, device)
    if name == "peft-hotswap":
        return rows.PeftRow(components, device, hotswap=True)
    if name == "lycoris":
        return rows.LycorisRow(components, device)
    raise SystemExit(f"unknown row {name!r}")


class Recorder:
    """Times transitions and the peak resident memory above the case's starting point."""

    def __init__(self, row, device: str):
        self.row, self.device = row, device
        self.times: dict[str, list[float]] = {}
        self.phases: dict[str, list[dict]] = {}
        self.peaks: dict[str, int] = {}
        self.dev_peaks: dict[str, int] = {}
        self.base = 0

    def start(self):
        gc.collect()
        memory.trim()
        self.base = memory.rss()

    def timed(self, op: str, fn, *args):
        memory.reset_peak(self.device)
        t = time.perf_counter()
        phases = fn(*args)
        dt = time.perf_counter() - t
        self.times.setdefault(op, []).append(dt)
        self.phases.setdefault(op, []).append(phases)
        self.peaks[op] = max(self.peaks.get(op, 0), memory.peak() - self.base)
        dp = memory.device_peak(self.device)
        if dp is not None:
            self.dev_peaks[op] = max(self.dev_peaks.get(op, 0), dp)

    def summary(self) -> dict:
        out = {}
        for op, ts in self.times.items():
            phase_names = self.phases[op][0].keys() if self.phases[op] else ()
            out[op] = {
                "min": min(ts), "median": statistics.median(ts), "n": len(ts),
                "phases": {k: statistics.median(p[k] for p in self.phases[op]) for k in phase_names},
                "peak_extra": self.peaks[op], "device_peak": self.dev_peaks.get(op),
            }
        return out


def run_floor(row, rec: Recorder, a: str, b: str, touched, n: int, ops):
    ta, tb = set(touched[a]), set(touched[b])
    row.prepare(ta | tb)
    plan = {  # files read, weights written, adapters merged into them (for the gemm floor)
        "apply": ([a], ta, (a,)), "restore": ([], ta, ()), "switch": ([b], ta | tb, (b,)),
        "stack": ([b], ta | tb, (a, b)), "strength": ([], ta, (a,)), "reselect": ([], ta | tb, (b,)),
    }
    for op in ops:
        for _ in range(n):
            rec.timed(op, row.transition, *plan[op])
    if not row.gemm:  # the previous floor's copy into one reused buffer, for comparison (cache-resident writes)
        for _ in range(n):
            rec.timed("buffer", row.transition, [], ta, (), True)
    row.release()


def run_states(row, rec: Recorder, a: str, b: str, n: int, ops):
    s0, sa, sb, sab, sa6 = (), ((a, 1.0),), ((b, 1.0),), ((a, 1.0), (b, 1.0)), ((a, 0.6),)
    if "apply" in ops:
        for _ in range(n):
            rec.timed("apply", row.goto, sa)
            rec.timed("restore", row.goto, s0)
    row.goto(sa)
    if "switch" in ops:
        for i in range(n):
            rec.timed("switch", row.goto, sb if i % 2 == 0 else sa)
        row.goto(sa)
    if "stack" in ops:
        for _ in range(n):
            rec.timed("stack", row.goto, sab)
            row.goto(sa)
    if "strength" in ops:
        for i in range(n):
            rec.timed("strength", row.goto, sa6 if i % 2 == 0 else sa)
        row.goto(sa)
    if "reselect" in ops:
        row.goto(sb, True)
        row.goto(sa, True)
        for i in range(n):
            rec.timed("reselect", row.goto, (sb if i % 2 == 0 else sa), True)
    row.goto(s0)
    for p in (a, b):
        row.forget(p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--row", required=True)
    ap.add_argument("--files", required=True, help="JSON: case → [file A, file B]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--family", default="sd1")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--n-other", type=int, default=0, help="repetitions in the other cases (0: --n)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cases", default="lora,lokr,oft")
    ap.add_argument("--full-ops-cases", default="lora,lora-fp16",
                    help="cases timed on every operation; the others on apply, restore, switch and strength")
    args = ap.parse_args(argv)
    files = start(args)
    t0 = time.perf_counter()
    components = build(args.family, args.quick, device=args.device)
    build_s = time.perf_counter() - t0
    cases = [c for c in args.cases.split(",") if c in ROW_CASES.get(args.row, (c,))]
    all_files = sorted({p for c in cases for p in files[case_kind(c)]})
    touched, flops = touched_weights(components, all_files)
    result = {"row": args.row, "build_s": build_s, "cases": {}, "model_bytes": {}, "touched_bytes": {}}
    full_ops = set(args.full_ops_cases.split(","))
    result["model_bytes"]["float32"] = model_bytes(components)
    row = make_row(args.row, components, args.device, touched)
    dtype = torch.float32
    for case in sorted(cases, key=lambda c: str(case_dtype(c)) != "torch.float32"):  # float32 cases first
        if case_dtype(case) != dtype:
            dtype = case_dtype(case)
            row.cast(dtype)
            result["model_bytes"][str(dtype).split(".")[1]] = result["model_bytes"]["float32"] * dtype.itemsize // 4
        a, b = files[case_kind(case)]
        full = case in full_ops and args.row in ROWS_WITH_FULL_OPS
        ops = ("switch",) if args.row == "peft-hotswap" else FULL_OPS if full else BASE_OPS
        n = args.n if full or not args.n_other else args.n_other
        rec = Recorder(row, args.device)
        rec.start()
        try:
            if args.row.startswith("floor"):
                run_floor(row, rec, a, b, touched, n, ops)
            else:
                run_states(row, rec, a, b, n, ops)
            result["cases"][case] = {"ops": rec.summary(), "inexact": list(getattr(row, "inexact", ()))}
        except Exception as e:  # a peer that cannot load this kind: reported, not fatal
            result["cases"][case] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            try:
                row.goto(())
            except Exception:
                pass
        result["touched_bytes"][case] = {
            "A": sum(touched[a].values()) * dtype.itemsize // 4,
            "AB": sum((touched[a] | touched[b]).values()) * dtype.itemsize // 4,
        }
        result.setdefault("flops", {})[case] = {"A": sum(flops[a].values()), "B": sum(flops[b].values())}
        result["files"] = {p: os.path.getsize(p) for p in all_files}
    json.dump(result, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
