"""SD3 as the hosts hold it, at tiny widths, with their real module names.

A1111 1.10 (`modules/models/sd3/`): `SD3Inferencer` = `model` (BaseModel: `diffusion_model` MMDiT with SAI names,
`model_sampling.sigmas`), `first_stage_model`, and `text_encoders` (SD3Cond: `clip_g`, `clip_l`, `t5xxl` — None
when the `sd3_enable_t5` setting is off — registered again under `model_lg` and `model_t5`); `cond_stage_model` is a
property returning `text_encoders`; nothing is hijack-wrapped. Its MMDiT has no q/k norm and no `attn2` (SD3 Medium).
Its CLIPs are `SDClipModel`s (`transformer` = `text_model.*` + `text_projection`, plus `logit_scale`); its T5 is
`transformer.encoder.{embed_tokens, block.N.layer.*, final_layer_norm}`.

Forge (`backend/diffusion_engine/sd35.py`, `backend/nn/mmditx.py`): the UNet patcher's KModel holds the MMDiTX under
`diffusion_model.` (SD3.5: `ln_q`/`ln_k`; SD3.5 Medium: `x_block.attn2` and 9-chunk modulation on those blocks);
CLIP holds `clip_l`/`clip_g` (IntegratedCLIP: HF CLIPTextModel + `text_projection`) and `t5xxl` (IntegratedT5:
`transformer.shared`, `transformer.encoder.block.N…`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from fake_host.models import CheckpointInfo, ForgeObjects, hf_clip, put, randomize

H = 32          # MMDiT width (4 heads × 8 here; the real models use 64 per head)
DEPTH = 3
CTX = 40        # context_embedder input (T5/CLIP width, padded)
ADM = 40        # pooled CLIP-L + CLIP-G
T5_WIDTH, T5_FF, T5_LAYERS = 32, 64, 2
CLIP_L, CLIP_G = 16, 24


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


def mmdit(qk_norm: bool = False, attn2_layers=(), depth: int = DEPTH) -> nn.Module:
    """The SAI MMDiT tree (`joint_blocks.N.{context,x}_block…`, embedders, final layer); the last context block is
    pre-only."""
    m = nn.Module()
    put(m, "x_embedder.proj", nn.Conv2d(16, H, 2, stride=2))
    put(m, "t_embedder.mlp.0", nn.Linear(256, H))
    put(m, "t_embedder.mlp.2", nn.Linear(H, H))
    put(m, "y_embedder.mlp.0", nn.Linear(ADM, H))
    put(m, "y_embedder.mlp.2", nn.Linear(H, H))
    put(m, "context_embedder", nn.Linear(CTX, H))
    m.register_buffer("pos_embed", torch.zeros(1, 16, H))
    for i in range(depth):
        for block in ("context_block", "x_block"):
            pre_only = block == "context_block" and i == depth - 1
            b = f"joint_blocks.{i}.{block}"
            attns = ("attn", "attn2") if block == "x_block" and i in attn2_layers else ("attn",)
            for a in attns:
                put(m, f"{b}.{a}.qkv", nn.Linear(H, 3 * H))
                if not pre_only:
                    put(m, f"{b}.{a}.proj", nn.Linear(H, H))
                if qk_norm:
                    put(m, f"{b}.{a}.ln_q", RMSNorm(8))
                    put(m, f"{b}.{a}.ln_k", RMSNorm(8))
            if not pre_only:
                put(m, f"{b}.mlp.fc1", nn.Linear(H, 4 * H))
                put(m, f"{b}.mlp.fc2", nn.Linear(4 * H, H))
            chunks = 2 if pre_only else 9 if len(attns) == 2 else 6
            put(m, f"{b}.adaLN_modulation.1", nn.Linear(H, chunks * H))
    put(m, "final_layer.linear", nn.Linear(H, 2 * 2 * 16))
    put(m, "final_layer.adaLN_modulation.1", nn.Linear(H, 2 * H))
    return m


def t5(embedding: str) -> nn.Module:
    """A T5 encoder stack: `encoder.block.N.layer.{0.SelfAttention.{q,k,v,o}, 1.DenseReluDense.{wi_0,wi_1,wo}}`;
    the token embedding is `encoder.embed_tokens` (A1111) or `shared` (Forge, HF)."""
    t = nn.Module()
    put(t, embedding, nn.Embedding(100, T5_WIDTH))
    for n in range(T5_LAYERS):
        b = f"encoder.block.{n}.layer"
        for proj in "qkvo":
            put(t, f"{b}.0.SelfAttention.{proj}", nn.Linear(T5_WIDTH, T5_WIDTH, bias=False))
        if n == 0:
            put(t, f"{b}.0.SelfAttention.relative_attention_bias", nn.Embedding(32, 4))
        put(t, f"{b}.0.layer_norm", RMSNorm(T5_WIDTH))
        put(t, f"{b}.1.DenseReluDense.wi_0", nn.Linear(T5_WIDTH, T5_FF, bias=False))
        put(t, f"{b}.1.DenseReluDense.wi_1", nn.Linear(T5_WIDTH, T5_FF, bias=False))
        put(t, f"{b}.1.DenseReluDense.wo", nn.Linear(T5_FF, T5_WIDTH, bias=False))
        put(t, f"{b}.1.layer_norm", RMSNorm(T5_WIDTH))
    put(t, "encoder.final_layer_norm", RMSNorm(T5_WIDTH))
    return t


def sd_clip(width: int) -> nn.Module:
    """A1111's `SDClipModel`: `transformer` (text_model.* + text_projection) and `logit_scale`."""
    c = nn.Module()
    c.transformer = hf_clip(width, projection=True)
    c.logit_scale = nn.Parameter(torch.tensor(4.6055))
    return c


