"""Tiny model trees with the hosts' real module names (host-contract §5.1, §7, §11.2-11.3).

UNet: the ldm/sgm `diffusion_model` topology of SD1, SD2 and SDXL (block indices, resnet/attention parts, proj_in
kind, transformer depths) at tiny widths. Text encoders: HF CLIPTextModel layout (SD1, SDXL CLIP-L, every Forge
encoder) and OpenCLIP layout with a real nn.MultiheadAttention (A1111 SD2, SDXL CLIP-G). A1111 objects keep the
hijack's `.wrapped` level. Seeded random weights; float32 unless `dtype` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
from torch import nn

C = 8           # UNet base channels
G = 2           # GroupNorm groups
TE = {"sd1": {"l": 16}, "sd2": {"h": 16}, "sdxl": {"l": 16, "g": 24}}
TE_LAYERS = 2


def put(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Place `module` at `dotted`, creating plain containers on the way."""
    *path, last = dotted.split(".")
    node = root
    for name in path:
        if not hasattr(node, name):
            node.add_module(name, nn.Module())
        node = getattr(node, name)
    node.add_module(last, module)


def resblock(root, at, cin, cout, emb):
    put(root, f"{at}.in_layers.0", nn.GroupNorm(G, cin))
    put(root, f"{at}.in_layers.2", nn.Conv2d(cin, cout, 3, padding=1))
    put(root, f"{at}.emb_layers.1", nn.Linear(emb, cout))
    put(root, f"{at}.out_layers.0", nn.GroupNorm(G, cout))
    put(root, f"{at}.out_layers.3", nn.Conv2d(cout, cout, 3, padding=1))
    if cin != cout:
        put(root, f"{at}.skip_connection", nn.Conv2d(cin, cout, 1))


def transformer(root, at, ch, ctx, depth, linear_proj):
    put(root, f"{at}.norm", nn.GroupNorm(G, ch))
    put(root, f"{at}.proj_in", nn.Linear(ch, ch) if linear_proj else nn.Conv2d(ch, ch, 1))
    for d in range(depth):
        b = f"{at}.transformer_blocks.{d}"
        for a, kv in (("attn1", ch), ("attn2", ctx)):
            put(root, f"{b}.{a}.to_q", nn.Linear(ch, ch, bias=False))
            put(root, f"{b}.{a}.to_k", nn.Linear(kv, ch, bias=False))
            put(root, f"{b}.{a}.to_v", nn.Linear(kv, ch, bias=False))
            put(root, f"{b}.{a}.to_out.0", nn.Linear(ch, ch))
        put(root, f"{b}.ff.net.0.proj", nn.Linear(ch, 8 * ch))
        put(root, f"{b}.ff.net.2", nn.Linear(4 * ch, ch))
        for n in (1, 2, 3):
            put(root, f"{b}.norm{n}", nn.LayerNorm(ch))
    put(root, f"{at}.proj_out", nn.Linear(ch, ch) if linear_proj else nn.Conv2d(ch, ch, 1))


