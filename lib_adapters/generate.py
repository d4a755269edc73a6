"""`python -m lib_adapters generate`: text-to-image with adapters merged into a diffusers pipeline.

With no --checkpoint it runs the embedded demo (a tiny SD1-topology model with seeded weights and three adapters the
project writes itself), so it works on a fresh machine. `--grid unet=0,0.5,1 te=0,1` sweeps strengths into one
labelled PNG. Adapters come from prompt tags (`<lora:name:unet[:te]>`, found under --lora-dir) and --adapter.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AdapterError
from .library import AdapterIndex
from .tag_options import prompt_adapters

DEMO_PROMPT = "a lighthouse on a cliff at dusk <lora:demo_lora:0.8> <lora:demo_lokr:0.6> <lora:demo_oft:1>"
DEFAULTS = {  # family: (width/height, steps)
    "demo": (128, 12), "sd1": (512, 25), "sd2": (768, 25), "sdxl": (1024, 25),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRID_PARTS = ("unet", "te", "both")


@dataclass
class GridAxis:
    """One swept strength: which part ("unet", "te", "both"), of which adapter (None = all), over which values."""

    part: str
    adapter: str | None
    values: list[float]

    @property
    def label(self) -> str:
        return f"{self.adapter + '.' if self.adapter else ''}{self.part}"


def parse_grid_axis(text: str) -> GridAxis:
    """`unet=0,0.5,1`, `te=0,1`, `both=0,1`, or per adapter `demo_lora.unet=0,1`."""
    key, sep, values = text.partition("=")
    adapter, _, part = key.strip().rpartition(".")
    if not sep or part not in GRID_PARTS or not values.strip():
        raise AdapterError(None, f"bad --grid axis {text!r}: use unet=0,0.5,1, te=0,1, both=… or NAME.unet=…")
    try:
        nums = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise AdapterError(None, f"bad --grid axis {text!r}: the values must be numbers separated by commas") from None
    return GridAxis(part, adapter or None, nums)


def grid_cells(axes: list[GridAxis]) -> list[tuple[int, int, dict]]:
    """(column, row, {axis index: value}) for every cell; first axis along columns, second along rows."""
    cols = axes[0].values if axes else [None]
    rows = axes[1].values if len(axes) > 1 else [None]
    return [(c, r, {i: v for i, v in enumerate((cv, rv)[: len(axes)])})
            for r, rv in enumerate(rows) for c, cv in enumerate(cols)]


def entries_for_cell(base: list[tuple], axes: list[GridAxis], values: dict) -> list:
    """The adapter list of one grid cell: the swept strengths replace the tags' own (block weights are kept)."""
    out = []
    for path, unet, te, *blocks in base:
        name = Path(path).stem.lower()
        for i, value in values.items():
            axis = axes[i]
            if axis.adapter is not None and axis.adapter.lower() != name:
                continue
            if axis.part in ("unet", "both"):
                unet = value
            if axis.part in ("te", "both"):
                te = value
        out.append((path, unet, te, *blocks))
    return out


def parse_adapter_arg(text: str) -> tuple[str, float, float]:
    """`FILE`, `FILE:w` or `FILE:unet:te` (a Windows drive letter is kept in the path)."""
    parts = text.rsplit(":", 2)
    nums = []
    while len(parts) > 1:
        try:
            nums.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    unet = nums[0] if nums else 1.0
    te = nums[1] if len(nums) > 1 else unet
    return path, unet, te


def load_pipeline(checkpoint: str | None, family: str | None = None, dtype: torch.dtype = torch.float32,
                  prediction_type: str | None = None, config_dir: str | None = None):
    """(pipeline, family): the demo when `checkpoint` is None, else a WebUI single-file checkpoint with the
    package's shipped config for its family; nothing is fetched from a model hub."""
    if checkpoint is None:
        from .demo import build_demo_pipeline

        return build_demo_pipeline(dtype=dtype), "demo"
    from .hosts.diffusers import load_checkpoint_pipeline

    return load_checkpoint_pipeline(checkpoint, family, dtype, prediction_type, config_dir)


