"""SD3/SD3.5: the SAI ↔ diffusers MMDiT tables, the checkpoint twin (checked by diffusers' own SD3 single-file
converter), and which family adapters and models are, from their keys and shapes alone."""

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from lib_adapters.models.sd3 import VARIANTS, build_sd3, sd3_to_checkpoint
from lib_adapters.naming import sd3
from lib_adapters.naming.families import detect_family

ROOT = "model.diffusion_model."


@pytest.fixture(scope="module")
def twins():
    """variant → (diffusers transformer state, SAI checkpoint state)."""
    out = {}
    for variant in VARIANTS:
        comps = build_sd3(variant, seed=3, components=("transformer",))
        out[variant] = (comps["transformer"].state_dict(), sd3_to_checkpoint(comps))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_twin_reads_back_exactly_through_diffusers_converter(twins, variant):
    diffusers_state, ckpt = twins[variant]
    back = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in ckpt.items()})
    assert sorted(back) == sorted(diffusers_state)
    for k, v in diffusers_state.items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_weight_maps_both_ways_with_its_row_block(twins, variant):
    diffusers_state, ckpt = twins[variant]
    sai_modules = {k[len(ROOT):].rpartition(".")[0] for k in ckpt if k.endswith(".weight")}
    diffusers_modules = {k.rpartition(".")[0] for k in diffusers_state if k.endswith(".weight")}
    covered = set()
    for sai_path in sai_modules:
        twins_of = sd3.sai_to_diffusers(sai_path)
        assert twins_of, sai_path
        for dpath, part in twins_of:
            assert dpath in diffusers_modules, (sai_path, dpath)
            assert sd3.diffusers_to_sai(dpath) == (sai_path, part)
            rows = ckpt[f"{ROOT}{sai_path}.weight"].shape[0] // (3 if part is not None else 1)
            assert diffusers_state[f"{dpath}.weight"].shape[0] == rows
            covered.add(dpath)
    assert covered == diffusers_modules


def test_swaps_are_norm_out_and_the_last_context_modulation_only(twins):
    diffusers_state, ckpt = twins["sd3.5-medium"]
    sai_modules = {k[len(ROOT):].rpartition(".")[0] for k in ckpt if k.endswith(".weight")}
    last = sd3.last_block(sai_modules)
    swapped = sorted(p for p in sai_modules if sd3.is_swapped(p, last))
    assert swapped == ["final_layer.adaLN_modulation.1", "joint_blocks.2.context_block.adaLN_modulation.1"]
    w = ckpt[f"{ROOT}final_layer.adaLN_modulation.1.weight"]
    half = w.shape[0] // 2
    assert torch.equal(w[:half], diffusers_state["norm_out.linear.weight"][half:])


@pytest.mark.parametrize("variant,depth,attn2,qk,name", [
    ("sd3-medium", 3, [], False, "SD3 Medium"),
    ("sd3.5-large", 3, [], True, "SD3.5 Large"),
    ("sd3.5-medium", 3, [0], True, "SD3.5 Medium"),
])
def test_layout_and_variant_come_from_the_weights(twins, variant, depth, attn2, qk, name):
    diffusers_state, ckpt = twins[variant]
    for paths in ({k[len(ROOT):] for k in ckpt if k.startswith(ROOT)}, set(diffusers_state)):
        modules = {p.rpartition(".")[0] for p in paths}
        assert sd3.layout(modules) == {"depth": depth, "attn2_layers": attn2, "qk_norm": qk}
        assert sd3.variant(modules) == name


