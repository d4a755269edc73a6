"""`python -m lib_adapters merge`: bake the adapters named by prompt tags into a single-file checkpoint.

Everything that can fail is checked before the output is written (names, files, families, layer fits); the
checkpoint is read once into one buffer, merged in place weight by weight (math in float32, rounded once to the output dtype) and
written tensor by tensor, so about one copy of it is held. Keys no adapter touches are written back bit-identical.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from .adapter import Adapter
from .errors import AdapterError
from .files import load_tensors, read_header, refuse_same_file, save_tensors
from .library import AdapterIndex
from .naming import DIT_FAMILY_NAMES, LayerMap, build_plan
from .naming.blocks import load_presets, parse_block_weights
from .patching import Plan, compute
from .tag_options import prompt_adapters

DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CHECKPOINT_MARKER = "model.diffusion_model."


def find_adapters(prompt: str, lora_dirs: list[str]) -> list[tuple[Adapter, float, float, str | None, float, str]]:
    """[(Adapter, unet strength, te strength, lbw= as written, x=, tag)] for the tags of `prompt`, in prompt order
    (repeats summed); a schedule is refused (it has no meaning in a merge)."""
    for d in lora_dirs:
        if not Path(d).is_dir():
            raise AdapterError(d, "--lora-dir is not a folder")
    index = AdapterIndex(lora_dirs)
    _, found = prompt_adapters(prompt, index.find, schedules="merge")
    return [(Adapter.load(a.path), a.unet, a.te, a.lbw, a.x, a.tag) for a in found]


def plan_entries(found, layer_map: LayerMap, lora_dirs) -> list[tuple]:
    """build_plan entries with block weights read for the model's family (presets: the common ones and
    `lbwpresets.txt` in the adapter folders)."""
    presets = load_presets(lora_dirs) if any(lbw for _, _, _, lbw, _, _ in found) else None
    return [(adapter, unet, te, parse_block_weights(lbw, layer_map.family, presets, x, tag) if lbw else None)
            for adapter, unet, te, lbw, x, tag in found]


def checkpoint_layer_map(path: str) -> LayerMap:
    """The layer map of a single-file checkpoint (SD/SDXL, or a DiT such as Flux: all-in-one or transformer only,
    with or without `model.diffusion_model.`), from its header alone; AdapterError if it is no checkpoint."""
    header = read_header(path)
    layer_map = LayerMap.for_checkpoint({k: e.shape for k, e in header.entries.items()})
    if layer_map.family not in DIT_FAMILY_NAMES and not any(k.startswith(CHECKPOINT_MARKER) for k in header.entries):
        raise AdapterError(path, "not a model checkpoint: it has neither model.diffusion_model.* weights nor a "
                                 f"{'/'.join(DIT_FAMILY_NAMES)} transformer (is it an adapter or a VAE?)")
    return layer_map


def _store(tensors: dict[str, torch.Tensor], name: str, value: torch.Tensor, dtype: torch.dtype | None) -> None:
    """The merged float32 `value` rounded once: into the tensor's own storage, or (another output dtype) as a new
    tensor of that dtype, never through the base's dtype first."""
    old = tensors[name]
    if dtype is not None and old.is_floating_point() and dtype != old.dtype:
        tensors[name] = value.to(dtype)
    else:
        old.copy_(value.to(old.dtype))


def merge_in_place(tensors: dict[str, torch.Tensor], plan: Plan, dtype: torch.dtype | None = None) -> int:
    """Apply `plan` to `tensors`, writing each new weight (and bias) into its existing storage (or, for an output
    `dtype` other than the weight's, as a tensor of that dtype); returns the count."""
    for name, ops in plan.items():
        bias_name = next((op.target.bias for op in ops if op.target.bias and op.target.bias in tensors), None)
        bias = tensors[bias_name] if bias_name else None
        new_w, new_b = compute(ops, tensors[name], bias)  # a layer that does not fit raises AdapterError naming its file
        _store(tensors, name, new_w, dtype)
        if bias is not None and new_b is not None:
            _store(tensors, bias_name, new_b, dtype)
    return len(plan)


def merge(checkpoint: str, lora_dirs: list[str], out: str, prompt: str, dtype: str = "keep",
          log=print) -> dict:
    """Merge the adapters tagged in `prompt` into `checkpoint`, write `out`; returns a summary."""
    if dtype not in DTYPES:
        raise AdapterError(None, f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out_dir = Path(out).resolve().parent
    if not out_dir.is_dir():
        raise AdapterError(out, f"the output folder {out_dir} does not exist")
    found = find_adapters(prompt, lora_dirs)
    refuse_same_file(out, [checkpoint] + [a.path for a, *_ in found])
    layer_map = checkpoint_layer_map(checkpoint)
    entries = plan_entries(found, layer_map, lora_dirs)
    plan, unmatched = build_plan(entries, layer_map)
    for adapter, *_ in entries:
        missing = unmatched.get(adapter.path) or []
        if missing:
            shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
            log(f"note: {adapter.path}: {len(missing)} of {len(adapter.layers)} layers match no weight: {shown}")
    if not entries:
        log("note: the prompt names no <lora:…> tags; the checkpoint is written unchanged"
            + (f" (as {dtype})" if dtype != "keep" else ""))
    header, tensors = load_tensors(checkpoint)
    count = merge_in_place(tensors, plan, DTYPES[dtype])
    metadata = dict(header.metadata)
    metadata["lib_adapters.merged"] = json.dumps(
        [{"file": os.path.basename(a.path), "unet": u, "te": t, **({"lbw": lbw} if lbw else {})}
         for a, u, t, lbw, _, _ in found])
    save_tensors(out, tensors, metadata, DTYPES[dtype])
    family = f"{layer_map.family}: {layer_map.detail}" if layer_map.detail else layer_map.family
    return {"out": out, "weights_changed": count, "adapters": len(entries), "family": family}


def cmd_merge(args) -> int:
    info = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    summary = merge(args.checkpoint, args.lora_dir, args.out, " ".join(args.prompt), args.dtype, log=info)
    print(f"wrote {summary['out']}: {summary['adapters']} adapter(s), {summary['weights_changed']} weights changed "
          f"({summary['family']})")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge the adapters named by <lora:…> tags into a checkpoint")
    p.add_argument("--checkpoint", required=True, help="base single-file checkpoint (.safetensors)")
    p.add_argument("--lora-dir", required=True, action="append",
                   help="folder searched (recursively) for NAME.safetensors; may be repeated")
    p.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--dtype", choices=list(DTYPES), default="keep", help="floating-point dtype of the output")
    p.add_argument("prompt", nargs="*", help="prompt words with <lora:NAME:W> / <lora:NAME:W:W_CLIP> tags")
    p.set_defaults(run=cmd_merge)