class SD3Cond(nn.Module):
    """A1111's SD3Cond: the three encoders, then `model_lg` / `model_t5` holding the same modules again."""

    def __init__(self, with_t5: bool):
        super().__init__()
        self.clip_g = sd_clip(CLIP_G)
        self.clip_l = sd_clip(CLIP_L)
        if with_t5:
            self.t5xxl = nn.Module()
            self.t5xxl.transformer = t5("encoder.embed_tokens")
            self.t5xxl.logit_scale = nn.Parameter(torch.tensor(4.6055))
        else:
            self.t5xxl = None
        self.model_lg = nn.Module()
        self.model_lg.clip_l, self.model_lg.clip_g = self.clip_l, self.clip_g
        self.model_t5 = nn.Module()
        self.model_t5.t5xxl = self.t5xxl


class A1111SD3Model(nn.Module):
    """What `shared.sd_model` is in A1111 1.10 for an SD3 checkpoint (SD3Inferencer)."""

    def __init__(self, seed: int = 0, with_t5: bool = True, dtype=torch.float32):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = mmdit()
        self.model.model_sampling = nn.Module()
        self.model.model_sampling.register_buffer("sigmas", torch.linspace(0, 1, 10))
        self.model.depth = DEPTH
        self.first_stage_model = nn.Conv2d(16, 3, 1)
        self.text_encoders = SD3Cond(with_t5)
        randomize(self, seed, dtype)
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_ssd = False
        self.is_sd3 = True
        self.sd_checkpoint_info = CheckpointInfo(f"/models/sd3-{seed}.safetensors", f"sd3-{seed}")
        self.sd_model_hash = f"{seed:010d}"

    @property
    def cond_stage_model(self):
        return self.text_encoders


class KModel(nn.Module):
    def __init__(self, diffusion_model, dtype):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.storage_dtype = self.computation_dtype = dtype


def forge_sd3_engine(seed: int = 0, attn2_layers=(0,), dtype=torch.float32):
    """Forge's StableDiffusion3 engine (SD3.5: q/k RMSNorm; `attn2_layers` non-empty: SD3.5 Medium)."""
    from backend.patcher.clip import CLIP
    from backend.patcher.unet import UnetPatcher

    kmodel = randomize(KModel(mmdit(qk_norm=True, attn2_layers=attn2_layers), dtype), seed, dtype)

    def integrated_clip(width):
        m = nn.Module()
        m.transformer = hf_clip(width, projection=True)
        m.logit_scale = nn.Parameter(torch.tensor(4.6055))
        return m

    t5xxl = nn.Module()
    t5xxl.transformer = t5("shared")
    t5xxl.logit_scale = nn.Parameter(torch.tensor(4.6055))
    clip = CLIP({"clip_l": integrated_clip(CLIP_L), "clip_g": integrated_clip(CLIP_G), "t5xxl": t5xxl})
    randomize(clip.cond_stage_model, seed + 1, dtype)
    unet = UnetPatcher(kmodel, torch.device("cpu"), torch.device("cpu"))
    objs = ForgeObjects(unet, clip)
    return SimpleNamespace(
        is_sd1=False, is_sd2=False, is_sdxl=False, is_sd3=True,
        cond_stage_model=None, first_stage_model=None,
        forge_objects=objs.shallow_copy(), forge_objects_original=objs.shallow_copy(),
        forge_objects_after_applying_lora=objs.shallow_copy(), current_lora_hash="[]",
        sd_checkpoint_info=CheckpointInfo(f"/models/sd35-{seed}.safetensors", f"sd35-{seed}"),
        sd_model_hash=f"{seed:010d}", extra_generation_params={}, comments=[],
    )


