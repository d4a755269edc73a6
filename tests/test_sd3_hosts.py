"""SD3 in the WebUIs, on faithful fakes (tests/fake_host/sd3.py): A1111 1.10's SD3Inferencer (SD3 Medium, CLIP-L/G,
optional T5, modules registered twice) patched in place, and Forge's SD3.5 engine (q/k norm, `attn2`) through its
ModelPatcher. Expectations are independent float64 LoRA math over hand-written host names, never our own output."""

import os

import pytest
import torch

from fake_host import harness
from fake_host.adapters import expected
from fake_host.sd3 import ATTN2_KEY, SD3_KEYS, A1111SD3Model, forge_sd3_engine, write_sd3_lora

ATOL = 2e-5
KOHYA = [k for k in SD3_KEYS if k.startswith("lora_")]
PEFT = [k for k in SD3_KEYS if k.startswith("transformer.")]


def assert_weights(now, original, applied):
    want = expected(original, applied)
    touched = {n for eff, _, _ in applied for n in eff}
    for name, value in now.items():
        if name in touched:
            assert torch.allclose(value.double(), want[name], atol=ATOL, rtol=0), name
        else:
            assert torch.equal(value, original[name]), name


@pytest.mark.parametrize("flavour", ["a1111", "forge"])
def test_kohya_and_diffusers_sd3_files_merge_into_the_hosts_sai_model(tmp_path, flavour):
    """Fused q/k/v row blocks, swapped modulations, CLIP-L/CLIP-G/T5 at w_clip; a prompt without tags restores."""
    host = harness.start(tmp_path, flavour=flavour)
    host.use(A1111SD3Model(seed=1) if flavour == "a1111" else forge_sd3_engine(seed=1))
    params = host.params()
    peft = PEFT + ([ATTN2_KEY] if flavour == "forge" else [])
    kohya = write_sd3_lora(os.path.join(host.lora_dir, "k.safetensors"), params, flavour, KOHYA, alpha=4.0, seed=2)
    diffusers = write_sd3_lora(os.path.join(host.lora_dir, "d.safetensors"), params, flavour, peft, seed=3)
    original = host.snapshot()
    res, seen, _ = host.generate("a cat <lora:k:0.7:0.3> <lora:d:-0.5:0.2>")
    assert not res.comments, res.comments
    assert_weights(seen["first_pass"][0], original, [(kohya, 0.7, 0.3), (diffusers, -0.5, 0.2)])
    _, seen, _ = host.generate("a cat")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_a1111_without_t5_applies_the_rest_and_names_the_t5_keys(tmp_path):
    """A1111's `sd3_enable_t5` off: no T5 module; the file's T5 keys are reported by name, the others applied."""
    host = harness.start(tmp_path)
    model = host.use(A1111SD3Model(seed=4, with_t5=False))
    assert model.text_encoders.t5xxl is None
    params = host.params()
    keys = [k for k in KOHYA if "te3" not in k]
    effects = write_sd3_lora(os.path.join(host.lora_dir, "k.safetensors"), params, "a1111", keys, seed=5)
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(host.lora_dir, "k.safetensors"))
    tensors["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.ones(2, 32)
    tensors["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.ones(32, 2)
    save_file(tensors, os.path.join(host.lora_dir, "k.safetensors"), metadata={"ss_base_model_version": "sd3"})
    original = host.snapshot()
    res, seen, _ = host.generate("<lora:k:1:1>")
    assert_weights(seen["first_pass"][0], original, [(effects, 1.0, 1.0)])
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in res.comments


def test_sd3_model_reports_its_family_and_refuses_an_sdxl_adapter(tmp_path):
    from fake_host.adapters import write_lora
    from fake_host.models import A1111Model

    host = harness.start(tmp_path)
    model = host.use(A1111SD3Model(seed=6))
    write_lora(os.path.join(host.lora_dir, "xl.safetensors"), A1111Model("sdxl"), "sdxl")
    original = host.snapshot()
    res, seen, _ = host.generate("<lora:xl:1>")
    assert "xl" in res.comments and "sdxl" in res.comments and "sd3" in res.comments
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())
    from lib_adapters.hosts.panel import model_family

    assert model_family(model) == "sd3"
