"""Every weight-bearing layer of each family (tiny models, real topology) is reachable from every naming scheme,
and lands on the weight that holds the same values (fused q/k/v: the right row block)."""

import functools

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from lib_adapters.models import build_tiny, to_checkpoint
from lib_adapters.naming import LayerMap

FAMILIES = ("sd1", "sd2", "sdxl")
UNET = "model.diffusion_model."


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    comps = build_tiny(request.param, seed=5)
    ckpt = to_checkpoint(comps)
    return request.param, comps, ckpt, LayerMap.for_checkpoint(ckpt)


@functools.lru_cache(maxsize=None)
def tiny_layer_map(family):
    return LayerMap.for_checkpoint(to_checkpoint(build_tiny(family)))


def u(path):
    return path.replace(".", "_")


def weight_modules(model):
    """Module path → (weight, bias) for every module owning a `weight` parameter."""
    return {name: (m.weight, getattr(m, "bias", None)) for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.nn.Parameter)}


def ldm_module_names(comps, ckpt):
    """diffusers UNet module → ldm module, derived from diffusers' own ldm loader (tensor identity)."""
    back = convert_ldm_unet_checkpoint(ckpt, dict(comps["unet"].config))
    ldm_of_tensor = {id(v): k for k, v in ckpt.items()}
    return {k.rpartition(".")[0]: ldm_of_tensor[id(v)][len(UNET):].rpartition(".")[0] for k, v in back.items()}


def assert_lands(lm, ckpt, key, weight, bias, component):
    targets = lm.resolve(key)
    assert len(targets) == 1, f"{key} matched {targets}"
    t = targets[0]
    assert t.component == component
    got = ckpt[t.weight]
    lo, hi = t.rows if t.rows else (0, got.shape[0])
    assert torch.equal(got[lo:hi].reshape(weight.shape), weight.detach()), key
    if bias is not None:
        assert t.bias is not None and torch.equal(ckpt[t.bias][lo:hi], bias.detach()), key
    return t.weight


def test_checkpoint_family_is_detected(tiny):
    family, _, _, lm = tiny
    assert lm.family == family


def test_every_unet_layer_is_reachable_from_every_scheme(tiny):
    family, comps, ckpt, lm = tiny
    ldm = ldm_module_names(comps, ckpt)
    reached = set()
    for path, (w, b) in weight_modules(comps["unet"]).items():
        keys = [f"lora_unet_{u(path)}", f"lycoris_{u(path)}", f"oft_unet_{u(path)}",   # kohya/LyCORIS diffusers-style
                f"lora_unet_{u(ldm[path])}", f"lycoris_{u(ldm[path])}",                  # kohya sgm-style
                f"diffusion_model_{u(ldm[path])}", f"model.diffusion_model.{ldm[path]}",  # A1111 / ldm
                f"unet.{path}", f"base_model.model.{path}", path,                        # diffusers / PEFT
                f"lora_unet.{path}", f"unet.{ldm[path]}"]                                 # OneTrainer internal / OMI
        for key in keys:
            reached.add(assert_lands(lm, ckpt, key, w, b, "unet"))
    expected = {k for k in ckpt if k.startswith(UNET) and k.endswith(".weight")}
    assert reached == expected


def text_encoders(family, comps):
    """(diffusers model, kohya/OneTrainer prefixes, diffusers prefix, checkpoint root, OpenCLIP layout)."""
    if family == "sd1":
        return [(comps["text_encoder"], ["lora_te_", "lora_te1_", "lora_te.", "clip_l."], "text_encoder.",
                 "cond_stage_model.", False)]
    if family == "sd2":
        return [(comps["text_encoder"], ["lora_te_", "lora_te.", "clip_l."], "text_encoder.", "cond_stage_model.", True)]
    return [(comps["text_encoder"], ["lora_te1_", "lora_te1.", "clip_l."], "text_encoder.", "conditioner.embedders.0.", False),
            (comps["text_encoder_2"], ["lora_te2_", "lora_te2.", "clip_g."], "text_encoder_2.", "conditioner.embedders.1.", True)]