# Adapter module key → (host module: "mmdit" path or encoder, path in it, q/k/v part or None, (shift, scale) swap),
# written from the SAI/diffusers/kohya naming rules (modern-models.md §3), not from lib_adapters.naming.
SD3_KEYS = {
    "lora_unet_joint_blocks_0_x_block_attn_qkv": ("mmdit", "joint_blocks.0.x_block.attn.qkv", None, False),
    "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1":
        ("mmdit", "joint_blocks.2.context_block.adaLN_modulation.1", None, False),
    "lora_unet_joint_blocks_1_context_block_mlp_fc2": ("mmdit", "joint_blocks.1.context_block.mlp.fc2", None, False),
    "transformer.transformer_blocks.1.attn.add_k_proj": ("mmdit", "joint_blocks.1.context_block.attn.qkv", 1, False),
    "transformer.transformer_blocks.0.attn.to_v": ("mmdit", "joint_blocks.0.x_block.attn.qkv", 2, False),
    "transformer.transformer_blocks.2.norm1_context.linear":
        ("mmdit", "joint_blocks.2.context_block.adaLN_modulation.1", None, True),
    "transformer.norm_out.linear": ("mmdit", "final_layer.adaLN_modulation.1", None, True),
    "transformer.transformer_blocks.1.ff.net.0.proj": ("mmdit", "joint_blocks.1.x_block.mlp.fc1", None, False),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        ("clip_l", "text_model.encoder.layers.0.self_attn.q_proj", None, False),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": ("clip_g", "text_model.encoder.layers.1.mlp.fc1", None, False),
    "lora_te3_encoder_block_0_layer_0_SelfAttention_q":
        ("t5xxl", "encoder.block.0.layer.0.SelfAttention.q", None, False),
    "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_1":
        ("t5xxl", "encoder.block.1.layer.1.DenseReluDense.wi_1", None, False),
}
ATTN2_KEY = "transformer.transformer_blocks.0.attn2.to_q"  # SD3.5 Medium only (Forge here)
ATTN2_TARGET = ("mmdit", "joint_blocks.0.x_block.attn2.qkv", 0, False)


def host_param(flavour: str, module: str, path: str) -> str:
    """The live parameter name of a module's weight as the fake host's `params()` lists it."""
    if flavour == "forge":
        return ("u.diffusion_model." if module == "mmdit" else f"c.{module}.transformer.") + path + ".weight"
    root = "model.diffusion_model." if module == "mmdit" else f"text_encoders.{module}.transformer."
    return root + path + ".weight"


def write_sd3_lora(path, params: dict, flavour: str, keys, rank=2, alpha=1.0, seed=0, metadata=None):
    """A LoRA over `keys` of SD3_KEYS (kohya `lora_down/up` + alpha; `transformer.` keys in PEFT spelling, no
    alpha: scale 1); returns {host parameter: [(scale·ΔW float64 as the host stores it, rows, component)]}."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    table = dict(SD3_KEYS, **{ATTN2_KEY: ATTN2_TARGET})
    tensors, effects = {}, {}
    for key in keys:
        module, sub, part, swap = table[key]
        name = host_param(flavour, module, sub)
        w = params[name]
        out = w.shape[0] // 3 if part is not None else w.shape[0]
        down = torch.randn(rank, w.shape[1], generator=g) * 0.5
        up = torch.randn(out, rank, generator=g) * 0.5
        peft = key.startswith("transformer.")
        tensors[f"{key}.{'lora_A' if peft else 'lora_down'}.weight"] = down
        tensors[f"{key}.{'lora_B' if peft else 'lora_up'}.weight"] = up
        scale = 1.0 if peft else alpha / rank
        if not peft:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
        delta = (up.double() @ down.double()) * scale
        if swap:
            scale_half, shift_half = delta.chunk(2, 0)
            delta = torch.cat([shift_half, scale_half], 0)
        rows = (part * out, (part + 1) * out) if part is not None else None
        effects.setdefault(name, []).append((delta, rows, "unet" if module == "mmdit" else "te"))
    save_file(tensors, str(path), metadata=metadata or {"ss_base_model_version": "sd3"})
    return effects
