"""Command line: `python -m lib_adapters inspect|merge|convert|generate …`; bad input prints one line, exits 2."""

from __future__ import annotations

import argparse
import json
import sys

from .adapter import Adapter
from .errors import AdapterError


def format_table(summary: dict) -> str:
    """The readable form of an inspect summary."""
    rank = summary["rank"]
    lines = [
        f"file        {summary['file']}",
        f"family      {summary['family']}",
        f"key format  {summary['key_format']}",
        f"layers      {summary['layers']}",
        "algorithms  " + ", ".join(f"{k} ×{v}" for k, v in summary["algorithms"].items())
        + (" (+DoRA)" if summary["dora"] else ""),
        "rank        " + (f"{rank['min']}" if rank and rank["min"] == rank["max"] else
                          f"{rank['min']}–{rank['max']}" if rank else "—"),
        "alpha       " + (", ".join(f"{a} ×{n}" for a, n in summary["alpha"].items()) if summary["alpha"] else "—"),
        f"unmatched   {len(summary['unmatched'])} keys" + (": " + ", ".join(summary["unmatched"][:5]) + (" …" if len(summary["unmatched"]) > 5 else "") if summary["unmatched"] else ""),
    ]
    if summary.get("zero_layers"):
        lines.append(f"zero diffs  {summary['zero_layers']} all-zero layers skipped (no effect)")
    split = summary.get("split_qkv")
    if split:
        lines.append(f"split-qkv   {split['layers']} kohya split_qkv layers, trained at scale "
                     f"{', '.join(split['trained_scales'])}; applied at {split['applied']}")
    meta = summary["metadata"]
    if meta:
        lines.append("metadata")
        for k, v in meta.items():
            text = v if isinstance(v, str) else json.dumps(v)
            lines.append(f"  {k:<28} {text[:100]}{'…' if len(text) > 100 else ''}")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    summary = Adapter.load(args.file).summary()
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_adapters", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="what an adapter file holds")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    i.set_defaults(run=cmd_inspect)
    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands():
    """Sub-commands defined in their own modules (merge, convert, generate) register themselves here."""
    found = []
    for module in ("merge", "convert", "generate"):
        try:
            mod = __import__(f"lib_adapters.{module}", fromlist=["register_cli"])
        except ModuleNotFoundError as e:
            if e.name != f"lib_adapters.{module}":
                raise
            continue
        found.append(mod.register_cli)
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