def label_grid(images: list, cells: list, axes: list[GridAxis]):
    """One PNG: the cells in a grid with a header row/column naming the swept strengths."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = images[0].size
    ncols = max(c for c, _, _ in cells) + 1
    nrows = max(r for _, r, _ in cells) + 1
    font = ImageFont.load_default()
    top = 18 if axes else 0
    left = 70 if len(axes) > 1 else 0
    canvas = Image.new("RGB", (left + ncols * w, top + nrows * h), "white")
    draw = ImageDraw.Draw(canvas)
    for img, (c, r, values) in zip(images, cells):
        canvas.paste(img, (left + c * w, top + r * h))
    if axes:
        for c, v in enumerate(axes[0].values):
            draw.text((left + c * w + 3, 3), f"{axes[0].label}={v:g}", fill="black", font=font)
    if len(axes) > 1:
        for r, v in enumerate(axes[1].values):
            draw.text((3, top + r * h + h // 2 - 6), f"{axes[1].label}={v:g}", fill="black", font=font)
    return canvas


def default_out(family: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("outputs") / "generate" / f"{stamp}-{family}-seed{seed}.png"


def save_png(image, out: Path, info: dict[str, str]) -> None:
    """Write atomically, with the generation parameters as PNG text chunks."""
    from PIL.PngImagePlugin import PngInfo

    out.parent.mkdir(parents=True, exist_ok=True)
    meta = PngInfo()
    for k, v in info.items():
        meta.add_text(k, v)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG", pnginfo=meta)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def quiet_libraries() -> None:
    """Only errors from transformers/diffusers: their import-time notices (torchvision, dtype casts) are noise here."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass


def run_generate(args) -> int:
    from tqdm import tqdm

    from .hosts.diffusers import DiffusersAdapters

    started = time.perf_counter()
    quiet_libraries()
    axes = [parse_grid_axis(a) for a in args.grid or []]
    if len(axes) > 2:
        raise AdapterError(None, f"--grid takes at most two axes (columns, rows), got {len(axes)}")
    demo = args.checkpoint is None
    prompt = args.prompt if args.prompt is not None else (DEMO_PROMPT if demo else "")
    where = "generate (one strength per image)"
    text, tags = prompt_adapters(prompt, lambda name: name, schedules=where)  # names checked below, files later
    neg_text, neg_tags = prompt_adapters(args.negative_prompt or "", lambda name: name)
    if neg_tags:
        raise AdapterError(None, f"adapter tags belong in the prompt, not the negative prompt ({neg_tags[0].tag})")
    explicit = [parse_adapter_arg(a) for a in args.adapter or []]
    for path, _, _ in explicit:
        if not os.path.isfile(path):
            raise AdapterError(path, "no such adapter file")
    if args.out and Path(args.out).suffix.lower() != ".png":
        raise AdapterError(args.out, "the output must be a .png file")

    dirs = list(args.lora_dir or [])
    if demo:
        from .demo import DEMO_ADAPTERS

        demo_dir = Path(args.demo_dir)
        dirs.append(demo_dir)
    index = AdapterIndex(dirs) if dirs else None
    if demo and tags and any(t.path.lower() in DEMO_ADAPTERS for t in tags):
        missing = [n for n in DEMO_ADAPTERS if not (demo_dir / f"{n}.safetensors").is_file()]
    else:
        missing = []
    if tags and index is None:
        raise AdapterError(None, f"the prompt names adapters ({tags[0].tag}) but no --lora-dir was given")
    for t in tags:  # fail on an unknown name before the model loads (demo adapters may not be written yet)
        if not (missing and t.path.lower() in DEMO_ADAPTERS):
            index.find(t.path)

    dtype = DTYPES[args.dtype]
    threads = args.threads or (1 if demo else None)  # the tiny demo's small ops only lose time to thread hand-offs
    if threads:
        torch.set_num_threads(threads)
    print(f"loading {'the embedded demo model' if demo else args.checkpoint} …", flush=True)
    pipe, family = load_pipeline(args.checkpoint, args.family, dtype, args.prediction_type, args.config)
    if missing:
        from .demo import write_demo_adapters

        write_demo_adapters(demo_dir, pipe)
        index.refresh()
        print(f"wrote the demo adapters to {demo_dir}/ ({', '.join(DEMO_ADAPTERS)})")
    size, steps = DEFAULTS.get(family, DEFAULTS["sd1"])
    width, height = args.width or size, args.height or size
    steps = args.steps or steps
    device = torch.device(args.device)
    pipe.to(device)

    found = prompt_adapters(prompt, index.find)[1] if tags else []
    base = [(a.path, a.unet, a.te, (a.lbw, a.x)) if a.lbw else (a.path, a.unet, a.te) for a in found] + explicit
    stems = {Path(p).stem.lower() for p, *_ in base}
    for axis in axes:
        if axis.adapter is not None and axis.adapter.lower() not in stems:
            raise AdapterError(None, f"--grid {axis.label}: no adapter {axis.adapter!r} in the prompt or --adapter list")
    if axes and not base:
        raise AdapterError(None, "--grid sweeps adapter strengths, but the prompt names no adapter")
    adapters = DiffusersAdapters(pipe)
    for path, *_ in base:  # every file read and checked before any weight moves
        adapters.load(path)
    cells = grid_cells(axes)
    images = []
    try:
        bar = tqdm(cells, desc="grid", unit="image", disable=len(cells) == 1 or args.quiet)
        pipe.set_progress_bar_config(disable=len(cells) > 1 or args.quiet, desc="steps")
        for _, _, values in bar:
            entries = entries_for_cell(base, axes, values)
            adapters.apply(entries)
            generator = torch.Generator(device="cpu").manual_seed(args.seed)
            result = pipe(text, negative_prompt=neg_text or None, num_inference_steps=steps, width=width,
                          height=height, guidance_scale=args.cfg, generator=generator)
            images.append(result.images[0])
    finally:
        adapters.restore()
    for path, keys in adapters.unmatched.items():
        if keys:
            print(f"note: {Path(path).name}: {len(keys)} layers match nothing in this model (e.g. {keys[0]})")
    image = label_grid(images, cells, axes) if axes else images[0]
    out = Path(args.out) if args.out else default_out(family, args.seed)
    info = {"prompt": prompt, "negative_prompt": args.negative_prompt or "", "seed": str(args.seed),
            "steps": str(steps), "size": f"{width}x{height}", "cfg": str(args.cfg), "model": args.checkpoint or "demo",
            "adapters": "; ".join(f"{Path(p).name} unet={u:g} te={t:g}" + (f" lbw={b[0][0]}" if b else "")
                                  for p, u, t, *b in base),
            "grid": " ".join(args.grid or [])}
    save_png(image, out, info)
    print(f"saved {out} ({image.size[0]}×{image.size[1]}, {len(images)} image{'s' if len(images) > 1 else ''}, "
          f"{time.perf_counter() - started:.1f} s)")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("generate", help="text-to-image with adapters (diffusers); the embedded demo by default",
                              description=__doc__)
    p.add_argument("prompt", nargs="?", default=None, help="prompt, with <lora:name:unet[:te]> tags")
    p.add_argument("--negative-prompt", "-n", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (demo 12, else 25)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    p.add_argument("--checkpoint", default=None, help="WebUI single-file .safetensors checkpoint (SD1/SD2/SDXL); "
                                                      "default: the embedded demo model")
    p.add_argument("--config", default=None, metavar="DIR",
                   help="a diffusers model folder (model_index.json, component configs, optional tokenizer/) to "
                        "configure --checkpoint; default: the package's shipped config for its family")
    p.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default=None, help="override the detected family")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="SD2 checkpoints: v_prediction (768-v, the default) or epsilon (512 base)")
    p.add_argument("--lora-dir", action="append", help="folder with adapter files (repeatable)")
    p.add_argument("--adapter", action="append", help="FILE[:strength[:te strength]] (repeatable)")
    p.add_argument("--grid", nargs="+", metavar="AXIS", help="sweep strengths: unet=0,0.5,1 te=0,1 (columns, rows)")
    p.add_argument("--out", default=None, help="output PNG (default outputs/generate/<time>-<model>-seed<N>.png)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--demo-dir", default=os.path.join("outputs", "demo-adapters"),
                   help="where the demo adapters are written (default outputs/demo-adapters)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: 1 for the demo, "
                                                                 "torch's own choice otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_generate)
