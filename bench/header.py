"""`python -m bench.header [--keys 100000]`: seconds per 100k keys to parse and validate a safetensors header with
`files.read_header` (through the `safetensors` package), against the floor of reading the header bytes and
`json.loads` alone, and the peak RSS over the header size; one file of N tiny LoRA tensors (kohya names)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import tempfile
import time


def write(path: str, keys: int) -> int:
    header, offset = {}, 0
    for i in range(keys):
        name = f"lora_unet_down_blocks_{i // 3}_attentions_0_proj_in.{('lora_down.weight', 'lora_up.weight', 'alpha')[i % 3]}"
        shape = ([4, 8], [8, 4], [])[i % 3]
        size = 2 * (32 if shape else 1)
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return len(raw)


def best(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keys", type=int, default=100_000)
    args = ap.parse_args(argv)
    from lib_adapters.files import read_header

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "many.safetensors")
        size = write(path, args.keys)

        def floor():
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                json.loads(f.read(n))

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ours = best(lambda: read_header(path))
        rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        base = best(floor)
    per = 100_000 / args.keys
    print(f"header {size / 1e6:.1f} MB, {args.keys} keys: read_header {ours * per:.3f} s per 100k keys "
          f"({ours / base:.2f}x read + json.loads {base * per:.3f} s); peak RSS +{rss:.0f} MB "
          f"({rss * 2**20 / size:.1f}x the header)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
