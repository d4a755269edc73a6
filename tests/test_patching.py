import random

import torch

from lib_adapters.algorithms.lora import LoRAPatch
from lib_adapters.algorithms.oft import OFTPatch
from lib_adapters.patching import ModuleStore, Operation, Patcher, StateDictStore, Target


def lora(out_dim, in_dim, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LoRAPatch(torch.randn(out_dim, rank, generator=g), torch.randn(rank, in_dim, generator=g), alpha_value=2.0)


def oft(out_dim, block=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return OFTPatch(torch.randn(out_dim // block, block, block, generator=g) * 0.1)


def model_weights(dtype=torch.float16):
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(8, 6, generator=g).to(dtype),
        "a.bias": torch.randn(8, generator=g).to(dtype),
        "b.weight": torch.randn(8, 8, generator=g).to(dtype),
        "qkv.in_proj_weight": torch.randn(24, 8, generator=g).to(dtype),
        "qkv.in_proj_bias": torch.randn(24, generator=g).to(dtype),
    }


PATCHES = {
    "la": (lora(8, 6, seed=1), Target("a.weight", "a.bias")),
    "lb": (lora(8, 8, seed=2), Target("b.weight")),
    "ob": (oft(8, seed=3), Target("b.weight")),
    "lk": (lora(8, 8, seed=4), Target("qkv.in_proj_weight", "qkv.in_proj_bias", rows=(8, 16), component="te")),
    "ov": (oft(8, seed=5), Target("qkv.in_proj_weight", "qkv.in_proj_bias", rows=(16, 24), component="te")),
}


def plan_of(chosen):
    plan = {}
    for name, strength in chosen:
        patch, target = PATCHES[name]
        plan.setdefault(target.weight, []).append(Operation(patch, strength, target, name))
    return plan


def test_random_switch_sequences_restore_bit_exactly():
    weights = model_weights()
    original = {k: v.clone() for k, v in weights.items()}
    patcher = Patcher(StateDictStore(weights))
    rng = random.Random(0)
    for _ in range(30):
        chosen = [(n, rng.choice([0.0, 0.5, 1.0, -1.0])) for n in rng.sample(sorted(PATCHES), rng.randint(0, 4))]
        patcher.reconcile(plan_of(chosen))
    patcher.restore()
    for k in original:
        assert torch.equal(weights[k], original[k]), k
    assert not patcher.originals


def test_reconcile_recomputes_only_changed_weights():
    patcher = Patcher(StateDictStore(model_weights()))
    assert patcher.reconcile(plan_of([("la", 1.0), ("lb", 1.0)]))["recomputed"] == 2
    stats = patcher.reconcile(plan_of([("la", 1.0), ("lb", 0.5)]))
    assert stats == {"recomputed": 1, "restored": 0, "kept": 1}
    stats = patcher.reconcile(plan_of([("lb", 0.5)]))
    assert stats == {"recomputed": 0, "restored": 1, "kept": 1}


def test_plan_equals_sequential_merges_in_fp32():
    weights = model_weights(torch.float32)
    base = {k: v.clone() for k, v in weights.items()}
    Patcher(StateDictStore(weights)).reconcile(plan_of([("lb", 0.7), ("ob", 0.5)]))
    expected, _ = PATCHES["lb"][0].merge(base["b.weight"], 0.7)
    expected, _ = PATCHES["ob"][0].merge(expected, 0.5)
    torch.testing.assert_close(weights["b.weight"], expected, rtol=0, atol=1e-6)


def test_fused_row_blocks_touch_only_their_rows():
    weights = model_weights(torch.float32)
    base = weights["qkv.in_proj_weight"].clone()
    Patcher(StateDictStore(weights)).reconcile(plan_of([("lk", 1.0), ("ov", 1.0)]))
    new = weights["qkv.in_proj_weight"]
    assert torch.equal(new[:8], base[:8])
    torch.testing.assert_close(new[8:16], PATCHES["lk"][0].merge(base[8:16], 1.0)[0])
    torch.testing.assert_close(new[16:24], PATCHES["ov"][0].merge(base[16:24], 1.0)[0])


def test_module_store_writes_in_place_and_restores():
    layer = torch.nn.Linear(6, 8).half()
    storage = layer.weight.data_ptr()
    before = layer.weight.detach().clone()
    patcher = Patcher(ModuleStore(layer, prefix="a."))
    patcher.reconcile(plan_of([("la", 1.0)]))
    assert layer.weight.data_ptr() == storage and not torch.equal(layer.weight, before)
    patcher.restore()
    assert torch.equal(layer.weight, before)


def test_strength_zero_leaves_weights_bit_identical():
    weights = model_weights()
    original = {k: v.clone() for k, v in weights.items()}
    Patcher(StateDictStore(weights)).reconcile(plan_of([(n, 0.0) for n in PATCHES]))
    for k in original:
        assert torch.equal(weights[k], original[k]), k


def test_a_layer_that_does_not_fit_raises_adapter_error_naming_the_file():
    import pytest

    from lib_adapters.errors import AdapterError

    weights = model_weights()
    before = weights["a.weight"].clone()
    bad = Operation(lora(8, 5), 1.0, Target("a.weight"), "/loras/bad.safetensors|0|lora_unet_x")
    with pytest.raises(AdapterError) as e:
        Patcher(StateDictStore(weights)).reconcile({"a.weight": [bad]})
    assert "bad.safetensors" in str(e.value) and "lora_unet_x" in str(e.value)
    assert torch.equal(weights["a.weight"], before)


def test_after_a_failed_reconcile_the_next_one_reapplies_the_weight():
    import pytest

    from lib_adapters.errors import AdapterError

    layer = torch.nn.Linear(6, 8)
    base = layer.weight.detach().clone()
    patcher = Patcher(ModuleStore(layer, prefix="a."))
    good = plan_of([("la", 1.0)])
    patcher.reconcile(good)
    expected = layer.weight.detach().clone()
    bad = Operation(lora(8, 5), 1.0, Target("a.weight", "a.bias"), "/loras/bad.safetensors|0|x")
    with pytest.raises(AdapterError):
        patcher.reconcile({"a.weight": good["a.weight"] + [bad]})
    assert torch.equal(layer.weight, base)  # the failing weight is back at its original, not half-patched
    assert patcher.reconcile(good)["recomputed"] == 1
    assert torch.equal(layer.weight, expected)
    patcher.restore()
    assert torch.equal(layer.weight, base)


def test_lora_factors_whose_rank_axes_disagree_are_refused_at_load():
    import pytest

    from lib_adapters.errors import ShapeMismatch

    with pytest.raises(ShapeMismatch):
        LoRAPatch.from_params({"lora_up.weight": torch.ones(8, 2, 3, 3), "lora_down.weight": torch.ones(2, 4, 3, 3)})