FILES = {  # format → module keys (the widths are SD3 Medium's: H = 1536)
    "kohya": ["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_23_context_block_mlp_fc2",
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"],
    "sai dotted": ["diffusion_model.joint_blocks.3.x_block.attn.proj"],
    "diffusers": ["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_out.0"],
    "peft": ["base_model.model.transformer_blocks.5.attn.to_v"],
    "onetrainer": ["lora_transformer_transformer_blocks_0_attn_to_k", "lora_te2_text_projection"],
    "lycoris": ["lycoris_transformer_blocks_1_attn_add_q_proj"],
    "t5 only": ["lora_te3_encoder_block_0_layer_0_SelfAttention_q"],
}


@pytest.mark.parametrize("fmt", FILES)
def test_sd3_adapter_formats_are_detected_as_sd3(fmt):
    dims = {k: (4096 if "te3" in k else 1280 if "te2" in k else 768 if "te1" in k else 1536) for k in FILES[fmt]}
    assert detect_family(dims) == "sd3"


def test_flux_width_transformer_blocks_are_not_sd3():
    assert detect_family({"transformer.transformer_blocks.0.attn.to_q": 3072}) == "flux"
    assert detect_family({"transformer.single_transformer_blocks.0.attn.to_q": 3072,
                          "transformer.transformer_blocks.0.attn.to_q": 3072}) == "flux"


SAI = "model.diffusion_model."
SPELLINGS = {  # target weight (relative to the SAI root or a text-encoder root), rows, swapped → adapter spellings
    ("joint_blocks.1.context_block.attn.qkv", (32, 64), False): [
        "transformer.joint_blocks.1.context_block.attn.qkv.1",
        "transformer.transformer_blocks.1.attn.add_k_proj", "base_model.model.transformer_blocks.1.attn.add_k_proj",
        "lora_transformer_transformer_blocks_1_attn_add_k_proj", "lycoris_transformer_blocks_1_attn_add_k_proj"],
    ("joint_blocks.0.x_block.attn2.qkv", (64, 96), False): [
        "transformer.transformer_blocks.0.attn2.to_v", "transformer.joint_blocks.0.x_block.attn2.qkv.2"],
    ("joint_blocks.0.x_block.attn.qkv", None, False): [
        "lora_unet_joint_blocks_0_x_block_attn_qkv", "lycoris_joint_blocks_0_x_block_attn_qkv",
        "diffusion_model.joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn.qkv"],
    ("final_layer.adaLN_modulation.1", None, True): ["transformer.norm_out.linear", "lora_transformer_norm_out_linear"],
    ("joint_blocks.2.context_block.adaLN_modulation.1", None, True): [
        "transformer.transformer_blocks.2.norm1_context.linear"],
    ("joint_blocks.1.context_block.adaLN_modulation.1", None, False): [
        "transformer.transformer_blocks.1.norm1_context.linear",
        "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"],
    ("x_embedder.proj", None, False): ["transformer.pos_embed.proj", "lora_unet_x_embedder_proj"],
    ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", None, False): [
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj",
        "clip_l.text_model.encoder.layers.0.self_attn.q_proj"],
    ("text_encoders.clip_g.transformer.text_projection", None, False): [
        "lora_te2_text_projection", "text_encoder_2.text_projection"],
    ("text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wi_0", None, False): [
        "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0",
        "text_encoder_3.encoder.block.1.layer.1.DenseReluDense.wi_0",
        "t5.encoder.block.1.layer.1.DenseReluDense.wi_0",
        "text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wi_0"],
}


@pytest.mark.parametrize("transformer_only", [False, True])
def test_every_sd3_spelling_resolves_to_its_sai_target(transformer_only):
    from lib_adapters.naming import LayerMap

    comps = build_sd3("sd3.5-medium", seed=3)
    ckpt = sd3_to_checkpoint(comps)
    if transformer_only:  # a bare MMDiT file (ComfyUI `diffusion_models/`)
        ckpt = {k[len(SAI):]: v for k, v in ckpt.items() if k.startswith(SAI)}
    lm = LayerMap.for_checkpoint({k: v.shape for k, v in ckpt.items()})
    assert lm.family == "sd3"
    for (target, rows, swapped), spellings in SPELLINGS.items():
        if transformer_only and target.startswith("text_encoders."):
            continue
        weight = ("" if target.startswith("text_encoders.") or transformer_only else SAI) + target + ".weight"
        n = ckpt[weight].shape[0]
        order = ((n // 2, n), (0, n // 2)) if swapped else None  # diffusers' (scale, shift) from SAI's rows
        for key in spellings:
            found = lm.resolve(key)
            assert len(found) == 1, key
            t = found[0]
            assert (t.weight, t.rows, t.order) == (weight, rows, order), key
            assert t.component == ("te" if target.startswith("text_encoders.") else "unet"), key


def test_sai_spellings_on_a_diffusers_model_name_the_stacked_q_k_v():
    from lib_adapters.naming import LayerMap

    comps = build_sd3("sd3.5-medium", seed=3)
    lm = LayerMap.for_diffusers({n: m.state_dict() for n, m in comps.items()})
    assert lm.family == "sd3"
    (t,) = lm.resolve("lora_unet_joint_blocks_1_context_block_attn_qkv")
    assert t.weight == "+".join(f"transformer.transformer_blocks.1.attn.add_{p}_proj.weight" for p in "qkv")
    (t,) = lm.resolve("lora_unet_final_layer_adaLN_modulation_1")
    assert t.weight == "transformer.norm_out.linear.weight" and t.order == ((32, 64), (0, 32))
    (t,) = lm.resolve("transformer.joint_blocks.0.x_block.attn2.qkv.1")
    assert t.weight == "transformer.transformer_blocks.0.attn2.to_k.weight" and t.rows is None
    (t,) = lm.resolve("lora_te3_encoder_block_0_layer_0_SelfAttention_q")
    assert t.weight == "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.weight" and t.component == "te"


def test_names_only_maps_leave_swapped_layers_unmatched_rather_than_guess():
    from lib_adapters.naming import LayerMap

    ckpt = sd3_to_checkpoint(build_sd3("sd3.5-medium", seed=3, components=("transformer",)))
    lm = LayerMap.for_checkpoint(list(ckpt))  # names, no shapes
    assert lm.family == "sd3"
    assert lm.resolve("transformer.norm_out.linear") == []
    assert lm.resolve("lora_unet_final_layer_adaLN_modulation_1")[0].order is None  # SAI names need no reordering
