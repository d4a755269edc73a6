"""Adapters trained on a 4-channel conv_in, applied to an inpainting UNet (9 input channels), as A1111 pads ΔW."""

import pytest
import torch

from lib_adapters import Adapter
from lib_adapters.errors import AdapterError
from lib_adapters.models import build_tiny, to_checkpoint
from lib_adapters.naming import LayerMap, build_plan
from lib_adapters.patching import Patcher, StateDictStore

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def inpainting_checkpoint():
    sd = to_checkpoint(build_tiny("sd1", seed=5))
    w = sd[CONV_IN]
    g = torch.Generator().manual_seed(9)
    sd[CONV_IN] = torch.cat([w, torch.randn(w.shape[0], 5, *w.shape[2:], generator=g)], dim=1)  # 4 → 9 channels
    return sd


def conv_in_lora(out_dim, rank=2, alpha=1.0, seed=0, algo="lora"):
    g = torch.Generator().manual_seed(seed)
    if algo == "lora":
        return {"lora_unet_conv_in.lora_down.weight": torch.randn(rank, 4, 3, 3, generator=g),
                "lora_unet_conv_in.lora_up.weight": torch.randn(out_dim, rank, 1, 1, generator=g),
                "lora_unet_conv_in.alpha": torch.tensor(alpha)}
    return {"lora_unet_conv_in.diff": torch.randn(out_dim, 4, 3, 3, generator=g)}


@pytest.mark.parametrize("algo", ["lora", "full"])
def test_four_channel_conv_in_patches_the_leading_channels_of_a_nine_channel_unet(inpainting_checkpoint, algo):
    sd = {k: v.clone() for k, v in inpainting_checkpoint.items()}
    base = sd[CONV_IN].clone()
    tensors = conv_in_lora(base.shape[0], algo=algo)
    adapter = Adapter.from_tensors(tensors, {"ss_base_model_version": "sd_v1"}, "conv_in.safetensors")
    plan, unmatched = build_plan([(adapter, 0.7, 1.0)], LayerMap.for_checkpoint(sd))
    Patcher(StateDictStore(sd)).reconcile(plan)
    if algo == "lora":
        t = tensors
        delta = (t["lora_unet_conv_in.lora_up.weight"].flatten(1) @ t["lora_unet_conv_in.lora_down.weight"].flatten(1))
        delta = delta.reshape(base.shape[0], 4, 3, 3) * (1.0 / 2)
    else:
        delta = tensors["lora_unet_conv_in.diff"]
    torch.testing.assert_close(sd[CONV_IN][:, :4], base[:, :4] + 0.7 * delta, rtol=1e-5, atol=1e-6)
    assert torch.equal(sd[CONV_IN][:, 4:], base[:, 4:])
    assert unmatched[adapter.path] == []


def test_a_conv_in_adapter_wider_than_the_unet_is_still_refused(inpainting_checkpoint):
    sd = dict(inpainting_checkpoint)
    g = torch.Generator().manual_seed(1)
    out_dim = sd[CONV_IN].shape[0]
    tensors = {"lora_unet_conv_in.lora_down.weight": torch.randn(2, 12, 3, 3, generator=g),
               "lora_unet_conv_in.lora_up.weight": torch.randn(out_dim, 2, 1, 1, generator=g)}
    adapter = Adapter.from_tensors(tensors, {"ss_base_model_version": "sd_v1"}, "wide.safetensors")
    with pytest.raises(AdapterError, match="does not fit"):
        build_plan([(adapter, 1.0, 1.0)], LayerMap.for_checkpoint(sd))
