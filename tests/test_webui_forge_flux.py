"""The WebUI extension on a faithful fake of Forge's Flux engine (`diffusion_model.` BFL names in the KModel,
`clip_l`/`t5xxl` in the CLIP): Flux adapters of every spelling go through Forge's patchers and equal PEFT's merge;
CLIP-L and T5 take the text-encoder strength; another family's adapter is refused by name, a partly matching one
applied with its unmatched keys named."""

import os

import pytest
import torch
from safetensors.torch import save_file

import flux_material as fm
import flux_references as refs
from fake_host import harness
from fake_host.models import forge_flux_engine

TOL = 1e-5


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return refs.peft_reference(seed=0, save_dir=str(tmp_path_factory.mktemp("peft")))


@pytest.fixture
def host(tmp_path):
    return harness.start(tmp_path, flavour="forge")


def unet_params(snapshot):
    return {k[len("u.diffusion_model."):]: v for k, v in snapshot.items() if k.startswith("u.diffusion_model.")}


def assert_bfl(got, want, base):
    changed = 0
    for k, w in want.items():
        if torch.equal(w, base[k]):
            assert torch.equal(got[k], base[k]), k
        else:
            err = float((got[k].double() - w.double()).abs().max() / w.double().abs().max())
            assert err <= TOL, (k, err)
            changed += 1
    assert changed


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "xlabs"])
def test_flux_adapters_go_through_forge_patchers_and_equal_peft(host, ref, fmt):
    engine = host.use(forge_flux_engine(transformer_state=fm.to_bfl(ref.base)))
    if fmt == "diffusers":
        tensors, metadata = ref.files["diffusers"]
        covered = set(ref.factors)
    elif fmt == "kohya":
        tensors, metadata, covered = refs.kohya(ref), {}, set(ref.factors)
    else:
        (tensors, covered), metadata = refs.xlabs(ref), {}
    save_file(tensors, os.path.join(host.lora_dir, f"{fmt}.safetensors"), metadata=metadata)
    original = host.snapshot()
    res, seen, _ = host.generate(f"a cat <lora:{fmt}:0.7:0.2>")
    assert not res.comments, res.comments
    got = unet_params(seen["first_pass"][0])
    assert_bfl(got, fm.to_bfl(ref.expected(0.7, covered)), fm.to_bfl(ref.base))
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items() if k.startswith("c."))
    after = engine.forge_objects_after_applying_lora
    assert after.unet is not engine.forge_objects_original.unet
    _, seen, _ = host.generate("a cat")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_clip_l_and_t5_take_the_text_encoder_strength(host):
    """kohya `lora_te1_` (CLIP-L) and `lora_te3_` (T5) patch Forge's `clip_l`/`t5xxl` at w_clip."""
    engine = host.use(forge_flux_engine(seed=3))
    clip = dict(engine.forge_objects_original.clip.cond_stage_model.named_parameters())
    g = torch.Generator().manual_seed(1)
    tensors, want = {}, {}
    for key, param in (("lora_te1_text_model_encoder_layers_1_self_attn_v_proj",
                        "clip_l.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight"),
                       ("lora_te3_encoder_block_0_layer_0_SelfAttention_q",
                        "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"),
                       ("lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_1",
                        "t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wi_1.weight"),
                       ("lora_unet_single_blocks_1_linear2", None)):
        w = clip[param] if param else engine.forge_objects_original.unet.model.diffusion_model.get_submodule(
            "single_blocks.1.linear2").weight
        down, up = torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g)
        tensors.update(refs._lora(key, down, up, 1.0))
        if param:
            want["c." + param] = w.detach().double() + 0.25 * 0.5 * (up.double() @ down.double())
    save_file(tensors, os.path.join(host.lora_dir, "te.safetensors"))
    original = host.snapshot()
    res, seen, _ = host.generate("<lora:te:1:0.25>")
    now = seen["first_pass"][0]
    for k, v in now.items():
        if k in want:
            torch.testing.assert_close(v.double(), want[k], rtol=1e-6, atol=1e-6)
        elif k.startswith("c."):
            assert torch.equal(v, original[k]), k
    assert not torch.equal(now["u.diffusion_model.single_blocks.1.linear2.weight"],
                           original["u.diffusion_model.single_blocks.1.linear2.weight"])


def test_another_familys_adapter_is_refused_by_name_and_nothing_applied(host):
    from fake_host.adapters import write_lora
    from fake_host.models import A1111Model

    host.use(forge_flux_engine())
    write_lora(os.path.join(host.lora_dir, "sdxl_style.safetensors"), A1111Model("sdxl"), "sdxl")
    original = host.snapshot()
    res, seen, _ = host.generate("<lora:sdxl_style:1>")
    assert "sdxl_style" in res.comments and "sdxl" in res.comments and "flux" in res.comments
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_a_partly_matching_file_is_applied_and_its_unmatched_keys_named(host, ref):
    host.use(forge_flux_engine(transformer_state=fm.to_bfl(ref.base)))
    tensors = refs.kohya(ref)
    for n in (30, 31):
        tensors.update(refs._lora(f"lora_unet_single_blocks_{n}_linear2", torch.zeros(2, fm.H + fm.M),
                                  torch.zeros(fm.H, 2), 1.0))
    save_file(tensors, os.path.join(host.lora_dir, "pruned.safetensors"))
    res, seen, _ = host.generate("<lora:pruned:0.7>")
    assert "2 keys match no layer" in res.comments and "lora_unet_single_blocks_30_linear2" in res.comments
    assert_bfl(unet_params(seen["first_pass"][0]), fm.to_bfl(ref.expected(0.7, set(ref.factors))),
               fm.to_bfl(ref.base))
