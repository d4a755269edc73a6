"""The extension on a fake Forge whose UNet is quantized as Forge loads it ("Diffusion in Low Bits" fp8, or GGUF
Q8_0 layers): quantized layers take adapters in their forward (exact, stored bytes untouched), the float text
encoder is merged through Forge's patcher as before, a strength change swaps no tensor, a layer of unknown storage
is reported by type and adapter while the rest applies, "(fp16 LoRA)" keeps factors in the computation dtype."""

import os

import pytest
import torch
from gguf import GGMLQuantizationType, quants

from fake_host import harness
from fake_host.adapters import KEYS, expected, to_forge, write_lora
from fake_host.models import A1111Model, forge_engine

UNET_KEYS = [k for k in KEYS["sd1"] if k.startswith("lora_unet")]


@pytest.fixture
def host(tmp_path):
    return harness.start(tmp_path, flavour="forge")


def dequantized(param) -> torch.Tensor:
    """The float64 weight a quantized parameter stands for, by the reference decoders (torch fp8 cast, gguf)."""
    cls = getattr(param, "gguf_cls", None)
    if cls is not None:
        return torch.from_numpy(quants.dequantize(param.data.reshape(param.shape[0], -1).numpy(), cls.qtype)).double()
    return param.detach().double()


def unet_module(engine, name):
    return engine.forge_objects_original.unet.model.get_submodule(name[len("u."):].rsplit(".", 1)[0])


def stored_bytes(engine):
    return {k: p.data.view(torch.uint8).clone() for k, p in engine.forge_objects_original.unet.model.named_parameters()}


def assert_forward(engine, effects, strength, names):
    """Each named UNet layer computes its dequantized weight + Σ strength·Δ (float64 reference) on a probe input."""
    for name in names:
        layer = unet_module(engine, name)
        weight = dequantized(layer.weight)
        want_w = expected({name: weight}, [({name: effects[name]}, strength, strength)])[name]
        bias = layer.bias.detach().double() if layer.bias is not None else None
        g = torch.Generator().manual_seed(1)
        if weight.ndim == 4:
            x = torch.randn(1, weight.shape[1], 6, 6, generator=g)
            want = torch.nn.functional.conv2d(x.double(), want_w, bias, layer.stride, layer.padding)
        else:
            x = torch.randn(3, weight.shape[1], generator=g)
            want = torch.nn.functional.linear(x.double(), want_w, bias)
        got = layer(x).double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5, name


def write(host, name, **kw):
    return to_forge(write_lora(os.path.join(host.lora_dir, f"{name}.safetensors"), A1111Model("sd1"), "sd1", **kw))


def test_fp8_unet_takes_adapters_in_the_forward_and_keeps_its_bytes(host):
    engine = host.use(forge_engine("sd1", seed=1, storage="fp8"))
    effects = write(host, "a", seed=2)
    before = stored_bytes(engine)
    original_te = {k: v.clone() for k, v in host.snapshot().items() if k.startswith("c.")}
    res, seen, _ = host.generate("cat <lora:a:0.7:0.3>")
    unet_effects = {k: v for k, v in effects.items() if k.startswith("u.")}
    assert len(unet_effects) == 5
    assert_forward(engine, unet_effects, 0.7, unet_effects)
    after = stored_bytes(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)      # not one stored byte changed
    te_now = seen["first_pass"][0]
    te_effects = {k: v for k, v in effects.items() if k.startswith("c.")}
    want = expected(original_te, [(te_effects, 0.7, 0.3)])
    for name in te_effects:                                            # the float text encoder: merged by Forge
        assert torch.allclose(te_now[name].double(), want[name], atol=2e-5, rtol=0)
    stats = host.runtime.last_stats
    assert stats["forward"] == 5 and stats["unet"] == 0 and stats["clip"] == 2
    assert not res.comments


