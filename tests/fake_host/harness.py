"""One fake WebUI with the extension loaded: folders, models, generation and weight snapshots for the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

import fake_host

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@torch.no_grad()
def effective(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) a Linear/Conv2d forward applies, from its outputs on basis inputs (float64)."""
    w = layer.weight
    dtype = w.dtype
    if w.ndim == 2:
        zero = layer(torch.zeros(1, w.shape[1], dtype=dtype)).double()
        out = layer(torch.eye(w.shape[1], dtype=dtype)).double() - zero
        return out.T.contiguous(), zero[0]
    o, i, kh, kw = w.shape
    basis = torch.eye(i * kh * kw, dtype=dtype).reshape(i * kh * kw, i, kh, kw)
    zero = layer(torch.zeros(1, i, kh, kw, dtype=dtype)).double()
    full = layer(basis).double()
    ph, pw = full.shape[2] // 2, full.shape[3] // 2
    centre = (full - zero)[:, :, ph, pw]
    return centre.T.reshape(o, i, kh, kw).contiguous(), zero[0, :, ph, pw]


@dataclass
class Host:
    flavour: str
    data: str
    lora_dir: str
    shared: object
    models: dict = field(default_factory=dict)

    @property
    def runtime(self):
        from lib_adapters.hosts.runtime import RUNTIME
        return RUNTIME

    def set_option(self, key, value):
        self.shared.opts.set(key, value)

    def use(self, model):
        self.shared.sd_model = model
        return model

    def params(self, model=None) -> dict[str, torch.Tensor]:
        """Every live parameter of the current model by name (Forge: `u.`/`c.` + UNet/CLIP names)."""
        model = model if model is not None else self.shared.sd_model
        if self.flavour == "forge":
            base = model.forge_objects_original
            out = {"u." + k: v for k, v in base.unet.model.named_parameters()}
            out.update({"c." + k: v for k, v in base.clip.cond_stage_model.named_parameters()})
            return out
        return dict(model.named_parameters())

    def roots(self, model=None) -> dict[str, torch.nn.Module]:
        """Name prefix → module whose named parameters `params` lists."""
        model = model if model is not None else self.shared.sd_model
        if self.flavour == "forge":
            base = model.forge_objects_original
            return {"u.": base.unet.model, "c.": base.clip.cond_stage_model}
        return {"": model}

    def snapshot(self, model=None, effective_weights=False) -> dict[str, torch.Tensor]:
        """Every parameter as stored; with `effective_weights`, as the sampler computes with it: a plain float
        layer whose forward the extension replaced (the forward path) shows the effective weight and bias read off
        its outputs on basis inputs."""
        out = {k: v.detach().clone() for k, v in self.params(model).items()}
        if not effective_weights:
            return out
        for prefix, root in self.roots(model).items():
            for name, module in root.named_modules():
                layer = isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "forward" in module.__dict__
                if layer and module.weight.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                    w, b = effective(module)
                    out[f"{prefix}{name}.weight"] = w.to(module.weight.dtype)
                    if module.bias is not None:
                        out[f"{prefix}{name}.bias"] = b.to(module.bias.dtype)
        return out

    def generate(self, prompt, per_step=False, **kw):
        """Run one generation; returns (Processed, {phase: [snapshot as the sampler's first call sees it, one per
        batch]}, p); with `per_step`, also {phase + " steps": [(step, effective weights) for every model call]}."""
        from modules import processing

        seen = {}
        p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, **kw)

        def step(phase, i, p):
            seen.setdefault(phase + " steps", []).append((i, self.snapshot(effective_weights=True)))

        res = processing.process_images(p, observe=lambda phase, p: seen.setdefault(phase, []).append(self.snapshot()),
                                        observe_step=step if per_step else None)
        return res, seen, p


def start(tmp_path, flavour="a1111", builtin=None, load=True) -> Host:
    """Install the fake host in `tmp_path`, optionally with the builtin Lora enabled, load the extension and run
    before_ui (as the host does at start-up)."""
    shared = fake_host.install(flavour, tmp_path)
    lora_dir = os.path.join(str(tmp_path), "Lora")
    os.makedirs(lora_dir, exist_ok=True)
    shared.cmd_opts.lora_dir = lora_dir
    shared.cmd_opts.lyco_dir_backcompat = os.path.join(str(tmp_path), "LyCORIS")
    from modules import extensions, hashes

    hashes.calls.clear()
    if builtin:
        extensions.extensions.append(extensions.Extension(builtin, os.path.join(str(tmp_path), builtin), True, True))
    if load:
        fake_host.load_extension(ROOT)
        from modules import script_callbacks
        script_callbacks.before_ui_callback()
    return Host(flavour, str(tmp_path), lora_dir, shared)
