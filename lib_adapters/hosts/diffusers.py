"""Adapters merged into a diffusers pipeline's own weights (no model conversion), restorable bit-exactly.

    with DiffusersAdapters(pipe) as adapters:
        prompt = adapters.apply_prompt("a fox <lora:my_style:0.8>", lora_dirs=["loras"])
        image = pipe(prompt).images[0]
    # weights are back to the originals here

Works for StableDiffusionPipeline, StableDiffusionXLPipeline and FluxPipeline (or bare unet / transformer / text
encoders), every algorithm the core knows. Each component's parameters form one store named "<component>.<param>"
(LayerMap.for_diffusers); an adapter trained on a fused layer (BFL `img_attn.qkv` on Flux's to_q/to_k/to_v) patches
the stacked parts as one virtual weight (patching.FusedStore), exactly.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence, Union

import torch

from ..adapter import Adapter
from ..errors import AdapterError
from ..library import AdapterIndex
from ..naming import LayerMap, build_plan
from ..patching import FusedStore, ModuleStore, Patcher
from ..naming.blocks import load_presets, parse_block_weights
from ..tag_options import prompt_adapters

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
AdapterSpec = Union[str, os.PathLike, Adapter]
Entry = tuple  # (AdapterSpec, unet strength[, te strength[, lbw]])


class ComponentStore(ModuleStore):
    """Several nn.Modules as one weight store, names prefixed by component ("unet.conv_in.weight")."""

    def __init__(self, components: dict[str, torch.nn.Module]):
        self.prefix = ""
        self.tensors = {}
        for name, module in components.items():
            self.tensors.update(ModuleStore(module, name + ".").tensors)


def pipeline_components(pipe=None, **modules) -> dict[str, torch.nn.Module]:
    """The patchable components of a pipeline (or given directly): unet or transformer, text encoders."""
    found = {}
    for name in COMPONENTS:
        module = modules.get(name)
        if module is None and pipe is not None:
            module = getattr(pipe, name, None)
        if module is not None:
            found[name] = module
    if not found:
        raise AdapterError(None, "no unet, transformer or text encoder to patch: pass a diffusers pipeline or its "
                                 "components")
    return found


class DiffusersAdapters:
    """Merges adapters into a pipeline's weights; `apply` replaces the previous set, `restore` undoes everything."""

    def __init__(self, pipe=None, *, unet=None, transformer=None, text_encoder=None, text_encoder_2=None,
                 text_encoder_3=None, lora_dirs: Sequence[str | os.PathLike] = ()):
        self.components = pipeline_components(pipe, unet=unet, transformer=transformer, text_encoder=text_encoder,
                                              text_encoder_2=text_encoder_2, text_encoder_3=text_encoder_3)
        components = ComponentStore(self.components)
        comps = {name: {k[len(name) + 1:]: v for k, v in components.tensors.items() if k.startswith(name + ".")}
                 for name in self.components}
        self.layer_map = LayerMap.for_diffusers(comps)
        self.store = FusedStore(components, self.layer_map.fused) if self.layer_map.fused else components
        self.patcher = Patcher(self.store)
        self.index = AdapterIndex(list(lora_dirs)) if lora_dirs else None
        self.loaded: dict[str, tuple[float, Adapter]] = {}
        self.unmatched: dict[str, list[str]] = {}
        self.active: list[tuple] = []  # (Adapter, unet, te, blocks)

    @property
    def family(self) -> str:
        return self.layer_map.family

    def load(self, spec: AdapterSpec) -> Adapter:
        """An Adapter from a path, an adapter name under the lora dirs, or an Adapter; files are cached by mtime."""
        if isinstance(spec, Adapter):
            return spec
        path = str(spec)
        if not os.path.exists(path) and self.index is not None and not path.endswith(".safetensors"):
            path = self.index.find(path)
        mtime = os.path.getmtime(path) if os.path.exists(path) else None
        cached = self.loaded.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        adapter = Adapter.load(path)
        self.loaded[path] = (mtime, adapter)
        return adapter

    def resolve(self, entries: Iterable[Entry]) -> list[tuple]:
        """(Adapter, unet, te, blocks) for each entry: (spec, strength), (spec, unet, te) or (spec, unet, te, lbw),
        lbw a block-weight list or preset name as in `lbw=` (or a naming.blocks.BlockWeights)."""
        out = []
        for entry in entries:
            spec, *strengths = entry if isinstance(entry, (tuple, list)) else (entry,)
            unet = float(strengths[0]) if strengths else 1.0
            te = float(strengths[1]) if len(strengths) > 1 else unet
            blocks = strengths[2] if len(strengths) > 2 else None
            if isinstance(blocks, (str, tuple)):  # `lbw=` text, or (text, x=)
                text, x = blocks if isinstance(blocks, tuple) else (blocks, 1.0)
                blocks = parse_block_weights(text, self.family, self.presets(), x, tag=f"lbw={text}")
            out.append((self.load(spec), unet, te, blocks))
        return out

    def presets(self):
        """Block-weight presets: the common ones and `lbwpresets.txt` in the adapter folders."""
        return load_presets([str(d) for d in self.index.dirs] if self.index is not None else [])

    def apply(self, entries: Iterable[Entry]) -> dict[str, int]:
        """Bring the weights to originals + exactly these adapters; all files are checked before any weight moves."""
        resolved = self.resolve(entries)
        plan, self.unmatched = build_plan(resolved, self.layer_map)
        try:
            with torch.no_grad():
                stats = self.patcher.reconcile(plan)
        except BaseException:  # any failure (KeyboardInterrupt, out of memory too): the patcher is at the originals
            self.active = []
            raise
        self.active = resolved
        return stats

    def apply_prompt(self, prompt: str, lora_dirs: Sequence[str | os.PathLike] = ()) -> str:
        """Apply the prompt's `<lora:name:unet[:te]>` tags (names found under the lora dirs); returns the prompt
        without its tags."""
        if lora_dirs:
            self.index = AdapterIndex(list(lora_dirs))
        def find(name):
            if self.index is None:
                raise AdapterError(None, f"the prompt names adapters (<lora:{name}:…>) but no adapter folder was given")
            return self.index.find(name)

        text, found = prompt_adapters(prompt, find, schedules="the diffusers host (one strength per image)")
        presets = self.presets() if any(a.lbw for a in found) else None
        self.apply([(a.path, a.unet, a.te, parse_block_weights(a.lbw, self.family, presets, a.x, a.tag) if a.lbw
                     else None) for a in found])
        return text

    def restore(self) -> None:
        """Every touched weight back to its original bits."""
        with torch.no_grad():
            self.patcher.restore()
        self.active = []

    def __enter__(self) -> "DiffusersAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def apply_adapters(pipe, entries: Iterable[Entry] | str, lora_dirs: Sequence[str | os.PathLike] = (), **components
                   ) -> DiffusersAdapters:
    """Merge `entries` [(file or name, unet strength[, te strength])] or a prompt's tags into `pipe`; returns the
    handle whose `restore()` puts the weights back bit-exactly."""
    handle = DiffusersAdapters(pipe, lora_dirs=lora_dirs, **components)
    if isinstance(entries, str):
        handle.apply_prompt(entries)
    else:
        handle.apply(entries)
    return handle


PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def checkpoint_family(path: str | os.PathLike) -> str:
    """sd1, sd2 or sdxl from a single-file checkpoint's tensor names and shapes (header only)."""
    from ..files import read_header

    header = read_header(path)
    family = LayerMap.for_checkpoint({k: e.shape for k, e in header.entries.items()}).family
    if family not in PIPELINES:
        raise AdapterError(path, "not a Stable Diffusion 1/2/XL checkpoint (no known UNet or text-encoder names); "
                                 "pass --family if it is one")
    return family


def load_checkpoint_pipeline(path: str | os.PathLike, family: str | None = None, dtype: torch.dtype = torch.float32,
                             prediction_type: str | None = None, config_dir: str | os.PathLike | None = None,
                             tokenizers: dict | None = None):
    """(pipeline, family) from a WebUI single-file .safetensors checkpoint, configured from the package's shipped
    diffusers configs (or `config_dir`); tokenizers are built locally, never fetched."""
    import diffusers

    from ..configs import config_dir as shipped_config, family_tokenizers, load_config

    path = str(path)
    from ..files import read_header

    read_header(path)  # refuses pickles and broken files before diffusers opens the file, --family or not
    family = family or checkpoint_family(path)
    folder = str(config_dir or shipped_config(family))
    tokenizers = tokenizers if tokenizers is not None else family_tokenizers(family, folder)
    scheduler_config = load_config(family, "scheduler") if config_dir is None else None
    if scheduler_config is None:
        import json
        from pathlib import Path

        scheduler_config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    if prediction_type:
        scheduler_config["prediction_type"] = prediction_type
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipeline_class = getattr(diffusers, PIPELINES[family])
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} if family != "sdxl" else {}
    try:
        pipe = pipeline_class.from_single_file(path, config=folder, local_files_only=True, torch_dtype=dtype,
                                               scheduler=scheduler, **tokenizers, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise AdapterError(path, f"cannot be loaded as a {family} checkpoint: {str(e).splitlines()[0][:300]}") from None
    return pipe, family
