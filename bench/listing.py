"""Listing adapter files for the extra-networks panel (headers only): cold, warm, and re-parsed.

The folder holds N headers made from the benchmark's real adapter files (every kind), varied as a collection is
(dtype, text encoder or not, LoRA rank) and each with its own kohya metadata, each file extended to its real size
as a sparse file (the data section is never read by a listing, so it costs no disk).
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
from pathlib import Path

from .memory import drop_page_cache


def _raw_header(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


RANKS = (4, 8, 16, 32, 64, 128)
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4}
RANK_AXES = {"lora_down.weight": 0, "lora_A.weight": 0, "lora_up.weight": 1, "lora_B.weight": 1}


def variant(doc: dict, v: int) -> dict:
    """The template's tensor table in variant `v`: dtype F16/BF16/F32, with or without the text encoder, and (LoRA
    factors) rank 4–128 — what one collection's files differ by."""
    dtype = ("F16", "BF16", "F32")[v % 3]
    te = (v // 3) % 2 == 0
    rank = RANKS[(v // 6) % len(RANKS)]
    body, offset = {}, 0
    for key, info in doc.items():
        if key == "__metadata__" or (not te and ("lora_te" in key or "text_encoder" in key)):
            continue
        shape = list(info["shape"])
        axis = next((a for suffix, a in RANK_AXES.items() if key.endswith(suffix)), None)
        if axis is not None:
            shape[axis] = rank
        dt = dtype if info["dtype"] in ITEMSIZE else info["dtype"]
        size = ITEMSIZE.get(dt, 8) * math.prod(shape)
        body[key] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return body


def make_listing(templates: list[str], folder, count: int) -> list[str]:
    """`count` files named like a user's collection, in 20 sub-folders; reused when already there. File i takes
    template i mod T in variant i div T (so a few hundred distinct tensor tables), and its own metadata."""
    folder = Path(folder)
    docs = [_raw_header(t) for t in templates]
    paths = []
    for i in range(count):
        sub = folder / f"set{i % 20:02d}"
        path = sub / f"adapter_{i:04d}.safetensors"
        paths.append(str(path))
        if path.exists():
            continue
        sub.mkdir(parents=True, exist_ok=True)
        doc = docs[i % len(docs)]
        body = variant(doc, i // len(docs))
        meta = dict(doc.get("__metadata__", {}))
        tags = {f"tag{j}_{i % 97}": (j * 7 + i) % 50 + 1 for j in range(120)}
        meta.update({
            "ss_output_name": f"adapter_{i:04d}", "ss_network_dim": "32", "ss_network_alpha": "16",
            "ss_resolution": "(512, 512)", "ss_num_epochs": "10", "ss_max_train_steps": str(1000 + i),
            "ss_tag_frequency": json.dumps({"dataset": tags}), "modelspec.title": f"Adapter {i}",
        })
        body["__metadata__"] = meta
        data_len = max((v["data_offsets"][1] for k, v in body.items() if k != "__metadata__"), default=0)
        raw = json.dumps(body, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(8 + len(raw) + data_len)
    return paths


def distinct_tables(paths: list[str]) -> int:
    """How many different tensor tables (keys, dtypes, shapes) the files hold."""
    seen = set()
    for p in paths:
        doc = _raw_header(p)
        doc.pop("__metadata__", None)
        seen.add(json.dumps(doc, sort_keys=True))
    return len(seen)


def measure(folder: str) -> dict:
    """Seconds to list every file under `folder`: cold (page cache dropped, fresh cache), warm, re-parsed."""
    t = time.perf_counter()
    try:
        from lib_adapters import cards

        def listing():
            return cards.list_cards([folder])

        def clear():
            cards.clear_cache()

        how = "lib_adapters.cards.list_cards"
    except ImportError:  # before the cards module existed
        from lib_adapters.files import read_header

        def listing():
            return [read_header(p) for p in sorted(Path(folder).rglob("*.safetensors"))]

        def clear():
            pass

        how = "lib_adapters.files.read_header"
    import_s = time.perf_counter() - t
    paths = [str(p) for p in Path(folder).rglob("*.safetensors")]
    drop_page_cache(paths)
    t = time.perf_counter()
    items = listing()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    listing()
    warm = time.perf_counter() - t
    clear()
    t = time.perf_counter()
    listing()
    reparse = time.perf_counter() - t
    errors = sum(1 for c in items if isinstance(c, Exception) or getattr(c, "error", ""))
    header_bytes = sum(8 + struct.unpack("<Q", open(p, "rb").read(8))[0] for p in paths[:20]) // max(1, len(paths[:20]))
    return {"how": how, "files": len(paths), "import_s": import_s, "cold_s": cold, "warm_s": warm,
            "reparse_s": reparse, "errors": errors, "header_bytes": header_bytes, "tables": distinct_tables(paths)}


if __name__ == "__main__":
    json.dump(measure(sys.argv[1]), open(sys.argv[2], "w"), indent=1)