def test_strength_change_on_quantized_layers_swaps_no_tensor_and_plain_prompt_restores(host):
    engine = host.use(forge_engine("sd1", seed=1, storage="fp8"))
    effects = write(host, "a", keys=UNET_KEYS, seed=3)
    host.generate("<lora:a:1>")
    fe = host.runtime.get_backend().state.forward["unet"]
    forms = {n: [id(t.form) for t in layer.state.terms] for n, layer in fe.layers.items()}
    host.generate("<lora:a:0.25>")
    assert {n: [id(t.form) for t in layer.state.terms] for n, layer in fe.layers.items()} == forms
    assert_forward(engine, effects, 0.25, effects)
    host.generate("cat")
    assert fe.layers == {}
    for name in effects:
        layer = unet_module(engine, name)
        assert "forward" not in layer.__dict__ and "lib_adapters" not in layer._modules


def test_gguf_layers_take_lokr_oft_and_lora_exactly(host, tmp_path):
    from safetensors.torch import save_file

    engine = host.use(forge_engine("sd1", seed=1, storage="gguf"))
    ff = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"  # 128 → 32: a Q8_0 layer
    layer = engine.forge_objects_original.unet.model.get_submodule("diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2")
    assert layer.weight.gguf_cls.qtype == GGMLQuantizationType.Q8_0
    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(4, 4, generator=g), torch.randn(8, 32, generator=g) * 0.1
    save_file({f"{ff}.lokr_w1": w1, f"{ff}.lokr_w2": w2}, os.path.join(host.lora_dir, "k.safetensors"),
              metadata={"ss_base_model_version": "sd_v1"})
    blocks = torch.randn(4, 8, 8, generator=g) * 0.1
    save_file({f"{ff}.oft_blocks": blocks, f"{ff}.alpha": torch.tensor(0.0)},
              os.path.join(host.lora_dir, "o.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    packed = layer.weight.data.clone()
    res, _, _ = host.generate("<lora:k:0.8> <lora:o:0.6>")
    from lib_adapters.algorithms.oft import OFTPatch
    w = dequantized(layer.weight)
    w = w + 0.8 * torch.kron(w1.double(), w2.double())
    w, _ = OFTPatch(blocks.double()).merge(w, 0.6)
    x = torch.randn(3, 128, generator=g)
    want = torch.nn.functional.linear(x.double(), w, layer.bias.double())
    assert float((layer(x).double() - want).abs().max() / want.abs().max()) < 1e-5
    assert torch.equal(layer.weight.data, packed) and not res.comments


def test_build_state_reads_real_shapes_not_packed_ones(host):
    from lib_adapters.hosts import forge

    engine = host.use(forge_engine("sd1", storage="gguf"))
    state = forge.build_state(engine)
    name = "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight"
    assert state.shapes[name] == (32, 128) and state.kinds[name] == "gguf Q8_0"
    packed = engine.forge_objects_original.unet.model.state_dict()[name[len("model."):]]
    assert tuple(packed.shape) != (32, 128)


def test_layer_of_unknown_storage_is_reported_and_the_rest_applied(host):
    engine = host.use(forge_engine("sd1", seed=1, storage="fp8"))
    effects = write(host, "a", keys=UNET_KEYS, seed=4)

    class W8Linear(torch.nn.Module):  # an int8 weight the extension knows nothing about
        def __init__(self, out_features, in_features):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8),
                                             requires_grad=False)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.to(x.dtype))

    attn = engine.forge_objects_original.unet.model.get_submodule("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1")
    attn.to_q = W8Linear(8, 8)
    res, _, _ = host.generate("<lora:a:1>")
    assert "a: 1 layer left out: layer type W8Linear (unknown torch.int8 Parameter) cannot take adapters" in res.comments
    rest = {k: v for k, v in effects.items() if "attn1.to_q" not in k}
    assert len(rest) == 4
    assert_forward(engine, rest, 1.0, rest)


