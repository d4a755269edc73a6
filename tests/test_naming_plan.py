"""build_plan: prompt order, per-component strengths, another family refused, unmatched keys reported by name,
and full-size layer maps (meta tensors) that place real kohya keys with real widths."""

import functools

import pytest
import torch

from lib_adapters.adapter import Adapter
from lib_adapters.errors import AdapterError
from lib_adapters.models import build, build_tiny, to_checkpoint
from lib_adapters.naming import LayerMap, build_plan
from lib_adapters.patching import Patcher, StateDictStore

Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
UNET_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(family):
    return to_checkpoint(build_tiny(family, seed=4))


def lora(key, out_dim, in_dim, seed=0, alpha=None):
    g = torch.Generator().manual_seed(seed)
    t = {f"{key}.lora_down.weight": torch.randn(2, in_dim, generator=g),
         f"{key}.lora_up.weight": torch.randn(out_dim, 2, generator=g)}
    if alpha is not None:
        t[f"{key}.alpha"] = torch.tensor(float(alpha))
    return t


def adapter(tensors, path, metadata=None):
    return Adapter.from_tensors(tensors, metadata or {}, path)


def test_plan_keeps_prompt_order_and_component_strengths():
    ckpt = tiny_checkpoint("sd1")
    lm = LayerMap.for_checkpoint(ckpt)
    a = adapter({**lora(UNET_KEY, 16, 16, 1), **lora(Q, 16, 16, 2)}, "a.safetensors")
    b = adapter(lora(UNET_KEY, 16, 16, 3), "b.safetensors")
    plan, unmatched = build_plan([(a, 0.5, 0.25), (b, -1.0, 2.0)], lm)
    w = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert [(op.source.split("|")[0], op.strength) for op in plan[w]] == [("a.safetensors", 0.5), ("b.safetensors", -1.0)]
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert [op.strength for op in plan[te]] == [0.25] and plan[te][0].target.component == "te"
    assert unmatched == {"a.safetensors": [], "b.safetensors": []}
    store = dict(ckpt)
    patcher = Patcher(StateDictStore(store))
    patcher.reconcile(plan)
    up, down = b.layers[UNET_KEY].up, b.layers[UNET_KEY].down
    want = ckpt[w] + 0.5 * a.layers[UNET_KEY].up @ a.layers[UNET_KEY].down - up @ down
    torch.testing.assert_close(store[w], want, rtol=1e-5, atol=1e-6)
    patcher.restore()
    assert all(torch.equal(store[k], v) for k, v in ckpt.items())


def test_zero_strength_leaves_component_out_of_the_plan():
    lm = LayerMap.for_checkpoint(tiny_checkpoint("sd1"))
    a = adapter({**lora(UNET_KEY, 16, 16), **lora(Q, 16, 16)}, "a.safetensors")
    plan, _ = build_plan([(a, 1.0, 0.0)], lm)
    assert plan and all(op.target.component == "unet" for ops in plan.values() for op in ops)


def test_unmatched_keys_are_reported_by_name():
    lm = LayerMap.for_checkpoint(tiny_checkpoint("sd1"))
    a = adapter({**lora(UNET_KEY, 16, 16), **lora("lora_unet_mystery_block", 16, 16)}, "a.safetensors")
    _, unmatched = build_plan([(a, 1.0, 1.0)], lm)
    assert unmatched == {"a.safetensors": ["lora_unet_mystery_block"]}


