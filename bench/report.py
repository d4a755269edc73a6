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
               "lokr": "LyCORIS LoKr (factor 8, full w2)", "oft": "LyCORIS diag-OFT (block 32)",
               "peft": "PEFT/diffusers LoRA r32", "lora-fp16": "kohya LoRA r32 on an fp16 model"}
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


def targets(results, step, listing) -> list[str]:
    lines = ["| target | measured | verdict |", "|---|---|---|"]

    def verdict(ok):
        return "met" if ok else "**missed**"

    for case in ("lora", "lora-fp16"):
        for row in OURS:
            s, f = op_stat(results, row, case, "switch"), op_stat(results, "floor", case, "switch")
            if s and f:
                r = s["min"] / f["min"]
                lines.append(f"| {case} {row}: switch ≤ 1.5× floor | {s['min']:.3f} s = {r:.2f}× floor ({f['min']:.3f} s) | {verdict(r <= 1.5)} |")
            g = op_stat(results, "floor-gemm", case, "switch")
            if s and g:
                lines.append(f"| {case} {row}: switch vs floor + rank-r GEMM (information) | {s['min'] / g['min']:.2f}× ({g['min']:.3f} s) | — |")
            best = fastest_peer(results, case, "switch")
            if s and best:
                r = s["min"] / best[1]
                lines.append(f"| {case} {row}: switch ≤ 0.5× fastest peer | {r:.2f}× {best[0]} ({best[1]:.3f} s) | {verdict(r <= 0.5)} |")
            s, f = op_stat(results, row, case, "strength"), op_stat(results, "floor", case, "strength")
            if s and f:
                r = s["min"] / f["min"]
                lines.append(f"| {case} {row}: strength-only ≤ copy of changed layers | {s['min']:.3f} s = {r:.2f}× ({f['min']:.3f} s) | {verdict(r <= 1.0)} |")
            c = results.get(row, {}).get("cases", {}).get(case, {})
            if "ops" in c:
                peak = max(v["peak_extra"] for v in c["ops"].values())
                t = touched(results, case, "stack")
                lines.append(f"| {case} {row}: peak over model ≤ 1 copy of touched weights | {peak / MB:.0f} MB = {peak / t:.2f}× ({t / MB:.0f} MB) | {verdict(peak <= t)} |")
    if step:
        base, ours, peft = min(step["base"]), min(step["ours_merged"]), min(step["peft_unfused"])
        fused = min(step["peft_fused"])
        lines.append(f"| per-step overhead 0 (UNet forward, {step['latent'] * 8}px) | none {base:.3f} s · ours merged {ours:.3f} s "
                     f"({ours / base - 1:+.1%}) · PEFT unfused {peft:.3f} s ({peft / base - 1:+.1%}) · PEFT fused {fused:.3f} s | "
                     f"{verdict(ours <= base * 1.05)} |")
    if listing:
        lines.append(f"| listing {listing['files']} files ≤ 2 s warm ({listing['how']}) | warm {listing['warm_s']:.3f} s · "
                     f"re-parse (fresh cache, warm page cache) {listing['reparse_s']:.2f} s · cold {listing['cold_s']:.2f} s | "
                     f"{verdict(listing['warm_s'] <= 2)} |")
    return lines