def test_every_text_encoder_layer_is_reachable_from_every_scheme(tiny):
    family, comps, ckpt, lm = tiny
    for model, kohya, diffusers, root, openclip in text_encoders(family, comps):
        reached = set()
        for path, (w, b) in weight_modules(model).items():
            path = path.removeprefix("text_model.")
            if openclip and path in ("embeddings.position_embedding", "text_projection"):
                continue  # bare parameters in OpenCLIP, not layers
            keys = [f"{p}text_model_{u(path)}" if p.endswith("_") else f"{p}text_model.{path}" for p in kohya]
            keys += [f"{diffusers}{path}", f"{diffusers}text_model.{path}"]
            if not openclip:
                keys.append(f"{root}transformer.text_model.{path}")
            for key in keys:
                reached.add(assert_lands(lm, ckpt, key, w, b, "te"))
        expected = {k for k in ckpt if k.startswith(root) and k.endswith(("weight", "in_proj_weight"))
                    and "position_ids" not in k}
        assert reached == expected


@pytest.mark.parametrize("key,family,weight,rows", [
    ("model_transformer_resblocks_1_mlp_c_fc", "sd2", "cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.weight", None),
    ("model_transformer_resblocks_0_attn_k_proj", "sd2", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", (16, 32)),
    ("model_transformer_resblocks_0_attn", "sd2", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", None),
    ("transformer_text_model_encoder_layers_1_self_attn_q_proj", "sd1", "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight", None),
    ("0_transformer_text_model_encoder_layers_0_mlp_fc2", "sdxl", "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc2.weight", None),
    ("1_model_transformer_resblocks_1_attn_out_proj", "sdxl", "conditioner.embedders.1.model.transformer.resblocks.1.attn.out_proj.weight", None),
    ("lora_te2_text_model_encoder_layers_1_self_attn_v_proj", "sdxl", "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight", (48, 72)),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "sdxl", "model.diffusion_model.output_blocks.2.2.conv.weight", None),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "sd1", "model.diffusion_model.output_blocks.2.1.conv.weight", None),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "sdxl", "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", None),
])
def test_a1111_and_documented_examples(key, family, weight, rows):
    """Names from formats.md §5.2–5.4 (A1111 compvis names, kohya te2 q/k/v rows, upsampler slots)."""
    lm = tiny_layer_map(family)
    [t] = lm.resolve(key)
    assert (t.weight, t.rows) == (weight, rows)


def test_unknown_keys_match_nothing(tiny):
    _, _, _, lm = tiny
    for key in ("lora_unet_down_blocks_9_resnets_0_conv1", "lora_te3_encoder_block_0", "text_encoder_2.nope",
                "lora_unet_", "unet.down_blocks.0"):
        assert lm.resolve(key) == []


def test_diffusers_layer_map_reaches_every_layer(tiny):
    family, comps, ckpt, _ = tiny
    states = {name: comps[name].state_dict() for name in ("unet", "text_encoder", "text_encoder_2") if name in comps}
    lm = LayerMap.for_diffusers(states)
    assert lm.family in (family if family == "sdxl" else "unknown",)
    ldm = ldm_module_names(comps, ckpt)
    for path in weight_modules(comps["unet"]):
        for key in (f"lora_unet_{u(ldm[path])}", f"unet.{path}", f"lora_unet_{u(path)}"):
            [t] = lm.resolve(key)
            assert t.weight == f"unet.{path}.weight"
    te = "lora_te1_" if family == "sdxl" else "lora_te_"
    for path in weight_modules(comps["text_encoder"]):
        for key in (f"{te}text_model_{u(path)}", f"text_encoder.{path}"):
            [t] = lm.resolve(key)
            assert t.weight == f"text_encoder.{path}.weight" and t.rows is None and t.component == "te"
