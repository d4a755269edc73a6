"""Flux adapter switching at FLUX.1's real width: ours vs the physical floor vs rebuilding every patched weight.

    python -m bench.flux                     # 2 double + 2 single blocks (H 3072, MLP 12288, bf16; ~1.9 GB)
    python -m bench.flux --double 1 --single 1 --n 2

A BFL-named Flux transformer slice (real widths, seeded bf16 weights; the block count is what fits beside the other
work on this machine) is patched through `Patcher` in place on its live tensors (what A1111-style hosts and the
diffusers host do; `merge` writes in place too). Cases: a kohya LoRA r16 and a LyCORIS-style LoKr (factor 16) on every block Linear (A, B), and
the same kind on the attention layers only (C). Operations: apply A; switch A→B; strength only, on A alone and on C
while A stays (the case where one adapter's strength changes among several). Rows: the floor F (read the files
the transition loads + copy each weight that must change, once), ours (recompute only weights whose operations
changed), and "rebuild all" — Forge's LoraLoader policy: every patched weight is restored from its backup and merged
again whenever the patch set changes (same math, so the row isolates the policy). Each row runs in its own process
(clean peak RSS); results go to bench/results/flux.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
H, M = 3072, 12288
ROWS = ("floor", "ours", "rebuild-all")
CASES = ("lora", "lokr")
ATTENTION = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1")


def block_linears(double: int, single: int) -> dict[str, tuple[int, int]]:
    """BFL Linear module → (out, in) for the blocks (what LoRA trainers target)."""
    out = {}
    for n in range(double):
        for s in ("img", "txt"):
            b = f"double_blocks.{n}.{s}"
            out.update({f"{b}_mod.lin": (6 * H, H), f"{b}_attn.qkv": (3 * H, H), f"{b}_attn.proj": (H, H),
                        f"{b}_mlp.0": (M, H), f"{b}_mlp.2": (H, M)})
    for n in range(single):
        b = f"single_blocks.{n}"
        out.update({f"{b}.linear1": (3 * H + M, H), f"{b}.linear2": (H, H + M), f"{b}.modulation.lin": (3 * H, H)})
    return out


def make_files(cache: Path, double: int, single: int) -> dict[str, str]:
    """The model slice and the adapter files, built once per size."""
    from lib_adapters.files import save_tensors

    names = {"model": cache / f"flux-{double}d{single}s-bf16.safetensors"}
    for case in CASES:
        for v in "ABC":
            names[f"{case}_{v}"] = cache / f"{case}_{double}d{single}s_{v}.safetensors"
    if all(p.exists() for p in names.values()):
        return {k: str(v) for k, v in names.items()}
    g = torch.Generator().manual_seed(0)
    layers = block_linears(double, single)
    model = {}
    for module, (o, i) in layers.items():
        model[f"diffusion_model.{module}.weight"] = (torch.randn(o, i, generator=g) * 0.02).to(torch.bfloat16)
        model[f"diffusion_model.{module}.bias"] = (torch.randn(o, generator=g) * 0.02).to(torch.bfloat16)
    for module, shape in (("img_in", (H, 64)), ("txt_in", (H, 4096)), ("final_layer.adaLN_modulation.1", (2 * H, H))):
        model[f"diffusion_model.{module}.weight"] = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    for n in range(double):
        model[f"diffusion_model.double_blocks.{n}.img_attn.norm.key_norm.scale"] = torch.ones(128, dtype=torch.bfloat16)
    save_tensors(names["model"], model)
    del model
    for case in CASES:
        for v, only_attention in (("A", False), ("B", False), ("C", True)):
            tensors = {}
            for module, (o, i) in layers.items():
                if only_attention and not module.endswith(ATTENTION):
                    continue
                key = "lora_unet_" + module.replace(".", "_")
                if case == "lora":
                    tensors[f"{key}.lora_down.weight"] = (torch.randn(16, i, generator=g) * 0.01).to(torch.bfloat16)
                    tensors[f"{key}.lora_up.weight"] = (torch.randn(o, 16, generator=g) * 0.01).to(torch.bfloat16)
                    tensors[f"{key}.alpha"] = torch.tensor(8.0)
                else:  # LyCORIS LoKr, factor 16: w1 (16, 16) full, w2 (o/16, i/16) full
                    tensors[f"{key}.lokr_w1"] = (torch.randn(16, 16, generator=g) * 0.1).to(torch.bfloat16)
                    tensors[f"{key}.lokr_w2"] = (torch.randn(o // 16, i // 16, generator=g) * 0.01).to(torch.bfloat16)
            save_tensors(names[f"{case}_{v}"], tensors, {"ss_base_model_version": "flux1"})
    return {k: str(v) for k, v in names.items()}


TRANSITIONS = (  # (operation, state before, state after): states are ((file key, strength), ...)
    ("apply A", (), (("A", 1.0),)),
    ("switch A→B", (("A", 1.0),), (("B", 1.0),)),
    ("strength A", (("A", 1.0),), (("A", 0.5),)),
    ("strength C of A+C", (("A", 1.0), ("C", 1.0)), (("A", 1.0), ("C", 0.5))),
)


class InPlace:
    """The loaded tensors as a weight store written in place (as a host's live weights): no second model copy."""

    in_place = True

    def __init__(self, tensors):
        self.tensors = tensors

    def get(self, name):
        return self.tensors[name]

    def set(self, name, value):
        self.tensors[name].copy_(value)

    def has(self, name):
        return name in self.tensors


class Ours:
    """Patcher over the live tensors: only weights whose operations changed are recomputed."""

    def __init__(self, tensors):
        from lib_adapters.naming import LayerMap
        from lib_adapters.patching import Patcher

        self.layer_map = LayerMap.for_checkpoint({k: v.shape for k, v in tensors.items()})
        self.patcher = Patcher(InPlace(tensors))
        self.cache = {}

    def plan(self, state):
        from lib_adapters import Adapter
        from lib_adapters.naming import build_plan

        entries = []
        for path, s in state:
            if path not in self.cache:
                self.cache[path] = Adapter.load(path)
            entries.append((self.cache[path], s, s))
        self.cache = {p: a for p, a in self.cache.items() if p in {p for p, _ in state}}
        return build_plan(entries, self.layer_map)[0]

    def goto(self, state):
        stats = self.patcher.reconcile(self.plan(state))
        return stats["recomputed"] + stats["restored"]


class RebuildAll(Ours):
    """Forge's LoraLoader policy: on any change, every patched weight back from its backup and merged again."""

    def __init__(self, tensors):
        from lib_adapters.algorithms.into import Workspace

        super().__init__(tensors)
        self.tensors = tensors
        self.backup: dict[str, torch.Tensor] = {}
        self.last = None
        self.workspace = Workspace()  # the same reused buffers as Patcher's: only the policy differs

    def goto(self, state):
        from lib_adapters.patching import compute

        plan = self.plan(state)
        signature = tuple((w, tuple(op.signature for op in ops)) for w, ops in sorted(plan.items()))
        if signature == self.last:
            return 0
        for name, t in self.backup.items():
            self.tensors[name].copy_(t)
        written = len(self.backup)
        for name, ops in plan.items():
            self.backup.setdefault(name, self.tensors[name].clone())
            w, _ = compute(ops, self.backup[name], None, workspace=self.workspace)
            self.tensors[name].copy_(w)
            written += 1
        self.backup = {k: v for k, v in self.backup.items() if k in plan}
        self.last = signature
        return written


class Floor:
    """Read the files the transition loads; copy each weight that must change once (no arithmetic)."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.ours = Ours({k: v for k, v in tensors.items()})  # only to know which weights each plan writes
        self.current: dict[str, tuple] = {}
        self.loaded: set[str] = set()
        biggest = max(t.numel() for t in tensors.values())
        self.scratch = torch.empty(biggest, dtype=torch.bfloat16)

    def goto(self, state):
        plan = self.ours.plan(state)
        wanted = {w: tuple(op.signature for op in ops) for w, ops in plan.items()}
        changed = [w for w in set(wanted) | set(self.current) if wanted.get(w) != self.current.get(w)]
        for path, _ in state:
            if path not in self.loaded:
                with open(path, "rb") as f:
                    f.read()
        self.loaded = {p for p, _ in state}
        for name in changed:
            t = self.tensors[name]
            self.scratch[: t.numel()].view_as(t).copy_(t)
        self.current = wanted
        return len(changed)


def worker(args) -> int:
    from bench import memory
    from lib_adapters.files import load_tensors

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    files = json.loads(args.files)
    results = {}
    for case in args.cases.split(","):
        _, tensors = load_tensors(files["model"])
        model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        row = {"floor": Floor, "ours": Ours, "rebuild-all": RebuildAll}[args.row](tensors)
        memory.trim()
        base_rss = memory.rss()
        memory.reset_peak()
        times: dict[str, list[float]] = {}
        weights: dict[str, int] = {}
        path = {k: files[f"{case}_{k}"] for k in "ABC"}
        for _ in range(args.n):
            for op, before, after in TRANSITIONS:
                row.goto(tuple((path[k], s) for k, s in before))
                t = time.perf_counter()
                weights[op] = row.goto(tuple((path[k], s) for k, s in after))
                times.setdefault(op, []).append(time.perf_counter() - t)
            row.goto(())
        results[case] = {"times": {op: [min(v), statistics.median(v)] for op, v in times.items()}, "weights": weights,
                         "peak_over_model": memory.peak() - base_rss, "model_bytes": model_bytes}
        del row, tensors
        memory.trim()
    Path(args.out).write_text(json.dumps(results))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--n", type=int, default=3, help="repetitions per operation (min and median reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default=str(HERE / "results" / "flux.md"))
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.row:
        return worker(args)
    cache = HERE / "cache" / "flux"
    cache.mkdir(parents=True, exist_ok=True)
    files = make_files(cache, args.double, args.single)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    results = {}
    for row in args.rows.split(","):
        out = cache / f"{row}.json"
        print(f"[bench.flux] {row} …", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "bench.flux", "--row", row, "--files", json.dumps(files), "--out",
                        str(out), "--n", str(args.n), "--threads", str(args.threads), "--cases", args.cases],
                       cwd=ROOT, env=env, check=True)
        results[row] = json.loads(out.read_text())
    md = render(args, results)
    print(md)
    Path(args.out).write_text(md)
    return 0


def render(args, results) -> str:
    from bench.run import machine

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Flux adapter switching — FLUX.1 width (H {H}, MLP {M}), {args.double} double + {args.single} "
             f"single blocks, bf16", "", f"{stamp} · {machine('cpu', args.threads)}", "",
             "Cells: min/median seconds over n = " + str(args.n) + " · ratio of mins to the floor (×F) · weights "
             "written. A = B = every block Linear, C = attention layers only (qkv, proj, linear1).",
             "`rebuild all` = Forge's LoraLoader policy (restore and re-merge every patched weight on any change), "
             "same math as ours.", "",
             f"Command: `python -m bench.flux --double {args.double} --single {args.single}`", ""]
    for case in args.cases.split(","):
        some = next(r[case] for r in results.values() if case in r)
        title = {"lora": "kohya LoRA r16", "lokr": "LyCORIS LoKr (factor 16, full w1/w2)"}[case]
        lines += [f"## {title}", "", f"model slice {some['model_bytes'] / 2**30:.2f} GB", "",
                  "| row | " + " | ".join(op for op, _, _ in TRANSITIONS) + " | peak RSS over model |",
                  "|---|" + "---|" * (len(TRANSITIONS) + 1)]
        floor = results.get("floor", {}).get(case)
        for row in args.rows.split(","):
            r = results[row][case]
            cells = []
            for op, _, _ in TRANSITIONS:
                lo, med = r["times"][op]
                ratio = f" · {lo / floor['times'][op][0]:.1f}×F" if floor and row != "floor" else ""
                cells.append(f"{lo:.3f}/{med:.3f}{ratio} · {r['weights'][op]} w")
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {r['peak_over_model'] / 2**20:.0f} MB |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
