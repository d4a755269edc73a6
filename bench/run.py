"""Adapter switching benchmark: ours vs the physical floor vs diffusers+PEFT and LyCORIS, in one run, as ratios.

    python -m bench.run            # full-size SD1.5 (UNet 860M + CLIP-L), ~10 min on 2 cores
    python -m bench.run --quick    # same topology, tiny widths (development)
    python -m bench.run --family sdxl --cases lora   # optional SDXL (UNet 2.6B + both encoders)

Each row runs in its own process (fresh model, clean peak-RSS accounting); results go to bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROWS = ("floor", "floor-gemm", "ours-checkpoint", "ours-module", "peft", "peft-hotswap", "lycoris")


def sub(module: str, args: list[str], log) -> float:
    """Run `python -m bench.<module> args`, output to the log; returns seconds; raises on failure."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # big temporaries go back to the OS when freed
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT, env=env,
                       stdout=log, stderr=subprocess.STDOUT)
    if p.returncode:
        raise RuntimeError(f"bench.{module} {' '.join(args)} failed (exit {p.returncode}); see the log")
    return time.perf_counter() - t


def machine(device: str, threads: int) -> str:
    """One line on the machine and its load; `threads` is the main tables' count (0: torch's default)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") and torch.cuda.is_available() else ""
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GB{gpu}; torch {torch.__version__}, "
            f"{threads or torch.get_num_threads()} torch thread(s) per worker; load average at start {load:.1f}")


CASES = ("lora,locon,lokr,lokr-split,lokr-tucker,loha,oft8,oft,oft64r,boft,ia3,dora-out,dora-in,peft,"
         "lora-fp16,lokr-fp16,oft-fp16,lora-bf16")
PEER_CASES = "lora,lokr,lokr-split,lokr-tucker,loha,oft8,oft,oft64r,boft,ia3,dora-out,dora-in,peft,lora-fp16"
GPU_CASES = "lora-fp16,lokr-fp16,oft-fp16"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny widths, same topology")
    ap.add_argument("--family", default=None, choices=("sd1", "sdxl"), help="default sd1 (sdxl with --device cuda)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the GPU rows (SDXL fp16 LoRA/LoKr/OFT)")
    ap.add_argument("--n", type=int, default=3, help="repetitions per operation (min and median reported)")
    ap.add_argument("--n-other", type=int, default=2, help="repetitions in the cases outside --full-ops-cases")
    ap.add_argument("--peer-n", type=int, default=2, help="repetitions for the reference libraries")
    ap.add_argument("--peer-cases", default=PEER_CASES,
                    help="cases run for the reference libraries (LoCon through PEFT/LyCORIS takes minutes)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--cases", default=None, help=f"default {CASES} (cuda: {GPU_CASES})")
    ap.add_argument("--full-ops-cases", default="lora,lora-fp16",
                    help="cases timed on every operation (the others: apply, restore, switch, strength)")
    ap.add_argument("--peer-full-ops-cases", default="lora", help="the same for the reference libraries (slow)")
    ap.add_argument("--threads", default="1,0",
                    help="torch threads per worker, comma-separated runs (0: torch's default, all cores); the first "
                         "gives the main tables. 1 first: on 2 shared cores the OpenMP wake-up of a second thread "
                         "costs ~0.4 ms per small op, which swamps copies and merges")
    ap.add_argument("--threads-rows", default="floor,floor-gemm,ours-module",
                    help="rows re-run for the other thread counts")
    ap.add_argument("--latent", type=int, default=32, help="latent side for the per-step forward")
    ap.add_argument("--listing", type=int, default=2000, help="files in the listing test (0: skip)")
    ap.add_argument("--no-step", action="store_true")
    ap.add_argument("--cache", default=None, help="folder for generated files (default bench/cache/<size>)")
    ap.add_argument("--out", default=None, help="default bench/results/latest.md (cuda: latest-cuda.md)")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.family = args.family or ("sdxl" if gpu else "sd1")
    args.cases = args.cases or (GPU_CASES if gpu else CASES)
    args.out = args.out or str(HERE / "results" / ("latest-cuda.md" if gpu else "latest.md"))
    if gpu:
        args.listing, args.no_step = 0, True
    thread_runs = [int(t) for t in args.threads.split(",")]
    args.threads = thread_runs[0]
    size = f"{args.family}-{'quick' if args.quick else 'full'}"
    cache = Path(args.cache or HERE / "cache" / size)
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / "run"
    work.mkdir(exist_ok=True)
    log_path = work / "log.txt"
    common = ["--family", args.family, "--device", args.device] + (["--quick"] if args.quick else [])
    started = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = machine(args.device, args.threads)
    if gpu and not torch.cuda.is_available():
        md = not_measured(args, stamp, header)
        print(md)
        write(args.out, md, {"device": args.device, "measured": False})
        return 0
    timings = {}
    by_threads: dict[int, dict] = {}
    with open(log_path, "w") as log:
        timings["prepare"] = sub("prepare", ["--cache", str(cache), "--listing", str(args.listing)] + common[:2]
                                 + (["--quick"] if args.quick else []), log)
        files = str(cache / "files.json")
        for t in thread_runs:
            rows = args.rows.split(",") if t == args.threads else [r for r in args.threads_rows.split(",")
                                                                    if r in args.rows.split(",")]
            results = by_threads.setdefault(t, {})
            for row in rows:
                out = work / f"{row}-t{t}.json"
                print(f"[bench] {row} ({t or 'all'} thread(s)) …", file=sys.stderr, flush=True)
                try:
                    peer = row.startswith(("peft", "lycoris"))
                    cases = ",".join(c for c in args.cases.split(",") if not peer or c in args.peer_cases.split(","))
                    key = row if t == args.threads else f"{row} t{t}"
                    timings[key] = sub("worker", ["--row", row, "--files", files, "--out", str(out),
                                                  "--n", str(args.peer_n if peer else args.n),
                                                  "--n-other", str(args.peer_n if peer else args.n_other),
                                                  "--cases", cases, "--full-ops-cases",
                                                  args.peer_full_ops_cases if peer else args.full_ops_cases,
                                                  "--threads", str(t)] + common, log)
                    results[row] = json.load(open(out))
                except RuntimeError as e:  # one row failing (e.g. out of memory) leaves the others standing
                    print(f"[bench] {e}", file=sys.stderr, flush=True)
                    results[row] = {"cases": {c: {"error": str(e)} for c in args.cases.split(",")}}
        step = None
        if not args.no_step:
            print("[bench] per-step …", file=sys.stderr, flush=True)
            timings["step"] = sub("step", ["--files", files, "--out", str(work / "step.json"), "--n", str(args.n),
                                           "--latent", str(args.latent), "--threads", str(args.threads)] + common, log)
            step = json.load(open(work / "step.json"))
        listing = None
        if args.listing:
            print("[bench] listing …", file=sys.stderr, flush=True)
            env_args = [str(cache / "listing"), str(work / "listing.json")]
            timings["listing"] = sub("listing", env_args, log)
            listing = json.load(open(work / "listing.json"))
    total = time.perf_counter() - started
    md = render(args, stamp, header, by_threads, step, listing, timings, total, cache)
    print(md)
    write(args.out, md, {"results": by_threads[args.threads], "by_threads": by_threads, "step": step,
                         "listing": listing, "timings": timings})
    return 0


def write(out: str, md: str, data: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(md)
    os.replace(tmp, out)
    json.dump(data, open(Path(out).with_suffix(".json"), "w"), indent=1)


def not_measured(args, stamp, header) -> str:
    """The report when --device names a GPU this machine does not have: every GPU row stays unmeasured."""
    return "\n".join([
        f"# Adapter switching benchmark — {args.family} on {args.device}", "",
        f"{stamp} · {header}", "",
        f"**Not measured**: torch sees no CUDA device here (torch {torch.__version__}, "
        f"cuda available: {torch.cuda.is_available()}). The GPU rows (switch and strength only for {args.cases} on "
        f"{args.family}, against the device-memory floor and PEFT/LyCORIS on the same device) run with "
        f"`python -m bench.run --device cuda` where one is present.", ""])


def render(args, stamp, header, by_threads, step, listing, timings, total, cache) -> str:
    results = by_threads[args.threads]
    some = next((r for r in results.values() if "model_bytes" in r), {"model_bytes": {"float32": 1}})
    model_mb = some["model_bytes"]["float32"] / 2**20
    sizes = {Path(p).name: s for r in results.values() for p, s in r.get("files", {}).items()}
    threads = ",".join(str(t) for t in by_threads)
    lines = [
        f"# Adapter switching benchmark — {args.family} {'quick (tiny widths)' if args.quick else 'full size'}",
        "",
        f"{stamp} · {header} · device {args.device}",
        f"Model: {model_mb:.0f} MB fp32 (UNet + text encoder(s), random weights from the real configs). "
        f"n = {args.n} per operation in the fully timed cases, {args.n_other} elsewhere, {args.peer_n} for the peers; "
        f"cells are **min/median seconds · ratio of mins to the floor (×F)**; "
        f"† = not bit-exact (the peer subtracts the delta again; LyCORIS has no unmerge, so removal is merge_to(-s)). "
        f"Peak RSS over model = highest resident memory during the case minus the memory before it (includes kept "
        f"backups), compared with the touched weights' size in the model's dtype.",
        "",
        "Command: `python -m bench.run" + (" --quick" if args.quick else "") +
        (f" --family {args.family}" if args.family != "sd1" else "") + (f" --threads {threads}" if threads != "1,0" else "") + "`",
        "",
    ]
    from .worker import case_dtype, case_kind

    for case in args.cases.split(","):
        t = report.touched(results, case, "apply")
        a = f"{case_kind(case)}_A.safetensors"
        if t is None:
            continue
        share = t / (some["model_bytes"]["float32"] * case_dtype(case).itemsize / 4)
        lines += [f"## {report.CASE_TITLES.get(case, case)}",
                  "", f"file A {sizes.get(a, 0) / 2**20:.1f} MB; touched weights {t / 2**20:.0f} MB "
                      f"({100 * share:.0f}% of the model)", ""]
        lines += report.case_table(results, case) + [""]
    lines += ["## Targets", "",
              "Ratios of minimum times measured side by side in this run, ours = Patcher over live modules in place "
              "(as A1111/Forge/diffusers hold weights), at " + f"{args.threads or 'all'} thread(s).", ""]
    lines += report.targets(results, step, listing, by_threads, args.threads) + [""]
    if len(by_threads) > 1:
        import torch

        lines += [f"## Threads: one thread and all cores (torch default: {torch.get_num_threads()} here)", "",
                  "The floor rows and ours rerun with torch's default thread count; the library never sets one.", ""]
        lines += report.threads_table(by_threads, args.cases.split(",")) + [""]
    lines += ["## Where the time goes (kohya LoRA, fp32)", ""] + report.phases_table(results, "lora") + [""]
    buffer = report.op_stat(results, "floor", "lora", "buffer")
    restore = report.op_stat(results, "floor", "lora", "restore")
    lines += ["## Reading the numbers", "",
              "* F copies exactly the touched weights once from saved originals into the model (what an exact switch "
              "must at least move: each original read, each weight written) and does no arithmetic."
              + (f" The previous definition copied into one reused buffer, whose writes stay in the CPU cache: "
                 f"{buffer['min']:.3f} s against F's {restore['min']:.3f} s on the LoRA weights."
                 if buffer and restore else ""),
              "* A LoRA merge must also form up@down, 2·r FLOP per weight element (64 at r = 32) against 8 bytes moved, "
              "which makes it compute-bound on CPU. G (floor + rank-r GEMM) is the floor for low-rank merges: one addmm "
              "per weight from the saved original into the model, factors pre-converted. The arithmetic floor column "
              "applies the same measured product rate to each algorithm's own products (LoHa 4·r, OFT 2·b, BOFT 2·b per "
              "stage, DoRA 2·r FLOP per element; LoKr and IA3 none).",
              "* ours · apply also saves the original of every touched weight (one copy, page-faulted fresh memory): "
              "that copy is what makes restore and every later switch exact, and it is the peak-memory term; restore "
              "copies it back and gives its memory back to the system (unmapping costs about as much as the copy).",
              "* ours computes every algorithm straight into the live weight: element-wise steps by cache-sized row "
              "chunks, products (LoRA, LoHa, OFT, DoRA) with the same calls as the reference math, so every result is "
              "bit-identical to it (tests/test_merge_into.py); fp16/bf16 weights are computed in float32 and cast once.",
              "* Peers: diffusers+PEFT builds PEFT layers at load (kohya keys converted) and fuses/unfuses per "
              "weight; hotswap reuses the UNet layers (text encoders are reloaded: diffusers refuses to hotswap them). "
              "LyCORIS builds its modules from the state dict, then merges per module; it has no unmerge.", ""]
    lines += [f"Run time {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