def test_fp16_lora_mode_keeps_factors_in_the_computation_dtype(host):
    from backend.args import dynamic_args

    engine = host.use(forge_engine("sd1", seed=1, storage="fp8"))
    write(host, "a", keys=UNET_KEYS, seed=2)
    host.generate("<lora:a:1>")
    fe = host.runtime.get_backend().state.forward["unet"]
    dtypes = {t.form.up.dtype for layer in fe.layers.values() for t in layer.state.terms}
    assert dtypes == {torch.float32}
    engine.forge_objects_original.unet.model.computation_dtype = torch.bfloat16
    dynamic_args["online_lora"] = True
    try:
        host.generate("<lora:a:0.5>")
    finally:
        dynamic_args["online_lora"] = False
    dtypes = {t.form.up.dtype for layer in fe.layers.values() for t in layer.state.terms}
    assert dtypes == {torch.bfloat16}


def test_a_schedule_on_quantized_layers_sets_numbers_each_step_and_never_writes_the_weights(host):
    from modules import processing

    engine = host.use(forge_engine("sd1", seed=1, storage="fp8"))
    effects = write(host, "a", keys=UNET_KEYS, seed=6)
    before = stored_bytes(engine)
    forms, seen = [], []

    def observe_step(phase, i, p):
        fe = host.runtime.get_backend().state.forward["unet"]
        forms.append({n: [id(t.form) for t in layer.state.terms] for n, layer in fe.layers.items()})
        seen.append([t.strength for layer in fe.layers.values() for t in layer.state.terms])
        if i == 2:
            assert_forward(engine, effects, 0.5, effects)  # the ramp 0@0,1@1 at step 3 of 5
    p = processing.StableDiffusionProcessingTxt2Img(prompt="<lora:a:0@0,1@1>", steps=5)
    processing.process_images(p, observe_step=observe_step)
    assert [s[0] for s in seen] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(f == forms[1] for f in forms[1:])  # built once (step 2), then numbers only
    after = stored_bytes(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fp8_sd3_fused_qkv_rows_and_swapped_halves_take_the_forward_path(host):
    """A DiT on fp8: q/k/v adapters on row thirds of the fused qkv, and adaLN halves swapped (Target.order), from a
    kohya and a diffusers file stacked; each layer computes its fp8 weight plus both exact deltas."""
    from fake_host.models import quantize_unet
    from fake_host.sd3 import ATTN2_KEY, SD3_KEYS, forge_sd3_engine, write_sd3_lora

    engine = host.use(forge_sd3_engine(seed=1))
    mmdit = [k for k, v in SD3_KEYS.items() if v[0] == "mmdit"]
    kohya = write_sd3_lora(os.path.join(host.lora_dir, "k.safetensors"), host.params(), "forge",
                           [k for k in mmdit if k.startswith("lora_")], alpha=4.0, seed=2)
    peft = write_sd3_lora(os.path.join(host.lora_dir, "d.safetensors"), host.params(), "forge",
                          [k for k in mmdit if k.startswith("transformer.")] + [ATTN2_KEY], seed=3)
    assert any(rows for v in peft.values() for _, rows, _ in v)
    quantize_unet(engine.forge_objects_original.unet.model, "fp8")
    before = stored_bytes(engine)
    res, _, _ = host.generate("<lora:k:0.7:0.3> <lora:d:-0.5:0.2>")
    assert not res.comments, res.comments
    names = sorted(set(kohya) | set(peft))
    assert host.runtime.last_stats["forward"] == len(names)
    for name in names:
        layer = unet_module(engine, name)
        weight = dequantized(layer.weight)
        want = expected({name: weight}, [({name: kohya.get(name, [])}, 0.7, 0.7), ({name: peft.get(name, [])}, -0.5, -0.5)])
        x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(2))
        ref = torch.nn.functional.linear(x.double(), want[name], layer.bias.double())
        assert float((layer(x).double() - ref).abs().max() / ref.abs().max()) < 1e-5, name
    after = stored_bytes(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)