def ldm_unet(family: str) -> nn.Module:
    """`diffusion_model` with the ldm (SD1/SD2) or sgm (SDXL) block layout."""
    u = nn.Module()
    emb = 4 * C
    put(u, "time_embed.0", nn.Linear(C, emb))
    put(u, "time_embed.2", nn.Linear(emb, emb))
    ctx = {"sd1": 16, "sd2": 16, "sdxl": 40}[family]
    linear = family != "sd1"
    if family == "sdxl":
        mult, depth = (1, 2, 4), (0, 2, 10)
        put(u, "label_emb.0.0", nn.Linear(12, emb))
        put(u, "label_emb.0.2", nn.Linear(emb, emb))
    else:
        mult, depth = (1, 2, 4, 4), (1, 1, 1, 0)
    put(u, "input_blocks.0.0", nn.Conv2d(4, C, 3, padding=1))
    chans, ch, i = [C], C, 1
    for level, m in enumerate(mult):
        for _ in range(2):
            resblock(u, f"input_blocks.{i}.0", ch, m * C, emb)
            ch = m * C
            if depth[level]:
                transformer(u, f"input_blocks.{i}.1", ch, ctx, depth[level], linear)
            chans.append(ch)
            i += 1
        if level != len(mult) - 1:
            put(u, f"input_blocks.{i}.0.op", nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            chans.append(ch)
            i += 1
    resblock(u, "middle_block.0", ch, ch, emb)
    transformer(u, "middle_block.1", ch, ctx, depth[-1] or 1 if family != "sdxl" else 10, linear)
    resblock(u, "middle_block.2", ch, ch, emb)
    o = 0
    for level, m in reversed(list(enumerate(mult))):
        for j in range(3):
            skip = chans.pop()
            resblock(u, f"output_blocks.{o}.0", ch + skip, m * C, emb)
            ch = m * C
            part = 1
            if depth[level]:
                transformer(u, f"output_blocks.{o}.1", ch, ctx, depth[level], linear)
                part = 2
            if level and j == 2:
                put(u, f"output_blocks.{o}.{part}.conv", nn.Conv2d(ch, ch, 3, padding=1))
            o += 1
    put(u, "out.0", nn.GroupNorm(G, ch))
    put(u, "out.2", nn.Conv2d(ch, 4, 3, padding=1))
    return u


def hf_clip(width: int, projection: bool = False) -> nn.Module:
    """HF CLIPTextModel layout: text_model.embeddings / encoder.layers.N / final_layer_norm."""
    t = nn.Module()
    put(t, "text_model.embeddings.token_embedding", nn.Embedding(64, width))
    put(t, "text_model.embeddings.position_embedding", nn.Embedding(8, width))
    for n in range(TE_LAYERS):
        b = f"text_model.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            put(t, f"{b}.self_attn.{proj}", nn.Linear(width, width))
        put(t, f"{b}.layer_norm1", nn.LayerNorm(width))
        put(t, f"{b}.mlp.fc1", nn.Linear(width, 4 * width))
        put(t, f"{b}.mlp.fc2", nn.Linear(4 * width, width))
        put(t, f"{b}.layer_norm2", nn.LayerNorm(width))
    put(t, "text_model.final_layer_norm", nn.LayerNorm(width))
    if projection:
        put(t, "text_projection", nn.Linear(width, width, bias=False))
    return t


def open_clip(width: int) -> nn.Module:
    """OpenCLIP text tower: model.transformer.resblocks.N.attn is a real nn.MultiheadAttention (fused in_proj)."""
    m = nn.Module()
    put(m, "model.token_embedding", nn.Embedding(64, width))
    m.model.positional_embedding = nn.Parameter(torch.zeros(8, width))
    for n in range(TE_LAYERS):
        b = f"model.transformer.resblocks.{n}"
        put(m, f"{b}.ln_1", nn.LayerNorm(width))
        put(m, f"{b}.attn", nn.MultiheadAttention(width, 2))
        put(m, f"{b}.ln_2", nn.LayerNorm(width))
        put(m, f"{b}.mlp.c_fc", nn.Linear(width, 4 * width))
        put(m, f"{b}.mlp.c_proj", nn.Linear(4 * width, width))
    put(m, "model.ln_final", nn.LayerNorm(width))
    m.model.text_projection = nn.Parameter(torch.zeros(width, width))
    return m


def wrapped(inner: nn.Module) -> nn.Module:
    """The A1111 hijack wrapper: the original embedder under `.wrapped`."""
    w = nn.Module()
    w.wrapped = inner
    return w


def randomize(module: nn.Module, seed: int, dtype=torch.float32) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(module.state_dict(keep_vars=True).items()):
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.1)
    return module.to(dtype)


@dataclass
class CheckpointInfo:
    filename: str
    title: str
    sha256: str = "0" * 64
    model_name: str = "fake"


class A1111Model(nn.Module):
    """What `shared.sd_model` is in A1111 1.10: LatentDiffusion (SD1/SD2) or DiffusionEngine (SDXL), hijacked."""

    def __init__(self, family: str, seed: int = 0, dtype=torch.float32):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = ldm_unet(family)
        if family == "sd1":
            inner = nn.Module()
            inner.transformer = hf_clip(TE["sd1"]["l"])
            self.cond_stage_model = wrapped(inner)
        elif family == "sd2":
            self.cond_stage_model = wrapped(open_clip(TE["sd2"]["h"]))
        else:
            e0 = nn.Module()
            e0.transformer = hf_clip(TE["sdxl"]["l"])
            self.conditioner = nn.Module()
            self.conditioner.embedders = nn.ModuleList([wrapped(e0), wrapped(open_clip(TE["sdxl"]["g"]))])
            self.cond_stage_model = self.conditioner  # as webui sets it for SDXL
        self.first_stage_model = nn.Conv2d(4, 3, 1)
        randomize(self, seed, dtype)
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = family == "sd1", family == "sd2", family == "sdxl", False
        self.sd_checkpoint_info = CheckpointInfo(f"/models/{family}-{seed}.safetensors", f"{family}-{seed}")
        self.sd_model_hash = f"{seed:010d}"


@dataclass
class ForgeObjects:
    unet: object
    clip: object
    vae: object = None
    clipvision: object = None

    def shallow_copy(self):
        return replace(self)


class KModel(nn.Module):
    def __init__(self, family, dtype):
        super().__init__()
        self.diffusion_model = ldm_unet(family)
        self.storage_dtype = dtype
        self.computation_dtype = dtype


