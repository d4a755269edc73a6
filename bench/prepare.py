"""Generate the benchmark's adapter files (and the 2,000-file listing folder) once, into the cache folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--family", default="sd1")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--listing", type=int, default=2000)
    args = ap.parse_args(argv)
    from .adapters import CASES, generate
    from .listing import make_listing
    from .models import build
    from .worker import quiet

    quiet()
    torch.set_grad_enabled(False)
    cache = Path(args.cache)
    files_json = cache / "files.json"
    files = json.load(open(files_json)) if files_json.exists() else {}
    if any(c not in files for c in CASES):  # first run, or kinds added since
        components = build(args.family, args.quick, seed=0)
        files = generate(components, cache / "adapters")
        del components
        json.dump(files, open(files_json, "w"), indent=1)
    if args.listing:
        listing = cache / "listing"
        marker = listing / "templates.json"
        templates = [files[k][0] for k in sorted(files)]
        if listing.exists() and (not marker.exists() or json.load(open(marker)) != templates):  # made otherwise: again
            import shutil

            shutil.rmtree(listing)
        listing.mkdir(parents=True, exist_ok=True)
        json.dump(templates, open(marker, "w"))
        make_listing(templates, listing, args.listing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
