"""Turning the workers' JSON into markdown tables of seconds and ratios (to the floor, to the fastest peer)."""

from __future__ import annotations

OPS = ("apply", "restore", "switch", "stack", "strength", "reselect")
OP_TITLES = {"apply": "apply A", "restore": "restore", "switch": "switch A→B", "stack": "stack A→A+B",
             "strength": "strength only", "reselect": "re-select cached"}
ROW_TITLES = {
    "floor": "physical floor (F): read file + copy touched weights",
    "floor-gemm": "floor + rank-r GEMM (G): read file + W+up@down per LoRA weight", "ours-checkpoint": "**ours** (Patcher, checkpoint dict, ldm names)",
    "ours-module": "**ours** (Patcher, ModuleStore in place)", "peft": "diffusers+PEFT (load+fuse / unfuse+unload)",
    "peft-hotswap": "diffusers+PEFT hotswap", "lycoris": "LyCORIS (create_from_weights + merge_to)",
}
OURS = ("ours-checkpoint", "ours-module")
PEERS = ("peft", "peft-hotswap", "lycoris")
CASE_TITLES = {"lora": "kohya LoRA r32 (attn/ff/proj, UNet+TE)", "locon": "LoCon (r32, conv r16)",
               "lokr": "LyCORIS LoKr (factor 8, full w1 and w2)",
               "lokr-split": "LyCORIS LoKr (factor −1, w1 and w2 split, r8)",
               "lokr-tucker": "LyCORIS LoKr on the ResNet convs (factor 8, Tucker w2, r16) and the text encoder",
               "loha": "LyCORIS LoHa (r16)", "oft8": "LyCORIS diag-OFT (block 8)", "oft": "LyCORIS diag-OFT (block 32)",
               "oft64r": "diag-OFT block 64, constrained, rescaled (LyCORIS keys; LyCORIS cannot rebuild 64-row blocks on "
                         "these widths, its factorization gives 5–20)",
               "boft": "LyCORIS BOFT (lora_dim 16: blocks of 10 rows on 1280-wide layers, 8 stages)",
               "ia3": "LyCORIS (IA)³ (output rows)", "dora-out": "LyCORIS DoRA on LoRA r32 (norm per output row)",
               "dora-in": "LyCORIS DoRA on LoRA r32 (norm per input column)", "peft": "PEFT/diffusers LoRA r32",
               "lora-fp16": "kohya LoRA r32 on an fp16 model", "lokr-fp16": "LyCORIS LoKr (factor 8) on an fp16 model",
               "oft-fp16": "LyCORIS diag-OFT (block 32) on an fp16 model",
               "lora-bf16": "kohya LoRA r32 on a bf16 model"}
NO_GEMM_TARGETS = ("lokr", "lokr-split", "lokr-tucker", "loha", "oft8", "oft", "oft64r", "boft", "ia3", "dora-out",
                   "dora-in")
LOW_RANK_TARGETS = ("lora", "locon", "peft")
HALF_TARGETS = ("lora-fp16", "lokr-fp16", "oft-fp16", "lora-bf16")
MB = 1024 * 1024


def op_stat(results, row, case, op):
    c = results.get(row, {}).get("cases", {}).get(case, {})
    return c.get("ops", {}).get(op)


def fastest_peer(results, case, op):
    best = None
    for peer in PEERS:
        s = op_stat(results, peer, case, op)
        if s and (best is None or s["min"] < best[1]):
            best = (peer, s["min"])
    return best


def touched(results, case, op) -> int | None:
    for r in results.values():
        t = r.get("touched_bytes", {}).get(case)
        if t:
            return t["AB"] if op in ("switch", "stack", "reselect") else t["A"]
    return None


