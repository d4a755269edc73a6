"""The forward-path engine on real quantized tensors (torch float8, fp8 with scale_weight, GGUF Q8_0/Q4_0/Q4_K made
by the `gguf` package) in Forge's layer classes (fake, tests/fake_host/forge): a patched layer computes its dequantized
weight plus the exact merged adapter (float64 reference from the core merge) to the compute dtype's precision, the
stored tensor's bytes never change, strengths are numbers, and the factors move with the model."""

import sys

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants

from fake_host import FORGE
from lib_adapters.algorithms import detect
from lib_adapters.forward import ForwardEngine, dequantized, storage_of
from lib_adapters.patching import Operation, Target, compute

if FORGE not in sys.path:
    sys.path.insert(0, FORGE)
from backend.operations import ForgeOperations, ForgeOperationsGGUF  # noqa: E402
from backend.operations_gguf import ParameterGGUF, quantize  # noqa: E402

O, I, R = 48, 256, 4
G = torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def forge_modules_importable():
    """The fake Forge's layers import `backend.*` lazily: keep it importable even when a test before this module
    installed the A1111 fake host (which takes the Forge fakes off sys.path)."""
    if FORGE not in sys.path:
        sys.path.insert(0, FORGE)


def rnd(*shape, std=1.0):
    return torch.randn(*shape, generator=G) * std


