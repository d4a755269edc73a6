"""A1111 1.10's "FP8 weight" mode on the fake host: Linear/Conv2d weights stored float8_e4m3fn (as
`sd_models.load_model_weights` casts them) take adapters in their forward, exact to the autocast dtype, the fp8 bytes
never written; fused in_proj (kept fp16/fp32 by A1111) is merged as before; MultiheadAttention's fp8 `out_proj`,
which MHA reads without calling its forward, stays merged (as the builtin does)."""

import os

import pytest
import torch

from fake_host import harness
from fake_host.adapters import expected, live_name, write_lora
from fake_host.models import A1111Model


@pytest.fixture
def host(tmp_path):
    return harness.start(tmp_path)


def fp8_model(family, seed):
    """A1111 with FP8 weight: every Linear/Conv2d outside the VAE cast to float8_e4m3fn, weight and bias."""
    model = A1111Model(family, seed=seed)
    vae, model.first_stage_model = model.first_stage_model, None
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.to(torch.float8_e4m3fn)
    model.first_stage_model = vae
    return model


def test_fp8_layers_take_adapters_in_the_forward_and_keep_their_bytes(host):
    model = host.use(fp8_model("sd2", seed=1))
    effects = write_lora(os.path.join(host.lora_dir, "a.safetensors"), A1111Model("sd2"), "sd2", seed=2)
    stored = {k: v.detach().clone() for k, v in model.named_parameters()}
    host.generate("<lora:a:0.7:0.3>")
    params = dict(model.named_parameters())
    forward_layers = 0
    for name, items in effects.items():
        live = live_name(name, model)
        module = model.get_submodule(live.rsplit(".", 1)[0])
        strength = 0.7 if items[0][2] == "unet" else 0.3
        want = expected({live: stored[live].double()}, [({live: items}, strength, strength)])[live]
        if "forward" in module.__dict__:  # the forward path: the stored fp8 tensor is untouched
            forward_layers += 1
            assert torch.equal(params[live].view(torch.uint8), stored[live].view(torch.uint8))
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, want.shape[1], 5, 5, generator=g) if want.ndim == 4 else torch.randn(3, want.shape[1], generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # A1111's devices.autocast() for fp8 on the CPU
                got = module(x).detach().double()
            bias = module.bias.detach().double() if module.bias is not None else None
            ref = torch.nn.functional.conv2d(x.double(), want, bias, module.stride, module.padding) if want.ndim == 4 \
                else torch.nn.functional.linear(x.double(), want, bias)
            assert float((got - ref).abs().max() / ref.abs().max()) < 3e-2, live
        elif name.endswith("in_proj_weight"):  # A1111 keeps MHA's in_proj unquantized: merged exactly
            assert torch.allclose(params[live].double(), want, atol=2e-5, rtol=0)
        else:  # MHA's fp8 out_proj: merged into fp8, as the builtin does
            assert name.endswith("attn.out_proj.weight") and not torch.equal(params[live], stored[live])
    assert forward_layers == 3
    host.generate("plain")
    for name, value in dict(model.named_parameters()).items():
        assert torch.equal(value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value,
                           stored[name].view(torch.uint8) if value.dtype == torch.float8_e4m3fn else stored[name]), name
    assert not any("forward" in m.__dict__ for m in model.modules())