def case_table(results, case) -> list[str]:
    ops = [op for op in OPS if any(op_stat(results, r, case, op) for r in results)]
    floor = {op: op_stat(results, "floor", case, op) for op in ops}
    gemm = {op: op_stat(results, "floor-gemm", case, op) for op in ops}
    lines = ["| row | " + " | ".join(OP_TITLES[o] for o in ops) + " | peak RSS over model |",
             "|---|" + "---|" * (len(ops) + 1)]
    for row in ("floor", "floor-gemm") + OURS + PEERS:
        if row not in results:
            continue
        c = results[row].get("cases", {}).get(case)
        if c is None:
            continue
        if "error" in c:
            lines.append(f"| {ROW_TITLES[row]} | " + " | ".join("n/a" for _ in ops) + f" | cannot load: {c['error'][:90]} |")
            continue
        cells, peak = [], 0
        for op in ops:
            s = c["ops"].get(op)
            if not s:
                cells.append("—")
                continue
            mark = "†" if op in c.get("inexact", ()) else ""
            cell = f"{s['min']:.3f}/{s['median']:.3f}{mark}"
            if row != "floor" and floor[op]:
                cell += f" · {s['min'] / floor[op]['min']:.1f}×F"
            if row in OURS and gemm[op]:
                cell += f" · {s['min'] / gemm[op]['min']:.1f}×G"
            cells.append(cell)
            peak = max(peak, s["peak_extra"])
        t = touched(results, case, "stack")
        peak_cell = f"{peak / MB:.0f} MB" + (f" = {peak / t:.2f}× touched" if t else "")
        model = results[row].get("model_bytes", {}).get("float16" if case.endswith("fp16") else "float32")
        if model:
            peak_cell += f", {100 * peak / model:.0f}% of model"
        lines.append(f"| {ROW_TITLES[row]} | " + " | ".join(cells) + f" | {peak_cell} |")
    for row in OURS:
        if row not in results or "ops" not in results[row].get("cases", {}).get(case, {}):
            continue
        cells = []
        for op in ops:
            s, best = op_stat(results, row, case, op), fastest_peer(results, case, op)
            cells.append(f"{s['min'] / best[1]:.2f}× {best[0]}" if s and best else "—")
        lines.append(f"| {ROW_TITLES[row].split(' (')[0]} {row.split('-')[1]} ÷ fastest peer | " + " | ".join(cells) + " | |")
    return lines


def phases_table(results, case) -> list[str]:
    lines = ["| row · op | " + " | ".join(["total (min)", "phases (median s)"]) + " |", "|---|---|---|"]
    for row in ("floor", "floor-gemm") + OURS + PEERS:
        c = results.get(row, {}).get("cases", {}).get(case, {})
        for op, s in c.get("ops", {}).items():
            ph = ", ".join(f"{k} {v:.3f}" for k, v in s["phases"].items())
            lines.append(f"| {row} · {op} | {s['min']:.3f} | {ph} |")
    return lines


def ratio(results, row, case, op, base_row="floor", base_case=None):
    s, f = op_stat(results, row, case, op), op_stat(results, base_row, base_case or case, op)
    return (s["min"] / f["min"], s["min"], f["min"]) if s and f else None


def gemm_rate(results) -> float | None:
    """FLOP/s of the rank-r products, measured: (G − F) on the kohya LoRA switch against its FLOP count."""
    g, f = op_stat(results, "floor-gemm", "lora", "switch"), op_stat(results, "floor", "lora", "switch")
    flops = results.get("floor-gemm", {}).get("flops", {}).get("lora", {}).get("B")
    if not (g and f and flops) or g["min"] <= f["min"]:
        return None
    return flops / (g["min"] - f["min"])


def arithmetic_floor(results, case, op) -> float | None:
    """F + the case's unavoidable FLOP at the measured product rate (seconds), or None when unknown."""
    rate, f = gemm_rate(results), op_stat(results, "floor", case, op)
    flops = next((r.get("flops", {}).get(case) for r in results.values() if r.get("flops", {}).get(case)), None)
    if rate is None or not f or not flops:
        return None
    return f["min"] + flops["B" if op == "switch" else "A"] / rate


def mark(value: float, limit: float) -> str:
    return f"{value:.2f}× {'✓' if value <= limit else '✗'}"


