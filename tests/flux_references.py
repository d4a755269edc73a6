"""Reference Flux adapters made by PEFT on the tiny diffusers twin, merged by PEFT itself, and the same layers written
out in every Flux key format from its documented layout (modern-models.md §2).

`peft_reference(...)` adds a LoRA to every Linear of the tiny FluxTransformer2DModel (alpha ≠ r, alpha_pattern,
rank_pattern, optional rsLoRA/DoRA/lora_bias), randomises it, and ties lora_A within each fused group (q/k/v[/mlp])
so that one fused kohya/XLabs/fal layer can carry them; per-part scales differ and are folded into the fused up.
`merged(strength)` is PEFT's own merge of every layer at that strength (DoRA: blended, as our strength semantics).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import torch

import flux_material as fm


@dataclass
class Reference:
    model: torch.nn.Module  # the PEFT-wrapped diffusers transformer (unmerged)
    base: dict[str, torch.Tensor]  # diffusers base state dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module → (A, B, scale)
    files: dict[str, tuple[dict, dict]] = field(default_factory=dict)  # saved by diffusers: (tensors, metadata)
    dora: bool = False
    bias: bool = False
    _merged: dict = field(default_factory=dict)

    def merged(self, strength: float) -> dict[str, torch.Tensor]:
        """Every weight (and bias) after PEFT merges all layers at `strength`, diffusers names."""
        if strength not in self._merged:
            self._merged[strength] = peft_merged(self.model, strength, self.dora)
        return self._merged[strength]

    def expected(self, strength: float, modules) -> dict[str, torch.Tensor]:
        """The reference state with only `modules` patched (PEFT merges layers independently)."""
        merged, out = self.merged(strength), dict(self.base)
        for m in modules:
            for p in ("weight", "bias"):
                if f"{m}.{p}" in merged:
                    out[f"{m}.{p}"] = merged[f"{m}.{p}"]
        return out


@torch.no_grad()
def peft_merged(model, strength: float, dora: bool) -> dict[str, torch.Tensor]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    m = copy.deepcopy(model)
    for module in m.modules():
        if isinstance(module, BaseTunerLayer):
            if not dora:
                module.scale_layer(strength)
            module.merge(adapter_names=["default"])
    out = {}
    for name, t in m.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = t.detach().clone()
    if dora:
        base = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
        out = {k: base[k] + strength * (v - base[k]) for k, v in out.items()}
    return out


def peft_reference(seed: int = 0, rank: int = 4, alpha: float = 6.0, rslora: bool = False, dora: bool = False,
                   lora_bias: bool = False, patterns: bool = True, save_dir=None) -> Reference:
    from peft import LoraConfig, get_peft_model_state_dict

    model = fm.transformer(seed)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    targets = fm.diffusers_layers(model)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets, use_rslora=rslora,
                     use_dora=dora, lora_bias=lora_bias,
                     alpha_pattern={"proj_mlp": 3.0, "to_add_out": 2.0} if patterns else {},
                     rank_pattern={"ff.net.2": 2, "norm1_context.linear": 3} if patterns else {})
    model.add_adapter(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for _, parts in fm.fused_groups():  # one lora_A per fused group
            first = model.get_submodule(parts[0]).lora_A["default"].weight
            for part in parts[1:]:
                model.get_submodule(part).lora_A["default"].weight.copy_(first)
    factors = {}
    for name in targets:
        layer = model.get_submodule(name)
        factors[name] = (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone(),
                         float(layer.scaling["default"]))
    ref = Reference(model, base, factors, dora=dora, bias=lora_bias)
    if save_dir is not None:
        from diffusers import FluxPipeline
        from safetensors import safe_open

        state = get_peft_model_state_dict(model)
        FluxPipeline.save_lora_weights(save_dir, transformer_lora_layers=state,
                                       transformer_lora_adapter_metadata=cfg.to_dict())
        path = f"{save_dir}/pytorch_lora_weights.safetensors"
        with safe_open(path, "pt") as f:
            ref.files["diffusers"] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return ref


def _lora(prefix: str, down, up, alpha=None, spelling=("lora_down.weight", "lora_up.weight")) -> dict:
    out = {f"{prefix}.{spelling[0]}": down.contiguous(), f"{prefix}.{spelling[1]}": up.contiguous()}
    if alpha is not None:
        out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return out


def fused_factors(ref: Reference, parts, with_scale: float | None):
    """(down, up) of one fused layer: the group's shared A, the parts' B stacked with each part's scale folded in
    relative to `with_scale` (None: absolute, for formats without alpha)."""
    down = ref.factors[parts[0]][0]
    ups = [b * (s / with_scale if with_scale else s) for _, b, s in (ref.factors[p] for p in parts)]
    return down, torch.cat(ups)


def bfl_layers(ref: Reference, with_alpha: bool = True):
    """(BFL module, down, up, alpha or None) for every layer: fused groups fused, the final adaLN swapped."""
    grouped = {p for _, parts in fm.fused_groups() for p in parts}
    for bfl, parts in fm.fused_groups():
        scale = ref.factors[parts[0]][2]
        down, up = fused_factors(ref, parts, scale if with_alpha else None)
        yield bfl, down, up, scale * down.shape[0] if with_alpha else None
    for module, (a, b, s) in ref.factors.items():
        if module in grouped:
            continue
        bfl, rows, swapped = fm.bfl_of(module)
        assert rows is None
        up = fm.swap(b) if swapped else b
        yield bfl, a, up if with_alpha else up * s, s * a.shape[0] if with_alpha else None


def kohya(ref: Reference) -> dict:
    out = {}
    for bfl, down, up, alpha in bfl_layers(ref):
        out.update(_lora(fm.kohya_name(bfl), down, up, alpha))
    return out


def split_qkv_kohya(ref: Reference) -> tuple[dict, dict[str, float]]:
    """kohya `split_qkv=True` files: fused layers stored as cat(downs) [n·r, in] and a block-diagonal up, alpha as
    trained (alpha/r per split). Loaders apply alpha/(n·r); the alpha written here makes that equal the reference.
    Returns (tensors, {module: training-time scale})."""
    out, trained = {}, {}
    for bfl, parts in fm.fused_groups():
        scale = ref.factors[parts[0]][2]
        r = ref.factors[parts[0]][0].shape[0]
        down = torch.cat([ref.factors[p][0] for p in parts])
        widths = [b.shape[0] for _, b, _ in (ref.factors[p] for p in parts)]
        up = torch.zeros(sum(widths), r * len(parts))
        lo = 0
        for j, p in enumerate(parts):
            a, b, s = ref.factors[p]
            up[lo:lo + widths[j], j * r:(j + 1) * r] = b * (s / scale)
            lo += widths[j]
        alpha = scale * r * len(parts)
        out.update(_lora(fm.kohya_name(bfl), down, up, alpha))
        trained[fm.kohya_name(bfl)] = alpha / r
    return out, trained


def comfy(ref: Reference) -> dict:
    out = {}
    for bfl, down, up, alpha in bfl_layers(ref):
        out.update(_lora(f"diffusion_model.{bfl}", down, up, alpha))
    return out


def fal(ref: Reference) -> dict:
    """fal Kontext: `base_model.model.` + BFL names, PEFT suffixes, no alpha (scale 1: folded into B)."""
    out = {}
    for bfl, down, up, _ in bfl_layers(ref, with_alpha=False):
        out.update(_lora(f"base_model.model.{bfl}", down, up, None, ("lora_A.weight", "lora_B.weight")))
    return out


def onetrainer_legacy(ref: Reference) -> dict:
    out = {}
    for module, (a, b, s) in ref.factors.items():
        out.update(_lora("lora_transformer_" + module.replace(".", "_"), a, b, s * a.shape[0]))
    return out


def omi(ref: Reference) -> dict:
    """OMI: `transformer.` + BFL names, fused layers split by index (`img_attn.qkv.0`), `img_in.proj`."""
    out = {}
    for module, (a, b, s) in ref.factors.items():
        bfl, rows, swapped = fm.bfl_of(module)
        if rows is not None:
            bfl = f"{bfl}.{rows[0] // fm.H}"
        if bfl == "img_in":
            bfl = "img_in.proj"
        out.update(_lora(f"transformer.{bfl}", a, fm.swap(b) if swapped else b, s * a.shape[0]))
    return out


def xlabs(ref: Reference) -> tuple[dict, set[str]]:
    """XLabs: attention only (double qkv/proj of both streams, single qkv on linear1's first 3H rows, proj on
    linear2), `.down/.up`, no alpha. Returns (tensors, diffusers modules it covers)."""
    out, covered = {}, set()
    for n in range(fm.CONFIG["num_layers"]):
        d = f"transformer_blocks.{n}."
        for lora, parts, proj in (("1", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0"),
                                  ("2", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.to_add_out")):
            down, up = fused_factors(ref, [d + p for p in parts], None)
            out.update(_lora(f"double_blocks.{n}.processor.qkv_lora{lora}", down, up, None, ("down.weight", "up.weight")))
            a, b, s = ref.factors[d + proj]
            out.update(_lora(f"double_blocks.{n}.processor.proj_lora{lora}", a, b * s, None, ("down.weight", "up.weight")))
            covered.update([d + p for p in parts] + [d + proj])
    for n in range(fm.CONFIG["num_single_layers"]):
        d = f"single_transformer_blocks.{n}."
        parts = [d + p for p in ("attn.to_q", "attn.to_k", "attn.to_v")]
        down, up = fused_factors(ref, parts, None)
        out.update(_lora(f"single_blocks.{n}.processor.qkv_lora", down, up, None, ("down.weight", "up.weight")))
        a, b, s = ref.factors[d + "proj_out"]
        out.update(_lora(f"single_blocks.{n}.processor.proj_lora", a, b * s, None, ("down.weight", "up.weight")))
        covered.update(parts + [d + "proj_out"])
    return out, covered


def bfl_control(ref: Reference, norms: dict[str, torch.Tensor]) -> dict:
    """BFL Control LoRA: every Linear `lora_A`/`lora_B` (+ `lora_B.bias`), scale 1, bare BFL names, plus the norm
    gains it replaces (`norms`: BFL `…_norm.scale` → value)."""
    out = {}
    for bfl, down, up, _ in bfl_layers(ref, with_alpha=False):
        out.update(_lora(bfl, down, up, None, ("lora_A.weight", "lora_B.weight")))
    if ref.bias:
        for bfl, parts in fm.fused_groups():
            out[f"{bfl}.lora_B.bias"] = torch.cat([bias_of(ref, p) for p in parts])
        grouped = {p for _, parts in fm.fused_groups() for p in parts}
        for module in ref.factors:
            if module not in grouped:
                bfl, _, swapped = fm.bfl_of(module)
                b = bias_of(ref, module)
                out[f"{bfl}.lora_B.bias"] = fm.swap(b) if swapped else b
    out.update(norms)
    return out


def bias_of(ref: Reference, module: str) -> torch.Tensor:
    """γ·b of a PEFT lora_B bias (folded: the BFL Control format has scale 1)."""
    layer = ref.model.get_submodule(module)
    return layer.lora_B["default"].bias.detach() * float(layer.scaling["default"])


def metadata_json(cfg: dict) -> dict:
    return {"format": "pt", "lora_adapter_metadata": json.dumps(cfg)}
