"""Writing small adapter files for the fake-host tests, and the independent expectation of what they do."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

# kohya key → (A1111 checkpoint-style parameter, fused q/k/v part or None), per family; written from the
# host's naming rules (host-contract §5.2), not from lib_adapters.naming.
KEYS = {
    "sd1": {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None),
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k":
            ("model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", None),
        "lora_unet_up_blocks_1_attentions_0_proj_in":
            ("model.diffusion_model.output_blocks.3.1.proj_in.weight", None),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2":
            ("model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight", None),
        "lora_unet_down_blocks_0_resnets_0_conv1":
            ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", None),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
            ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", None),
        "lora_te_text_model_encoder_layers_1_mlp_fc1":
            ("cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight", None),
    },
    "sd2": {
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v":
            ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_v.weight", None),
        "lora_unet_up_blocks_3_attentions_2_proj_out":
            ("model.diffusion_model.output_blocks.11.1.proj_out.weight", None),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj":
            ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", 1),
        "lora_te_text_model_encoder_layers_1_self_attn_out_proj":
            ("cond_stage_model.model.transformer.resblocks.1.attn.out_proj.weight", None),
        "lora_te_text_model_encoder_layers_1_mlp_fc2":
            ("cond_stage_model.model.transformer.resblocks.1.mlp.c_proj.weight", None),
    },
    "sdxl": {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q":
            ("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight", None),
        "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k":
            ("model.diffusion_model.output_blocks.0.1.transformer_blocks.9.attn2.to_k.weight", None),
        "lora_unet_middle_block_0_in_layers_2":
            ("model.diffusion_model.middle_block.0.in_layers.2.weight", None),
        "lora_te1_text_model_encoder_layers_0_self_attn_v_proj":
            ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight", None),
        "lora_te2_text_model_encoder_layers_1_self_attn_v_proj":
            ("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight", 2),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1":
            ("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight", None),
    },
}
FAMILY_METADATA = {"sd1": {"ss_base_model_version": "sd_v1"}, "sd2": {"ss_base_model_version": "sd_v2", "ss_v2": "True"},
                   "sdxl": {"ss_base_model_version": "sdxl_base_v1-0"}}


def live_name(a1111_name: str, model) -> str:
    """Checkpoint-style name → the live A1111 parameter name (the hijack adds `.wrapped`)."""
    names = dict(model.named_parameters())
    for candidate in (a1111_name,
                      a1111_name.replace("cond_stage_model.", "cond_stage_model.wrapped.", 1),
                      a1111_name.replace("conditioner.embedders.0.", "conditioner.embedders.0.wrapped.", 1)
                      .replace("conditioner.embedders.1.", "conditioner.embedders.1.wrapped.", 1)):
        if candidate in names:
            return candidate
    raise KeyError(a1111_name)


def write_lora(path, model, family, keys=None, rank=2, alpha=1.0, seed=0, metadata=None, te=True, unet=True):
    """A kohya LoRA over `keys` (default: all of the family's), shapes from the live model; returns
    {live parameter name: [(scale·up@down as float64, rows, component)]}."""
    g = torch.Generator().manual_seed(seed)
    tensors, effects = {}, {}
    params = dict(model.named_parameters())
    for key, (name, part) in KEYS[family].items():
        if keys is not None and key not in keys:
            continue
        is_te = key.startswith("lora_te")
        if (is_te and not te) or (not is_te and not unet):
            continue
        live = live_name(name, model)
        w = params[live]
        out = w.shape[0] // 3 if part is not None else w.shape[0]
        rows = (part * out, (part + 1) * out) if part is not None else None
        down_shape = (rank, *w.shape[1:]) if w.ndim == 4 and w.shape[2] == 1 else (rank, w.shape[1]) if w.ndim == 2 \
            else (rank, w.shape[1], w.shape[2], w.shape[3])
        up_shape = (out, rank, 1, 1) if w.ndim == 4 else (out, rank)
        down = torch.randn(down_shape, generator=g) * 0.5
        up = torch.randn(up_shape, generator=g) * 0.5
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
        delta = (up.double().flatten(1) @ down.double().flatten(1)) * (alpha / rank)
        shape = (out, *w.shape[1:])
        effects.setdefault(live, []).append((delta.reshape(shape), rows, "te" if is_te else "unet"))
    meta = dict(FAMILY_METADATA[family])
    meta.update(metadata or {})
    save_file(tensors, str(path), metadata=meta)
    return effects


def expected(originals: dict, applied: list[tuple[dict, float, float]]) -> dict:
    """Original weights plus Σ strength·delta per effect (float64): applied = [(effects, unet, te)]."""
    out = {k: v.double().clone() for k, v in originals.items()}
    for effects, unet, te in applied:
        for name, items in effects.items():
            for delta, rows, component in items:
                s = unet if component == "unet" else te
                if rows is None:
                    out[name] += s * delta
                else:
                    out[name][rows[0]:rows[1]] += s * delta
    return out


def forge_name(a1111_name: str, rows) -> str:
    """Checkpoint-style name (+ fused part rows) → the Forge parameter as Host.params names it (`u.`/`c.`),
    written from host-contract §6.2 (HF-layout encoders; clip_l / clip_h / clip_g)."""
    import re

    n = a1111_name.replace(".wrapped.", ".")
    if n.startswith("model.diffusion_model."):
        return "u." + n[len("model."):]
    for head, clip in (("cond_stage_model.transformer.", "clip_l"), ("conditioner.embedders.0.transformer.", "clip_l")):
        if n.startswith(head):
            return f"c.{clip}.transformer." + n[len(head):]
    m = re.match(r"(cond_stage_model|conditioner\.embedders\.1)\.model\.transformer\.resblocks\.(\d+)\.(.*)$", n)
    clip = "clip_h" if m.group(1) == "cond_stage_model" else "clip_g"
    layer, rest = m.group(2), m.group(3)
    base = f"c.{clip}.transformer.text_model.encoder.layers.{layer}."
    if rest == "attn.in_proj_weight":
        return base + "self_attn." + ("q_proj", "k_proj", "v_proj")[rows[0] // (rows[1] - rows[0])] + ".weight"
    return base + {"attn.out_proj.weight": "self_attn.out_proj.weight", "mlp.c_fc.weight": "mlp.fc1.weight",
                   "mlp.c_proj.weight": "mlp.fc2.weight"}[rest]


def to_forge(effects: dict) -> dict:
    out = {}
    for name, items in effects.items():
        for delta, rows, component in items:
            out.setdefault(forge_name(name, rows), []).append((delta, None, component))
    return out


def write_mixed(path, family="sd1", seed=0):
    """One SD1 file mixing LoHa, LoKr, OFT, IA3, full (with bias) and a norm patch on the text encoder."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.3):
        return torch.randn(shape, generator=g) * s

    k = list(KEYS["sd1"])
    t = {
        f"{k[0]}.hada_w1_a": r(8, 2), f"{k[0]}.hada_w1_b": r(2, 8), f"{k[0]}.hada_w2_a": r(8, 2),
        f"{k[0]}.hada_w2_b": r(2, 8), f"{k[0]}.alpha": torch.tensor(1.0),
        f"{k[1]}.lokr_w1": r(4, 4), f"{k[1]}.lokr_w2": r(4, 4),
        f"{k[2]}.oft_blocks": r(4, 8, 8, s=0.1), f"{k[2]}.alpha": torch.tensor(0.0),
        f"{k[3]}.weight": r(32), f"{k[3]}.on_input": torch.tensor(0),
        f"{k[4]}.diff": r(8, 8, 3, 3), f"{k[4]}.diff_b": r(8),
        f"{k[5]}.lora_up.weight": r(16, 2), f"{k[5]}.lora_down.weight": r(2, 16), f"{k[5]}.alpha": torch.tensor(2.0),
        "lora_te_text_model_encoder_layers_0_layer_norm1.w_norm": r(16),
        "lora_te_text_model_encoder_layers_0_layer_norm1.b_norm": r(16),
    }
    save_file(t, str(path), metadata=FAMILY_METADATA[family])
