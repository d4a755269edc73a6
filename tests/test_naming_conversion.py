"""Our diffusers → single-file conversion (models.to_checkpoint) is exactly undone by diffusers' own ldm loaders,
and our ldm → diffusers UNet path table agrees with the conversion diffusers performs."""

import pytest
import torch
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

from lib_adapters.models import build_tiny, to_checkpoint
from lib_adapters.naming.unet import layers_per_block_ldm, ldm_to_diffusers

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    comps = build_tiny(request.param, seed=3)
    return request.param, comps, to_checkpoint(comps)


def strip_text_model(state: dict) -> dict:
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}


def assert_same_state(converted: dict, original: dict):
    converted, original = strip_text_model(converted), strip_text_model(original)
    assert sorted(converted) == sorted(original)
    for k, v in original.items():
        assert converted[k].shape == v.shape, k
        assert torch.equal(converted[k].reshape(v.shape), v), k


def test_unet_round_trips_through_diffusers_ldm_loader(tiny):
    family, comps, ckpt = tiny
    back = convert_ldm_unet_checkpoint(ckpt, dict(comps["unet"].config))
    assert_same_state(back, comps["unet"].state_dict())


def test_ldm_to_diffusers_table_matches_diffusers_conversion(tiny):
    """Every ldm UNet key maps (by our table) to the diffusers key that diffusers' loader gives the same tensor."""
    family, comps, ckpt = tiny
    prefix = "model.diffusion_model."
    unet_keys = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
    back = convert_ldm_unet_checkpoint(ckpt, dict(comps["unet"].config))
    by_tensor = {id(v): k for k, v in back.items()}
    layers = layers_per_block_ldm({k.rpartition(".")[0] for k in unet_keys})
    for key, t in unet_keys.items():
        module, _, param = key.rpartition(".")
        assert f"{ldm_to_diffusers(module, layers)}.{param}" == by_tensor[id(t)], key


def test_text_encoders_round_trip_through_diffusers_loaders(tiny):
    family, comps, ckpt = tiny
    if family == "sd1":
        back = convert_ldm_clip_checkpoint(ckpt)
        back = {k.replace("text_model.", "", 1): v for k, v in back.items() if "position_ids" not in k}
        assert_same_state(back, comps["text_encoder"].state_dict())
        return
    if family == "sdxl":
        back = convert_ldm_clip_checkpoint(ckpt, "conditioner.embedders.0.transformer.")
        back = {k.replace("text_model.", "", 1): v for k, v in back.items()
                if "position_ids" not in k and k.startswith("text_model.")}
        assert_same_state(back, comps["text_encoder"].state_dict())
    name, prefix = (("text_encoder", "cond_stage_model.model.") if family == "sd2"
                    else ("text_encoder_2", "conditioner.embedders.1.model."))
    model = comps[name]
    back = convert_open_clip_checkpoint(model, ckpt, prefix=prefix)
    back = {k.replace("text_model.", "", 1): v for k, v in back.items()}
    assert_same_state(back, model.state_dict())


def test_vae_round_trips_through_diffusers_ldm_loader(tiny):
    family, comps, ckpt = tiny
    back = convert_ldm_vae_checkpoint(ckpt, dict(comps["vae"].config))
    assert_same_state(back, comps["vae"].state_dict())


def test_checkpoint_has_webui_extras(tiny):
    family, comps, ckpt = tiny
    assert ckpt["alphas_cumprod"].dtype == torch.float32 and ckpt["alphas_cumprod"].shape == (1000,)
    root = {"sd1": "cond_stage_model.transformer.", "sd2": None, "sdxl": "conditioner.embedders.0.transformer."}[family]
    if root:
        ids = ckpt[root + "text_model.embeddings.position_ids"]
        assert ids.dtype == torch.int64 and torch.equal(ids[0], torch.arange(77))
