"""`convert` on SD3 files: kohya SAI names (fused q/k/v, SAI modulation order, CLIP-L/CLIP-G/T5) ↔ diffusers/PEFT
names; converted files merge like the originals, kohya → diffusers → kohya is bit-exact, and what has no form on
the other side is refused. The tiny MMDiT has heads of 64 (width 128, depth 2): convert reads depth from width."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lib_adapters.convert import HINT_KEY, convert_file
from lib_adapters.errors import AdapterError
from lib_adapters.files import load_tensors, save_tensors
from lib_adapters.merge import merge
from lib_adapters.models.sd3 import build_sd3, sd3_to_checkpoint
from reference_adapters import max_rel_error

VARIANT = "sd3.5-medium-h64"
H = 128
META = {"ss_network_module": "networks.lora_sd3", "modelspec.architecture": "stable-diffusion-3.5-medium/lora"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3conv")
    ckpt = sd3_to_checkpoint(build_sd3(VARIANT, 2))
    path = str(folder / "base.safetensors")
    save_file({k: v.contiguous() for k, v in ckpt.items()}, path)
    return str(folder), path, ckpt


def kohya_file(ckpt, path, dora=False):
    """SAI-named layers: fused x/context/attn2 qkv, both swapped modulations, an mlp, CLIP-L, CLIP-G projection, T5;
    fp16 alphas, one missing and one zero alpha."""
    g = torch.Generator().manual_seed(5)
    layers = {"lora_unet_joint_blocks_0_x_block_attn_qkv": "model.diffusion_model.joint_blocks.0.x_block.attn.qkv",
              "lora_unet_joint_blocks_0_context_block_attn_qkv":
                  "model.diffusion_model.joint_blocks.0.context_block.attn.qkv",
              "lora_unet_joint_blocks_0_x_block_attn2_qkv": "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv",
              "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1":
                  "model.diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1",
              "lora_unet_final_layer_adaLN_modulation_1": "model.diffusion_model.final_layer.adaLN_modulation.1",
              "lora_unet_joint_blocks_1_x_block_mlp_fc1": "model.diffusion_model.joint_blocks.1.x_block.mlp.fc1",
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
                  "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj",
              "lora_te2_text_projection": "text_encoders.clip_g.transformer.text_projection",
              "lora_te3_encoder_block_1_layer_0_SelfAttention_v":
                  "text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.v"}
    t = {}
    for i, (key, weight) in enumerate(layers.items()):
        w = ckpt[weight + ".weight"]
        rank = (4, 2, 3)[i % 3]
        t[f"{key}.lora_down.weight"] = (torch.randn(rank, w.shape[1], generator=g) * 0.2).half()
        t[f"{key}.lora_up.weight"] = (torch.randn(w.shape[0], rank, generator=g) * 0.2).half()
        if i != 5:
            t[f"{key}.alpha"] = torch.tensor(0.0 if i == 7 else float(rank - 1), dtype=torch.float16)
        if dora and key.startswith("lora_unet_"):
            norm = w.norm(dim=1, keepdim=True)
            t[f"{key}.dora_scale"] = (norm * (1 + 0.1 * torch.rand(norm.shape, generator=g))).half()
    save_tensors(path, t, META)
    return path


def merged(folder, base, adapter_path, name, tag="0.8:0.6"):
    lora_dir = os.path.join(folder, name)
    os.makedirs(lora_dir, exist_ok=True)
    os.replace(adapter_path, os.path.join(lora_dir, f"{name}.safetensors"))
    out = os.path.join(folder, f"{name}-merged.safetensors")
    merge(base, [lora_dir], out, f"<lora:{name}:{tag}>", log=lambda m: None)
    return load_tensors(out)[1]


def assert_same_merge(a, b, base):
    changed = 0
    for k, v in base.items():
        if torch.equal(a[k], v):
            assert torch.equal(b[k], v), k
            continue
        changed += 1
        assert max_rel_error(b[k], a[k]) < 1e-6, k
    return changed


@pytest.mark.parametrize("dora", [False, True])
def test_kohya_sd3_to_diffusers_merges_alike_and_comes_back_bit_exact(model, tmp_path, dora):
    folder, base, ckpt = model
    src = kohya_file(ckpt, str(tmp_path / "k.safetensors"), dora)
    original_header, original = load_tensors(src)
    dst = str(tmp_path / "d.safetensors")
    convert_file(src, dst, "diffusers")
    header, converted = load_tensors(dst)
    prefixes = ("transformer.transformer_blocks.", "transformer.norm_out.", "text_encoder.", "text_encoder_2.",
                "text_encoder_3.")
    assert all(k.startswith(prefixes) and ".lora_" in k for k in converted)
    for part in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v"):  # each fused SAI qkv splits into its three parts
        assert converted[f"transformer.transformer_blocks.0.{part}.lora_B.weight"].shape[0] == H
    meta = json.loads(header.metadata["lora_adapter_metadata"])
    assert meta["transformer.use_dora"] is dora
    back = str(tmp_path / "back.safetensors")
    convert_file(dst, back, "kohya", family="sd3")
    back_header, again = load_tensors(back)
    assert sorted(again) == sorted(original)
    assert all(again[k].dtype == original[k].dtype and torch.equal(again[k], original[k]) for k in original)
    assert back_header.metadata == original_header.metadata
    a = merged(folder, base, src, f"k{int(dora)}")
    b = merged(folder, base, dst, f"d{int(dora)}")
    assert assert_same_merge(a, b, ckpt) == 9  # every layer's weight (LoRA leaves biases alone)


def test_peft_sd3_parts_stack_into_kohya_fused_layers(model, tmp_path):
    """to_q and to_k with different ranks and alphas (no to_v), a swapped norm_out, CLIP-L: block-diagonal stacks."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    folder, base, ckpt = model
    comps = build_sd3(VARIANT, 2)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"to_k": 2}, alpha_pattern={"to_k": 3},
                     target_modules=["to_q", "to_k", "add_v_proj", "norm_out.linear", "norm1_context.linear"])
    te_cfg = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj"])
    torch.manual_seed(3)
    comps["transformer"].add_adapter(cfg)
    comps["text_encoder"].add_adapter(te_cfg)
    StableDiffusion3Pipeline.save_lora_weights(
        str(tmp_path), weight_name="p.safetensors",
        transformer_lora_layers=get_peft_model_state_dict(comps["transformer"]),
        transformer_lora_adapter_metadata=cfg.to_dict(),
        text_encoder_lora_layers=get_peft_model_state_dict(comps["text_encoder"]),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    src = str(tmp_path / "p.safetensors")
    dst = str(tmp_path / "k.safetensors")
    convert_file(src, dst, "kohya", family="sd3")
    _, out = load_tensors(dst)
    assert out["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape == (4 + 2, H)
    assert out["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (3 * H, 4 + 2)
    assert not out["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"][2 * H:].any()  # no to_v
    assert "lora_unet_final_layer_adaLN_modulation_1.alpha" in out and not any(HINT_KEY in k for k in out)
    a = merged(folder, base, src, "peft")
    b = merged(folder, base, dst, "kohya_from_peft")
    assert assert_same_merge(a, b, ckpt) > 0


def test_algorithms_without_a_diffusers_form_are_refused_and_nothing_is_written(model, tmp_path):
    folder, base, ckpt = model
    g = torch.Generator().manual_seed(1)
    src = str(tmp_path / "lokr.safetensors")
    save_tensors(src, {"lora_unet_joint_blocks_0_x_block_attn_qkv.lokr_w1": torch.randn(4, 4, generator=g),
                       "lora_unet_joint_blocks_0_x_block_attn_qkv.lokr_w2": torch.randn(96, 32, generator=g)}, {})
    with pytest.raises(AdapterError) as err:
        convert_file(src, str(tmp_path / "out.safetensors"), "diffusers")
    assert "lokr" in str(err.value) and "lokr.safetensors" in str(err.value)
    assert not os.path.exists(tmp_path / "out.safetensors")