def adapters(out_dim, in_dim, kernel=None):
    """One layer's tensors per algorithm (LyCORIS/kohya key names), shaped for a (out, in[, k, k]) weight."""
    k = kernel or ()
    flat_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)
    return {
        "lora": {"lora_up.weight": rnd(out_dim, R, *([1, 1] if k else [])) * 0.1,
                 "lora_down.weight": rnd(R, in_dim, *k) * 0.1, "alpha": torch.tensor(2.0)},
        "lokr": {"lokr_w1": rnd(4, 4), "lokr_w2_a": rnd(out_dim // 4, 2) * 0.1,
                 "lokr_w2_b": rnd(2, flat_in // 4) * 0.1, "alpha": torch.tensor(2.0)},
        "loha": {"hada_w1_a": rnd(out_dim, R) * 0.3, "hada_w1_b": rnd(R, flat_in) * 0.3,
                 "hada_w2_a": rnd(out_dim, R) * 0.3, "hada_w2_b": rnd(R, flat_in) * 0.3, "alpha": torch.tensor(2.0)},
        "oft": {"oft_blocks": rnd(out_dim // 8, 8, 8, std=0.1), "alpha": torch.tensor(0.0)},
        "ia3": {"weight": rnd(out_dim, std=0.5), "on_input": torch.tensor(0)},
        "dora": {"lora_up.weight": rnd(out_dim, R, *([1, 1] if k else [])) * 0.1,
                 "lora_down.weight": rnd(R, in_dim, *k) * 0.1, "alpha": torch.tensor(2.0),
                 "dora_scale": torch.rand(out_dim, *([1] * (len(k) + 1)), generator=G) + 0.5},
    }


def ops(names, tensors, weight="l.weight", bias="l.bias", strength=0.8):
    out = []
    for i, name in enumerate(names):
        patch, _ = detect(tensors[name])
        out.append(Operation(patch, strength - 0.25 * i, Target(weight, bias), f"{name}.safetensors|0|{i}"))
    return out


def q4_k(rows: int, cols: int) -> np.ndarray:
    """Valid Q4_K blocks (finite fp16 d/dmin, random 6-bit scales and 4-bit values): the gguf package has no Q4_K
    quantizer; its dequantizer is the reference."""
    block, size = GGML_QUANT_SIZES[Q.Q4_K]
    raw = torch.randint(0, 256, (rows, cols // block, size), generator=G, dtype=torch.uint8).numpy()
    scales = (np.abs(np.random.default_rng(1).normal(size=(rows, cols // block, 2))) * 0.002 + 0.001)
    raw[..., :4] = scales.astype(np.float16).view(np.uint8).reshape(rows, cols // block, 4)
    return raw.reshape(rows, -1)


def gguf_linear(qtype, dtype):
    """A Forge GGUF Linear (baked, as after Forge's load) holding a real GGUF tensor, plus the reference weight."""
    if qtype == Q.Q4_K:
        packed = q4_k(O, I)
        weight = ParameterGGUF(torch.from_numpy(packed), qtype=qtype, shape=(O, I))
    else:
        weight = quantize(rnd(O, I, std=0.05), qtype)
    reference = torch.from_numpy(quants.dequantize(weight.data.numpy(), qtype)).double()
    weight.computation_dtype = dtype
    weight.gguf_cls.bake(weight)
    return ForgeOperationsGGUF.Linear(weight, torch.nn.Parameter(rnd(O, std=0.1), requires_grad=False)), reference


def fp8_linear(fmt, scaled):
    layer = ForgeOperations.Linear(I, O, dtype=fmt)
    layer.weight.data = (rnd(O, I, std=0.05) / (4.0 if scaled else 1.0)).to(fmt)
    layer.bias.data = rnd(O, std=0.1).to(fmt)
    reference = layer.weight.double()
    if scaled:
        layer.scale_weight = torch.nn.Parameter(torch.tensor(4.0), requires_grad=False)
        reference = reference * 4.0
    return layer, reference


STORAGES = {
    "fp8_e4m3fn": lambda dt: fp8_linear(torch.float8_e4m3fn, False),
    "fp8_e5m2": lambda dt: fp8_linear(torch.float8_e5m2, False),
    "fp8_scaled": lambda dt: fp8_linear(torch.float8_e4m3fn, True),
    "gguf_Q8_0": lambda dt: gguf_linear(Q.Q8_0, dt),
    "gguf_Q4_0": lambda dt: gguf_linear(Q.Q4_0, dt),
    "gguf_Q4_K": lambda dt: gguf_linear(Q.Q4_K, dt),
}
# what the compute dtype resolves: float32 to ~1e-6 of the output scale, bfloat16 to a few of its 2^-8 steps
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def model_with(layer):
    root = torch.nn.Module()
    root.block = torch.nn.Module()
    root.block.l = layer
    return root


def check(root, layer, reference, plan_ops, x, dtype, bias):
    w, b = compute(plan_ops, reference, bias.double())
    want = torch.nn.functional.linear(x.double(), w, b)
    got = layer(x).double()
    err = float((got - want).abs().max() / want.abs().max())
    assert err < TOLERANCE[dtype], err
    return err


@pytest.mark.parametrize("storage", list(STORAGES))
def test_quantized_layer_with_adapters_equals_dequantized_weight_plus_exact_merge(storage):
    dtype = torch.float32
    layer, reference = STORAGES[storage](dtype)
    root = model_with(layer)
    stored = layer.weight.data.view(torch.uint8).clone()
    bias = dequantized(layer, "bias", torch.float64)
    x = rnd(3, I).to(dtype)
    plain = layer(x)
    assert torch.allclose(plain.double(), torch.nn.functional.linear(x.double(), reference, bias), rtol=0, atol=1e-4)
    assert storage_of(layer).shape == (O, I) and storage_of(layer).quantized
    tensors = adapters(O, I)
    engine = ForwardEngine(root, lambda n: "block." + n)
    for names in (["lora"], ["lokr"], ["loha"], ["oft"], ["ia3"], ["dora"], ["lora", "oft", "dora", "lokr", "ia3"]):
        plan_ops = ops(names, tensors)
        engine.reconcile({"l.weight": plan_ops})
        assert not engine.skipped and engine.adapted() == ["l.weight"]
        check(root, layer, reference, plan_ops, x, dtype, bias)
        assert torch.equal(layer.weight.data.view(torch.uint8), stored)
    engine.restore()
    assert "forward" not in layer.__dict__ and engine.nbytes() == 0
    assert torch.equal(layer(x), plain)
    assert torch.equal(layer.weight.data.view(torch.uint8), stored)


@pytest.mark.parametrize("storage", ["fp8_e4m3fn", "gguf_Q4_K"])
def test_bfloat16_compute_dtype_is_met_to_its_precision(storage):
    layer, reference = STORAGES[storage](torch.bfloat16)
    root = model_with(layer)
    bias = dequantized(layer, "bias", torch.float64)
    engine = ForwardEngine(root, lambda n: "block." + n, factor_dtype=torch.bfloat16)
    plan_ops = ops(["lora", "oft", "dora"], adapters(O, I))
    engine.reconcile({"l.weight": plan_ops})
    x = rnd(3, I).to(torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    check(root, layer, reference, plan_ops, x, torch.bfloat16, bias)


def test_strength_change_is_numbers_only_and_stays_exact():
    layer, reference = STORAGES["gguf_Q8_0"](torch.float32)
    root = model_with(layer)
    bias = dequantized(layer, "bias", torch.float64)
    engine = ForwardEngine(root, lambda n: "block." + n)
    tensors = adapters(O, I)
    plan_ops = ops(["lora", "oft"], tensors)
    engine.reconcile({"l.weight": plan_ops})
    forms = [t.form for t in engine.layers["l.weight"].state.terms]
    x = rnd(2, I)
    for scale in (0.0, 0.5, -1.0):
        moved = [Operation(o.patch, o.strength * scale, o.target, o.source) for o in plan_ops]
        stats = engine.reconcile({"l.weight": moved})
        assert stats["strengths"] == 1 and stats["built"] == 0
        assert [t.form for t in engine.layers["l.weight"].state.terms] == forms  # the same factor tensors
        check(root, layer, reference, moved, x, torch.float32, bias)
    engine.set_strengths(lambda op: 1.0)
    check(root, layer, reference, [Operation(o.patch, 1.0, o.target, o.source) for o in plan_ops], x, torch.float32,
          bias)


def test_fp8_conv_takes_locon_lokr_loha_oft_dora():
    conv = ForgeOperations.Conv2d(16, 24, 3, padding=1)
    conv.weight.data = rnd(24, 16, 3, 3, std=0.1).to(torch.float8_e4m3fn)
    conv.bias.data = rnd(24, std=0.1).to(torch.float8_e4m3fn)
    root = model_with(conv)
    stored = conv.weight.data.view(torch.uint8).clone()
    reference, bias = conv.weight.detach().double(), conv.bias.detach().double()
    tensors = adapters(24, 16, kernel=(3, 3))
    engine = ForwardEngine(root, lambda n: "block." + n)
    x = rnd(2, 16, 8, 8)
    for names in (["lora"], ["lokr"], ["loha"], ["oft"], ["dora"], ["oft", "lora", "ia3"]):
        plan_ops = ops(names, tensors)
        engine.reconcile({"l.weight": plan_ops})
        w, b = compute(plan_ops, reference, bias)
        want = torch.nn.functional.conv2d(x.double(), w, b, padding=1)
        assert float((conv(x).detach().double() - want).abs().max() / want.abs().max()) < 2e-5, names
    engine.restore()
    assert torch.equal(conv.weight.data.view(torch.uint8), stored)


def test_factors_move_with_the_model_also_under_a_gguf_layer_that_does_not_recurse():
    gguf_layer, _ = STORAGES["gguf_Q8_0"](torch.float32)
    fp8_layer, _ = STORAGES["fp8_e4m3fn"](torch.float32)
    root = torch.nn.Module()
    root.a = torch.nn.Module()
    root.a.q = gguf_layer
    root.a.seq = torch.nn.Sequential(fp8_layer)
    engine = ForwardEngine(root)
    tensors = adapters(O, I)
    engine.reconcile({"a.q.weight": ops(["lora"], tensors, "a.q.weight"),
                      "a.seq.0.weight": ops(["lokr"], tensors, "a.seq.0.weight")})
    assert isinstance(root.a.lib_adapters__q, torch.nn.Module)       # beside the GGUF layer, on its plain parent
    assert isinstance(fp8_layer.lib_adapters, torch.nn.Module)        # on the fp8 layer itself
    assert root.state_dict().keys() == {k for k in root.state_dict()}  # no buffers added
    assert not any("lib_adapters" in k for k in root.state_dict())
    root.to("meta")
    held = [t for layer in engine.layers.values() for term in layer.state.terms
            for t in vars(term.form).values() if isinstance(t, torch.Tensor)]
    assert held and all(t.device.type == "meta" for t in held)
    engine.restore()
    assert not hasattr(root.a, "lib_adapters__q") and "lib_adapters" not in fp8_layer._modules


def test_unknown_quantization_is_skipped_with_the_layer_type_named():
    class Int8Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(O, I, dtype=torch.int8), requires_grad=False)

    root = model_with(Int8Linear())
    engine = ForwardEngine(root, lambda n: "block." + n)
    engine.reconcile({"l.weight": ops(["lora"], adapters(O, I))})
    assert engine.adapted() == [] and len(engine.skipped) == 1
    assert "Int8Linear" in engine.skipped[0].reason and "int8" in engine.skipped[0].reason


def test_every_algorithm_composes_in_prompt_order_as_the_merge_does():
    """BOFT, GLoRA, full diffs with bias, set_weight, input-column IA3 and DoRA too, each alone and between others."""
    layer, reference = STORAGES["fp8_e4m3fn"](torch.float32)
    root = model_with(layer)
    bias = dequantized(layer, "bias", torch.float64)
    tensors = adapters(O, I)
    tensors.update({
        "boft": {"oft_blocks": rnd(2, 4, 12, 12, std=0.1), "alpha": torch.tensor(0.0)},
        "glora": {"a1.weight": rnd(I, R, std=0.1), "a2.weight": rnd(R, I, std=0.1), "b1.weight": rnd(O, R, std=0.1),
                  "b2.weight": rnd(R, I, std=0.1), "alpha": torch.tensor(2.0)},
        "full": {"diff": rnd(O, I, std=0.01), "diff_b": rnd(O, std=0.1)},
        "set": {"set_weight": rnd(O, I, std=0.05)},
        "ia3_in": {"weight": rnd(I, std=0.5), "on_input": torch.tensor(1)},
        "dora_in": {"lora_up.weight": rnd(O, R) * 0.1, "lora_down.weight": rnd(R, I) * 0.1,
                    "dora_scale": torch.rand(1, I, generator=G) + 0.5},
    })
    engine = ForwardEngine(root, lambda n: "block." + n)
    x = rnd(3, I)
    for name in ("boft", "glora", "full", "set", "ia3_in", "dora_in"):
        for names in ([name], ["lora", name, "oft"], [name, "dora", "ia3_in"]):
            plan_ops = ops(names, tensors)
            engine.reconcile({"l.weight": plan_ops})
            assert not engine.skipped, names
            check(root, layer, reference, plan_ops, x, torch.float32, bias)
    engine.restore()


def test_a_form_that_does_not_fit_is_reported_at_switch_and_never_fails_a_forward():
    layer, _ = STORAGES["gguf_Q8_0"](torch.float32)
    root = model_with(layer)
    x = rnd(2, I)
    plain = layer(x)
    bad = {"oft": {"oft_blocks": rnd(5, 8, 8, std=0.1)}}  # 40 rows of blocks on a 48-row layer
    engine = ForwardEngine(root, lambda n: "block." + n)
    engine.reconcile({"l.weight": ops(["oft"], bad) + ops(["lora"], adapters(O, I))})
    assert [s.op.patch.kind for s in engine.skipped] == ["oft"] and "does not fit" in engine.skipped[0].reason
    assert engine.adapted() == ["l.weight"] and not torch.equal(layer(x), plain)  # the LoRA still applies