def quantize_unet(kmodel: nn.Module, storage: str) -> None:
    """Forge's "Diffusion in Low Bits" / GGUF load on the fake UNet: every Linear/Conv2d becomes Forge's layer class
    (tests/fake_host/forge/backend/operations.py). "fp8": every parameter float8_e4m3fn (Forge casts the whole
    model), compute float32. "gguf": Linears whose width fits Q8_0 blocks hold real Q8_0 tensors, the rest floats."""
    from backend.operations import ForgeOperations, ForgeOperationsGGUF
    from backend.operations_gguf import quantize
    from gguf import GGMLQuantizationType

    fp8 = torch.float8_e4m3fn
    for name, module in list(kmodel.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        parent = kmodel.get_submodule(parent_name) if parent_name else kmodel
        if storage == "fp8" and isinstance(module, nn.Linear):
            new = ForgeOperations.Linear(module.in_features, module.out_features, module.bias is not None, dtype=fp8)
            new.weight.data = module.weight.data.to(fp8)
            if module.bias is not None:
                new.bias.data = module.bias.data.to(fp8)
        elif storage == "fp8" and isinstance(module, nn.Conv2d):
            new = ForgeOperations.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                         module.padding).requires_grad_(False)
            new.weight.data, new.bias.data = module.weight.data.to(fp8), module.bias.data.to(fp8)
        elif storage == "gguf" and isinstance(module, nn.Linear) and module.in_features % 32 == 0:
            weight = quantize(module.weight.data, GGMLQuantizationType.Q8_0)
            weight.computation_dtype = torch.float32
            weight.gguf_cls.bake(weight)
            bias = nn.Parameter(module.bias.data, requires_grad=False) if module.bias is not None else None
            new = ForgeOperationsGGUF.Linear(weight, bias)
        else:
            continue
        setattr(parent, leaf, new)
    if storage == "fp8":
        for p in kmodel.parameters():
            p.data = p.data.to(fp8)
    kmodel.storage_dtype = fp8 if storage == "fp8" else storage
    kmodel.computation_dtype = torch.float32


def forge_engine(family: str, seed: int = 0, dtype=torch.float32, storage: str | None = None):
    """A Forge diffusion engine: forge_objects(_original, _after_applying_lora) with UnetPatcher and CLIP; `storage`
    ("fp8", "gguf") quantizes the UNet as Forge loads it."""
    from backend.patcher.clip import CLIP
    from backend.patcher.unet import UnetPatcher

    kmodel = randomize(KModel(family, dtype), seed, dtype)
    kmodel.storage_dtype = kmodel.computation_dtype = dtype
    if storage:
        quantize_unet(kmodel, storage)

    def integrated(width):
        m = nn.Module()
        m.transformer = hf_clip(width, projection=True)
        return m

    names = {"sd1": {"clip_l": 16}, "sd2": {"clip_h": 16}, "sdxl": {"clip_l": 16, "clip_g": 24}}[family]
    clip = CLIP({k: integrated(w) for k, w in names.items()})
    randomize(clip.cond_stage_model, seed + 1, dtype)
    unet = UnetPatcher(kmodel, torch.device("cpu"), torch.device("cpu"))
    objs = ForgeObjects(unet, clip)
    engine = SimpleNamespace(
        is_sd1=family == "sd1", is_sd2=family == "sd2", is_sdxl=family == "sdxl", is_sd3=False,
        cond_stage_model=None, first_stage_model=None,
        forge_objects=objs.shallow_copy(), forge_objects_original=objs.shallow_copy(),
        forge_objects_after_applying_lora=objs.shallow_copy(), current_lora_hash="[]",
        sd_checkpoint_info=CheckpointInfo(f"/models/{family}-{seed}.safetensors", f"{family}-{seed}"),
        sd_model_hash=f"{seed:010d}", extra_generation_params={}, comments=[],
    )
    return engine


# ---- Forge's Flux engine (backend/diffusion_engine/flux.py, backend/nn/flux.py, backend/nn/t5.py) ----------------

