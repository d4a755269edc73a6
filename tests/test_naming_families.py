"""Family detection from adapter keys and shapes (formats.md §6), with the real models' widths."""

import pytest
import torch

from lib_adapters.adapter import Adapter
from lib_adapters.naming.families import detect_family

CASES = [
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": 768,
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj": 768}, {}, "sd1"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v": 1024}, {}, "sd2"),
    ({"lora_te_text_model_encoder_layers_22_self_attn_q_proj": 1024}, {}, "sd2"),
    ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": 2048}, {}, "sdxl"),
    ({"lora_unet_input_blocks_1_0_in_layers_2": 320, "lora_unet_output_blocks_2_2_conv": 1280}, {}, "sdxl"),
    ({"diffusion_model_input_blocks_10_0_in_layers_2": 1280, "diffusion_model_input_blocks_1_0_in_layers_2": 320},
     {}, "unknown"),
    ({"lora_unet_down_blocks_3_resnets_0_conv1": 1280}, {}, "unknown"),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": 640}, {}, "sdxl"),
    ({"unet.add_embedding.linear_1": 2816}, {}, "sdxl"),
    ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": 1280}, {}, "sdxl"),
    ({"1_model_transformer_resblocks_0_attn": 1280}, {}, "sdxl"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1": 768}, {}, "sdxl"),
    ({"lora_unet_double_blocks_0_img_attn_qkv": 3072, "lora_te1_text_model_encoder_layers_0_mlp_fc1": 768}, {}, "flux"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1": 768, "lora_te3_encoder_block_0_layer_0_SelfAttention_q": 4096},
     {}, "flux"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv": 1536}, {}, "sd3"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1": 768, "lora_te2_text_model_encoder_layers_0_mlp_fc1": 1280,
      "lora_te3_encoder_block_0_layer_0_SelfAttention_q": 4096}, {}, "sd3"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1": 320}, {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1": 320}, {"ss_v2": "True"}, "sd2"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1": 320}, {"modelspec.architecture": "stable-diffusion-v1"}, "sd1"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": 768},
     {"ss_base_model_version": "sdxl_base_v1-0"}, "sd1"),  # shapes outrank metadata
]


@pytest.mark.parametrize("in_dims,metadata,family", CASES, ids=[f"{i}-{c[2]}" for i, c in enumerate(CASES)])
def test_family_from_keys_shapes_and_metadata(in_dims, metadata, family):
    assert detect_family(in_dims, metadata) == family


def test_adapter_family_uses_the_input_width_of_each_algorithm():
    """LoRA `lora_down` columns, LoKr c·d, LoHa `hada_w1_b` columns all give the cross-attention width."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    files = {
        "sd1": {f"{key}.lora_down.weight": r(4, 768), f"{key}.lora_up.weight": r(640, 4)},
        "sd2": {f"{key}.lokr_w1": r(8, 32), f"{key}.lokr_w2": r(80, 32)},
        "sdxl": {f"{key}.hada_w1_a": r(640, 2), f"{key}.hada_w1_b": r(2, 2048),
                 f"{key}.hada_w2_a": r(640, 2), f"{key}.hada_w2_b": r(2, 2048)},
    }
    for family, tensors in files.items():
        assert Adapter.from_tensors(tensors).family == family
