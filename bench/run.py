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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny widths, same topology")
    ap.add_argument("--family", default="sd1", choices=("sd1", "sdxl"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=3, help="repetitions per operation (min and median reported)")
    ap.add_argument("--n-other", type=int, default=2, help="repetitions in the cases outside --full-ops-cases")
    ap.add_argument("--peer-n", type=int, default=2, help="repetitions for the reference libraries")
    ap.add_argument("--peer-cases", default="lora,lokr,oft,peft,lora-fp16",
                    help="cases run for the reference libraries (LoCon through PEFT/LyCORIS takes minutes)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--cases", default="lora,locon,lokr,oft,peft,lora-fp16")
    ap.add_argument("--full-ops-cases", default="lora,lora-fp16",
                    help="cases timed on every operation (the others: apply, restore, switch)")
    ap.add_argument("--peer-full-ops-cases", default="lora", help="the same for the reference libraries (slow)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (0: torch's default). 1 by default: on 2 shared cores the OpenMP "
                         "wake-up of a second thread costs ~0.4 ms per small op, which swamps copies and merges")
    ap.add_argument("--latent", type=int, default=32, help="latent side for the per-step forward")
    ap.add_argument("--listing", type=int, default=2000, help="files in the listing test (0: skip)")
    ap.add_argument("--no-step", action="store_true")
    ap.add_argument("--cache", default=None, help="folder for generated files (default bench/cache/<size>)")
    ap.add_argument("--out", default=str(HERE / "results" / "latest.md"))
    args = ap.parse_args(argv)
    size = f"{args.family}-{'quick' if args.quick else 'full'}"
    cache = Path(args.cache or HERE / "cache" / size)
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / "run"
    work.mkdir(exist_ok=True)
    log_path = work / "log.txt"
    common = ["--family", args.family, "--device", args.device] + (["--quick"] if args.quick else [])
    threads = ["--threads", str(args.threads)]
    started = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = machine(args.device, args.threads)
    timings = {}
    with open(log_path, "w") as log:
        timings["prepare"] = sub("prepare", ["--cache", str(cache), "--listing", str(args.listing)] + common[:2]
                                 + (["--quick"] if args.quick else []), log)
        files = str(cache / "files.json")
        results = {}
        for row in args.rows.split(","):
            out = work / f"{row}.json"
            print(f"[bench] {row} …", file=sys.stderr, flush=True)
            try:
                peer = row.startswith(("peft", "lycoris"))
                cases = ",".join(c for c in args.cases.split(",") if not peer or c in args.peer_cases.split(","))
                timings[row] = sub("worker", ["--row", row, "--files", files, "--out", str(out),
                                              "--n", str(args.peer_n if peer else args.n),
                                              "--n-other", str(args.peer_n if peer else args.n_other),
                                              "--cases", cases, "--full-ops-cases",
                                              args.peer_full_ops_cases if peer else args.full_ops_cases]
                                   + common + threads, log)
                results[row] = json.load(open(out))
            except RuntimeError as e:  # one row failing (e.g. out of memory) leaves the others standing
                print(f"[bench] {e}", file=sys.stderr, flush=True)
                results[row] = {"cases": {c: {"error": str(e)} for c in args.cases.split(",")}}
        step = None
        if not args.no_step:
            print("[bench] per-step …", file=sys.stderr, flush=True)
            timings["step"] = sub("step", ["--files", files, "--out", str(work / "step.json"), "--n", str(args.n),
                                           "--latent", str(args.latent)] + common + threads, log)
            step = json.load(open(work / "step.json"))
        listing = None
        if args.listing:
            print("[bench] listing …", file=sys.stderr, flush=True)
            env_args = [str(cache / "listing"), str(work / "listing.json")]
            timings["listing"] = sub("listing", env_args, log)
            listing = json.load(open(work / "listing.json"))
    total = time.perf_counter() - started
    md = render(args, stamp, header, results, step, listing, timings, total, cache)
    print(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(md)
    os.replace(tmp, args.out)
    json.dump({"results": results, "step": step, "listing": listing, "timings": timings},
              open(Path(args.out).with_suffix(".json"), "w"), indent=1)
    return 0


def render(args, stamp, header, results, step, listing, timings, total, cache) -> str:
    some = next((r for r in results.values() if "model_bytes" in r), {"model_bytes": {"float32": 1}})
    model_mb = some["model_bytes"]["float32"] / 2**20
    sizes = {Path(p).name: s for p, s in some.get("files", {}).items()}
    lines = [
        f"# Adapter switching benchmark — {args.family} {'quick (tiny widths)' if args.quick else 'full size'}",
        "",
        f"{stamp} · {header} · device {args.device}",
        f"Model: {model_mb:.0f} MB fp32 (UNet + text encoder(s), random weights from the real configs). "
        f"n = {args.n} per operation in the fully timed cases, {args.n_other} elsewhere, {args.peer_n} for the peers; cells are **min/median seconds · ratio of mins to the floor (×F)**; "
        f"† = not bit-exact (the peer subtracts the delta again; LyCORIS has no unmerge, so removal is merge_to(-s)). "
        f"Peak RSS over model = highest resident memory during the case minus the memory before it (includes kept "
        f"backups), compared with the touched weights' size in the model's dtype.",
        "",
        "Command: `python -m bench.run" + (" --quick" if args.quick else "") +
        (f" --family {args.family}" if args.family != "sd1" else "") + (f" --threads {args.threads}" if args.threads != 1 else "") + "`",
        "",
    ]
    for case in args.cases.split(","):
        t = report.touched(results, case, "apply")
        a = f"{case.split('-')[0]}_A.safetensors"
        if t is None:
            continue
        lines += [f"## {report.CASE_TITLES.get(case, case)}",
                  "", f"file A {sizes.get(a, 0) / 2**20:.1f} MB; touched weights {t / 2**20:.0f} MB "
                      f"({100 * t / (some['model_bytes']['float32'] / (2 if case.endswith('fp16') else 1)):.0f}% of the model)", ""]
        lines += report.case_table(results, case) + [""]
    lines += ["## Targets", ""] + report.targets(results, step, listing) + [""]
    lines += ["## Where the time goes (kohya LoRA, fp32)", ""] + report.phases_table(results, "lora") + [""]
    lines += ["## Reading the numbers", "",
              "* F copies exactly the touched weights once and does no arithmetic; a LoRA merge must also form "
              "up@down, 2·r FLOP per weight element (64 at r = 32) against 8 bytes moved, which makes it compute-bound "
              "on CPU. G (floor + rank-r GEMM) is the floor for low-rank merges: one addmm per weight, W read once, "
              "W' written once, factors pre-converted.",
              "* ours · apply also saves the original of every touched weight (one copy, page-faulted fresh memory): "
              "that copy is what makes restore and every later switch exact, and it is the peak-memory term.",
              "* ours · restore copies the saved originals back (bit-exact); the peers' restore subtracts the delta "
              "again (†, rounding residue; for OFT, merge_to(-s) is not an inverse at all).",
              "* Peers: diffusers+PEFT builds PEFT layers at load (kohya keys converted) and fuses/unfuses per "
              "weight; hotswap reuses the UNet layers (text encoders are reloaded: diffusers refuses to hotswap them). "
              "LyCORIS builds its modules from the state dict, then merges per module; it has no unmerge.", ""]
    lines += [f"Run time {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