class RMSNorm(nn.Module):
    """Forge's Flux RMSNorm: the gain is a Parameter named `scale`."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


def flux_transformer(hidden=16, mlp=64, heads=2, double=2, single=2, in_channels=1, vec=20, context=24,
                     guidance=True) -> nn.Module:
    """`IntegratedFluxTransformer2DModel`'s parameter tree (BFL names): img_in takes in_channels·4 (2×2 patches)."""
    m = nn.Module()
    head = hidden // heads
    put(m, "img_in", nn.Linear(in_channels * 4, hidden))
    for emb, width in (("time_in", 256), ("vector_in", vec)) + ((("guidance_in", 256),) if guidance else ()):
        put(m, f"{emb}.in_layer", nn.Linear(width, hidden))
        put(m, f"{emb}.out_layer", nn.Linear(hidden, hidden))
    put(m, "txt_in", nn.Linear(context, hidden))
    for n in range(double):
        b = f"double_blocks.{n}"
        for s in ("img", "txt"):
            put(m, f"{b}.{s}_mod.lin", nn.Linear(hidden, 6 * hidden))
            put(m, f"{b}.{s}_attn.qkv", nn.Linear(hidden, 3 * hidden))
            put(m, f"{b}.{s}_attn.norm.query_norm", RMSNorm(head))
            put(m, f"{b}.{s}_attn.norm.key_norm", RMSNorm(head))
            put(m, f"{b}.{s}_attn.proj", nn.Linear(hidden, hidden))
            put(m, f"{b}.{s}_mlp", nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"),
                                                 nn.Linear(mlp, hidden)))
    for n in range(single):
        b = f"single_blocks.{n}"
        put(m, f"{b}.linear1", nn.Linear(hidden, 3 * hidden + mlp))
        put(m, f"{b}.linear2", nn.Linear(hidden + mlp, hidden))
        put(m, f"{b}.norm.query_norm", RMSNorm(head))
        put(m, f"{b}.norm.key_norm", RMSNorm(head))
        put(m, f"{b}.modulation.lin", nn.Linear(hidden, 3 * hidden))
    put(m, "final_layer.linear", nn.Linear(hidden, in_channels * 4))
    put(m, "final_layer.adaLN_modulation", nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden)))
    return m


def integrated_t5(width=24, ff=48, heads=3, layers=2, vocab=99) -> nn.Module:
    """`IntegratedT5`: `transformer.shared`, `transformer.encoder.block.N.layer.{0,1}…` (gated-gelu), `logit_scale`."""
    t = nn.Module()
    put(t, "transformer.shared", nn.Embedding(vocab, width))
    for n in range(layers):
        b = f"transformer.encoder.block.{n}.layer"
        for proj in ("q", "k", "v", "o"):
            put(t, f"{b}.0.SelfAttention.{proj}", nn.Linear(width, width, bias=False))
        if n == 0:
            put(t, f"{b}.0.SelfAttention.relative_attention_bias", nn.Embedding(32, heads))
        put(t, f"{b}.0.layer_norm", nn.LayerNorm(width, bias=False))
        put(t, f"{b}.1.DenseReluDense.wi_0", nn.Linear(width, ff, bias=False))
        put(t, f"{b}.1.DenseReluDense.wi_1", nn.Linear(width, ff, bias=False))
        put(t, f"{b}.1.DenseReluDense.wo", nn.Linear(ff, width, bias=False))
        put(t, f"{b}.1.layer_norm", nn.LayerNorm(width, bias=False))
    put(t, "transformer.encoder.final_layer_norm", nn.LayerNorm(width, bias=False))
    t.logit_scale = nn.Parameter(torch.tensor(4.6055))
    return t


class FluxKModel(nn.Module):
    def __init__(self, dtype, **sizes):
        super().__init__()
        self.diffusion_model = flux_transformer(**sizes)
        self.storage_dtype = self.computation_dtype = dtype


class Flux(SimpleNamespace):
    """Forge's `Flux` engine: no is_sd* flag set (all False), CLIP with `clip_l` and `t5xxl`."""


def forge_flux_engine(seed: int = 0, dtype=torch.float32, transformer_state: dict | None = None):
    """A Forge Flux engine; `transformer_state` (BFL names) replaces the seeded transformer weights."""
    from backend.patcher.clip import CLIP
    from backend.patcher.unet import UnetPatcher

    kmodel = randomize(FluxKModel(dtype), seed, dtype)
    if transformer_state is not None:
        kmodel.diffusion_model.load_state_dict(transformer_state)
        kmodel.to(dtype)
    clip_l = nn.Module()
    clip_l.transformer = hf_clip(16, projection=True)
    clip = CLIP({"clip_l": clip_l, "t5xxl": integrated_t5()})
    randomize(clip.cond_stage_model, seed + 1, dtype)
    unet = UnetPatcher(kmodel, torch.device("cpu"), torch.device("cpu"))
    objs = ForgeObjects(unet, clip)
    return Flux(
        is_sd1=False, is_sd2=False, is_sdxl=False, is_sd3=False, use_distilled_cfg_scale=True,
        cond_stage_model=None, first_stage_model=None,
        forge_objects=objs.shallow_copy(), forge_objects_original=objs.shallow_copy(),
        forge_objects_after_applying_lora=objs.shallow_copy(), current_lora_hash="[]",
        sd_checkpoint_info=CheckpointInfo(f"/models/flux-{seed}.safetensors", f"flux-{seed}"),
        sd_model_hash=f"{seed:010d}", extra_generation_params={}, comments=[],
    )
