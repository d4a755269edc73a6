"""Model configurations: tiny ones with the real SD1/SD2/SDXL topology (for tests), and the full-size ones.

Tiny widths keep every layer kind of the real model (conv/linear proj, per-level heads, 1/2/3-deep transformers,
SDXL text_time add-embedding, OpenCLIP-layout encoders) so that the naming tables are exercised completely.
"""

from __future__ import annotations

FAMILIES = ("sd1", "sd2", "sdxl")

_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, in_channels=4, out_channels=4,
)
_SDXL_BLOCKS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, in_channels=4, out_channels=4, addition_embed_type="text_time",
)

TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                 vocab_size=1000, max_position_embeddings=77, hidden_act="quick_gelu",
                 bos_token_id=998, eos_token_id=999, pad_token_id=999)
TINY_TEXT_G = dict(TINY_TEXT, hidden_size=24, intermediate_size=48, num_attention_heads=3, projection_dim=24,
                   hidden_act="gelu")

TINY_UNET = {
    "sd1": dict(_SD_BLOCKS, sample_size=8, block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
                cross_attention_dim=16, attention_head_dim=4, use_linear_projection=False),
    "sd2": dict(_SD_BLOCKS, sample_size=8, block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
                cross_attention_dim=16, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True),
    "sdxl": dict(_SDXL_BLOCKS, sample_size=8, block_out_channels=(16, 32, 48), norm_num_groups=8,
                 cross_attention_dim=40, attention_head_dim=(2, 4, 6), transformer_layers_per_block=(1, 2, 3),
                 use_linear_projection=True, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8),
}
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)

# Full-size models (for the benchmark; never built in tests).
FULL_TEXT_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
FULL_TEXT_H = dict(FULL_TEXT_L, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                   num_hidden_layers=24, hidden_act="gelu", projection_dim=1024)  # checkpoints keep all 24
FULL_TEXT_G = dict(FULL_TEXT_L, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                   num_hidden_layers=32, hidden_act="gelu", projection_dim=1280)
FULL_UNET = {
    "sd1": dict(_SD_BLOCKS, sample_size=64, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
                cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
    "sd2": dict(_SD_BLOCKS, sample_size=96, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "sdxl": dict(_SDXL_BLOCKS, sample_size=128, block_out_channels=(320, 640, 1280), norm_num_groups=32,
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
FULL_VAE = dict(TINY_VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=512)


def configs(family: str, size: str = "tiny") -> dict[str, dict]:
    """Component name → config dict for `family` ("sd1", "sd2", "sdxl") at `size` ("tiny" or "full")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    tiny = size == "tiny"
    unet = (TINY_UNET if tiny else FULL_UNET)[family]
    text = TINY_TEXT if tiny else (FULL_TEXT_H if family == "sd2" else FULL_TEXT_L)
    out = {"unet": dict(unet), "text_encoder": dict(text), "vae": dict(TINY_VAE if tiny else FULL_VAE)}
    if family == "sdxl":
        out["text_encoder_2"] = dict(TINY_TEXT_G if tiny else FULL_TEXT_G)
    return out