@pytest.mark.parametrize("tensors,metadata,words", [
    (lora(UNET_KEY, 16, 16), {"ss_base_model_version": "sdxl_base_v1-0"}, ["sdxl", "sd1"]),
    (lora("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 24, 24), {}, ["sdxl", "sd1"]),
    (lora("lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_q", 48, 48), {}, ["sdxl", "sd1"]),
    (lora("lora_unet_foo_blocks_0_to_q", 48, 48), {}, ["none of its 1 layers", "lora_unet_foo_blocks_0_to_q"]),
    (lora(UNET_KEY, 16, 24), {}, ["does not fit", UNET_KEY]),
])
def test_adapter_for_another_model_is_refused(tensors, metadata, words):
    lm = LayerMap.for_checkpoint(tiny_checkpoint("sd1"))
    with pytest.raises(AdapterError) as e:
        build_plan([(adapter(tensors, "other.safetensors", metadata), 1.0, 1.0)], lm)
    assert "other.safetensors" in str(e.value) and all(w in str(e.value) for w in words)


def test_names_only_map_takes_fused_width_from_the_patch():
    ckpt = tiny_checkpoint("sd2")
    lm = LayerMap.for_checkpoint(list(ckpt))
    a = adapter(lora("lora_te_text_model_encoder_layers_1_self_attn_v_proj", 16, 16), "a.safetensors")
    plan, _ = build_plan([(a, 1.0, 1.0)], lm)
    [(name, [op])] = plan.items()
    assert name == "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" and op.target.rows == (32, 48)


def test_diffusers_layer_map_family_and_targets():
    comps = build_tiny("sdxl", seed=4)
    lm = LayerMap.for_diffusers({k: comps[k].state_dict() for k in ("unet", "text_encoder", "text_encoder_2")})
    assert lm.family == "sdxl"
    [t] = lm.resolve("lora_te2_text_model_encoder_layers_0_self_attn_q_proj")
    assert t.weight == "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight" and t.rows is None


@pytest.mark.parametrize("family,key,weight,rows,shape", [
    ("sd1", "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k",
     "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", None, (320, 768)),
    ("sd1", "lora_unet_up_blocks_0_upsamplers_0_conv", "model.diffusion_model.output_blocks.2.1.conv.weight", None,
     (1280, 1280)),
    ("sdxl", "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k",
     "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight", None, (1280, 2048)),
    ("sdxl", "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_ff_net_2",
     "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight", None, (1280, 5120)),
    ("sdxl", "lora_te2_text_model_encoder_layers_31_self_attn_k_proj",
     "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", (1280, 2560), (1280, 1280)),
    ("sdxl", "lora_te1_text_model_encoder_layers_11_mlp_fc1",
     "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight", None, (3072, 768)),
    ("sd2", "lora_te_text_model_encoder_layers_22_mlp_fc2",
     "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.weight", None, (1024, 4096)),
])
def test_full_size_layer_maps_place_real_keys(family, key, weight, rows, shape):
    lm = full_map(family)
    assert lm.family == family
    t = adapter(lora(key, shape[0], shape[1]), "real.safetensors")
    plan, unmatched = build_plan([(t, 1.0, 1.0)], lm)
    [(name, [op])] = plan.items()
    assert (name, op.target.rows) == (weight, rows) and unmatched["real.safetensors"] == []


@functools.lru_cache(maxsize=None)
def full_map(family):
    ckpt = to_checkpoint(build(family, "full", device="meta", components=("unet", "text_encoder", "text_encoder_2")))
    return LayerMap.for_checkpoint({k: v.shape for k, v in ckpt.items()})


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_forge_model_names_are_mapped(family):
    """Forge: UNet under `diffusion_model.`, HF-layout encoders `clip_l.`/`clip_h.`/`clip_g.` (no fused q/k/v)."""
    from lib_adapters.models.convert import text_to_hf_ldm, unet_to_ldm
    comps = build_tiny(family, seed=4)
    names = {"text_encoder": {"sd1": "clip_l.", "sd2": "clip_h.", "sdxl": "clip_l."}[family], "text_encoder_2": "clip_g."}
    keys = {"diffusion_model." + k: v for k, v in unet_to_ldm(comps["unet"].state_dict()).items()}
    for comp, root in names.items():
        if comp in comps:
            keys.update({f"{root}transformer.{k}": v for k, v in text_to_hf_ldm(comps[comp].state_dict()).items()})
    lm = LayerMap.for_checkpoint(keys)
    assert lm.family == family
    [t] = lm.resolve("lora_unet_down_blocks_0_resnets_1_conv2")
    assert t.weight == "diffusion_model.input_blocks.2.0.out_layers.3.weight"
    te = {"sd1": "lora_te_", "sd2": "lora_te_", "sdxl": "lora_te2_"}[family]
    root = names["text_encoder_2" if family == "sdxl" else "text_encoder"]
    [t] = lm.resolve(f"{te}text_model_encoder_layers_1_self_attn_k_proj")
    assert (t.weight, t.rows) == (f"{root}transformer.text_model.encoder.layers.1.self_attn.k_proj.weight", None)
    if family == "sdxl":
        [t] = lm.resolve("lora_te1_text_model_encoder_layers_0_mlp_fc1")
        assert t.weight == "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"


def test_processor_and_lora_linear_layer_spellings_resolve():
    """diffusers attention-processor era keys (normalised by keys.py) land on the attention projections."""
    lm = LayerMap.for_checkpoint(tiny_checkpoint("sd1"))
    g = torch.Generator().manual_seed(0)
    unet = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    te = "text_encoder.text_model.encoder.layers.1.self_attn.to_v_lora"
    tensors = {f"{unet}.down.weight": torch.randn(2, 16, generator=g), f"{unet}.up.weight": torch.randn(16, 2, generator=g),
               f"{te}.down.weight": torch.randn(2, 16, generator=g), f"{te}.up.weight": torch.randn(16, 2, generator=g)}
    plan, unmatched = build_plan([(adapter(tensors, "old.safetensors"), 1.0, 1.0)], lm)
    assert sorted(plan) == ["cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight",
                            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"]
    assert unmatched["old.safetensors"] == []
