"""The diffusers host on a FluxPipeline (tiny components, no downloads): prompt tags apply kohya/PEFT Flux adapters
with separate model and text-encoder strengths (CLIP-L and T5), equal to PEFT's merge; the image changes; restoring
gives the base weights and the base image back bit-exactly."""

import os

import pytest
import torch
from safetensors.torch import save_file

import flux_material as fm
import flux_references as refs
from lib_adapters.hosts.diffusers import DiffusersAdapters

TOL = 1e-5


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return refs.peft_reference(seed=0)


def pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
                        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5035,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=fm.clip_l(),
                        tokenizer=None, text_encoder_2=fm.t5(), tokenizer_2=None, transformer=fm.transformer(0))


def image(pipe):
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(1, 5, 24, generator=g), torch.randn(1, 20, generator=g)
    with torch.no_grad():
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=8, width=8, num_inference_steps=1,
                    output_type="pt", generator=torch.Generator().manual_seed(1)).images


def te_lora(model, prefix, names, seed):
    """kohya LoRA tensors on `names` of a text encoder, and the weights they give at strength 0.5."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    tensors, want = {}, {}
    for name in names:
        w = params[f"{name}.weight"]
        down, up = torch.randn(2, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], 2, generator=g) * 0.3
        tensors.update(refs._lora(prefix + name.replace(".", "_"), down, up, 3.0))
        want[f"{name}.weight"] = w.detach() + 0.5 * 1.5 * (up @ down)
    return tensors, want


def test_flux_pipeline_tags_apply_model_and_text_encoder_strengths_and_restore(ref, tmp_path):
    pipe = pipeline()
    pipe.transformer.load_state_dict(ref.base)
    clip_names = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc2"]
    t5_names = ["encoder.block.1.layer.0.SelfAttention.v", "encoder.block.0.layer.1.DenseReluDense.wo"]
    tensors = refs.kohya(ref)
    clip_t, clip_want = te_lora(pipe.text_encoder, "lora_te1_text_model_", clip_names, 1)
    t5_t, t5_want = te_lora(pipe.text_encoder_2, "lora_te3_", t5_names, 2)
    save_file({**tensors, **clip_t, **t5_t}, os.path.join(tmp_path, "style.safetensors"))
    base = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("transformer", "text_encoder", "text_encoder_2")}
    before = image(pipe)
    with DiffusersAdapters(pipe, lora_dirs=[tmp_path]) as host:
        assert host.family == "flux"
        text = host.apply_prompt("a fox <lora:style:0.7:0.5>")
        assert text.strip() == "a fox" and not any(host.unmatched.values())
        got = pipe.transformer.state_dict()
        for k, w in ref.expected(0.7, set(ref.factors)).items():
            if torch.equal(w, ref.base[k]):
                assert torch.equal(got[k], w), k
            else:
                assert float((got[k] - w).abs().max() / w.abs().max()) <= TOL, k
        for model, want in ((pipe.text_encoder, clip_want), (pipe.text_encoder_2, t5_want)):
            state = model.state_dict()
            for k, w in want.items():
                torch.testing.assert_close(state[k], w, rtol=1e-5, atol=1e-6)
        assert not torch.equal(image(pipe), before)
    for name, state in base.items():
        assert all(torch.equal(v, state[k]) for k, v in getattr(pipe, name).state_dict().items()), name
    assert torch.equal(image(pipe), before)