def targets(results, step, listing, by_threads=None, main_threads=1) -> list[str]:
    """The issue's targets on ours-module (in place, as the WebUIs hold weights), each ✓ met or ✗ missed."""
    lines = ["| case (ours, in place) | switch ≤ 2×F | strength ≤ 2×F | switch ≤ 0.3× LyCORIS | strength ≤ 0.3× LyCORIS "
             "| apply ≤ 0.5× LyCORIS | arithmetic floor: F + FLOP at the measured product rate |", "|---|---|---|---|---|---|---|"]
    for case in NO_GEMM_TARGETS:
        cells = []
        for op in ("switch", "strength"):
            r = ratio(results, "ours-module", case, op)
            cells.append(mark(r[0], 2.0) if r else "—")
        for op, limit in (("switch", 0.3), ("strength", 0.3), ("apply", 0.5)):
            r = ratio(results, "ours-module", case, op, "lycoris")
            cells.append(mark(r[0], limit) if r else "—")
        floor = arithmetic_floor(results, case, "switch")
        f = op_stat(results, "floor", case, "switch")
        cells.append(f"{floor:.3f} s = {floor / f['min']:.2f}×F" if floor and f else "—")
        if any(c != "—" for c in cells):
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", "| case (ours, in place) | switch ≤ 1.15×G | restore ≤ 1.1×F | peak over model ≤ 1.1× touched |",
              "|---|---|---|---|"]
    for case in LOW_RANK_TARGETS + HALF_TARGETS + NO_GEMM_TARGETS:
        c = results.get("ours-module", {}).get("cases", {}).get(case, {})
        if "ops" not in c:
            continue
        g = ratio(results, "ours-module", case, "switch", "floor-gemm")
        r = ratio(results, "ours-module", case, "restore")
        peak = max(v["peak_extra"] for v in c["ops"].values())
        t = touched(results, case, "stack")
        lines.append(f"| {case} | {mark(g[0], 1.15) if g else '—'} | {mark(r[0], 1.1) if r else '—'} | "
                     f"{mark(peak / t, 1.1) if t else '—'} ({peak / MB:.0f} MB) |")
    lines += ["", "| case (ours, in place) | switch ≤ 3×F of the same dtype | strength ≤ 3×F |", "|---|---|---|"]
    for case in HALF_TARGETS:
        cells = [ratio(results, "ours-module", case, op) for op in ("switch", "strength")]
        if any(cells):
            lines.append(f"| {case} | " + " | ".join(mark(r[0], 3.0) if r else "—" for r in cells) + " |")
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    if by_threads and len(by_threads) > 1:
        others = ", ".join(f"{t or 'all'}" for t in by_threads if t != main_threads)
        lines.append(f"| benchmark also with all cores (torch default threads); the library sets no thread count | "
                     f"runs at {main_threads} and {others} thread(s), below | met |")
    if step:
        base, ours, peft = min(step["base"]), min(step["ours_merged"]), min(step["peft_unfused"])
        fused = min(step["peft_fused"])
        lines.append(f"| per-step overhead 0 (UNet forward, {step['latent'] * 8}px) | none {base:.3f} s · ours merged {ours:.3f} s "
                     f"({ours / base - 1:+.1%}) · PEFT unfused {peft:.3f} s ({peft / base - 1:+.1%}) · PEFT fused {fused:.3f} s | "
                     f"{'met' if ours <= base * 1.05 else '**missed**'} |")
    if listing:
        ok = listing["cold_s"] <= 3 and listing["warm_s"] <= 0.1
        lines.append(f"| listing {listing['files']} full-size headers cold ≤ 3 s, warm ≤ 0.1 s ({listing['how']}) | "
                     f"cold {listing['cold_s']:.2f} s · warm {listing['warm_s']:.3f} s · re-parse (fresh cache, warm page "
                     f"cache) {listing['reparse_s']:.2f} s | {'met' if ok else '**missed**'} |")
    return lines


def threads_table(by_threads, cases) -> list[str]:
    """Ours (in place) against F and G at each thread count: how much a second core buys, side by side."""
    runs = sorted(by_threads, key=lambda t: (t == 0, t))
    names = [f"{t or 'all'} thr." for t in runs]
    lines = ["| case · op | " + " | ".join(f"{n}: ours s · ×F · ×G" for n in names) + " |", "|---|" + "---|" * len(runs)]
    for case in cases:
        for op in ("switch", "strength", "restore"):
            cells = []
            for t in runs:
                res = by_threads[t]
                s = op_stat(res, "ours-module", case, op)
                if not s:
                    cells.append("—")
                    continue
                f, g = op_stat(res, "floor", case, op), op_stat(res, "floor-gemm", case, op)
                cell = f"{s['min']:.3f}"
                cell += f" · {s['min'] / f['min']:.2f}×F" if f else ""
                cell += f" · {s['min'] / g['min']:.2f}×G" if g and op != "restore" else ""
                cells.append(cell)
            if any(c != "—" for c in cells):
                lines.append(f"| {case} · {op} | " + " | ".join(cells) + " |")
    return lines
