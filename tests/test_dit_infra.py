"""Family-neutral machinery the DiT families (Flux, SD3) share: row blocks in another row order, virtual fused weights
on models that keep the parts apart, bias deltas, replacements, the T5 encoder, transformer-only checkpoints."""

import pytest
import torch

import flux_material as fm
from lib_adapters import Adapter
from lib_adapters.algorithms import detect
from lib_adapters.naming import LayerMap, build_plan
from lib_adapters.patching import (FusedStore, ModuleStore, Operation, Patcher, StateDictStore, Target, compute,
                                   compute_bias)

O, I = 12, 6


def rand(*shape, seed=0, scale=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


ALGORITHMS = {
    "lora": {"lora_up.weight": rand(O, 3, seed=1), "lora_down.weight": rand(3, I, seed=2), "alpha": torch.tensor(2.0)},
    "lora+bias": {"lora_up.weight": rand(O, 3, seed=1), "lora_down.weight": rand(3, I, seed=2),
                  "lora_up.bias": rand(O, seed=3), "diff_b": rand(O, seed=4)},
    "loha": {"hada_w1_a": rand(O, 2, seed=1), "hada_w1_b": rand(2, I, seed=2), "hada_w2_a": rand(O, 2, seed=3),
             "hada_w2_b": rand(2, I, seed=4), "alpha": torch.tensor(1.0)},
    "lokr": {"lokr_w1": rand(3, 2, seed=1), "lokr_w2": rand(4, 3, seed=2)},
    "oft": {"oft_blocks": rand(3, 4, 4, seed=1), "alpha": torch.tensor(0.0)},
    "boft": {"oft_blocks": rand(2, 2, 6, 6, seed=1)},
    "ia3": {"weight": rand(O, seed=1), "on_input": torch.tensor(0)},
    "glora": {"a1.weight": rand(I, 2, seed=1), "a2.weight": rand(2, I, seed=2), "b1.weight": rand(O, 2, seed=3),
              "b2.weight": rand(2, I, seed=4)},
    "full": {"diff": rand(O, I, seed=1), "diff_b": rand(O, seed=2)},
    "dora": {"lora_up.weight": rand(O, 3, seed=1), "lora_down.weight": rand(3, I, seed=2),
             "dora_scale": 1 + rand(O, 1, seed=3, scale=0.1)},
    "set": {"set_weight": rand(O, I, seed=5)},
}


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_reordered_rows_are_patched_in_the_adapters_row_order(algo, strength):
    """A target whose rows the adapter holds in another order (Flux's final adaLN halves) equals permuting the
    weight into the adapter's order, merging, and permuting back — for every algorithm, bias included."""
    patch, unused = detect(ALGORITHMS[algo])
    assert patch is not None and not unused
    weight, bias = rand(20, I, seed=7, scale=1.0), rand(20, seed=8, scale=1.0)
    target = Target("w", "b", rows=(4, 16), order=((6, 12), (0, 6)))
    got_w, got_b = compute([Operation(patch, strength, target, "x")], weight, bias)
    perm = torch.cat([torch.arange(10, 16), torch.arange(4, 10)])
    want_w, want_b = weight.clone(), bias.clone()
    new_w, new_b = patch.merge(weight[perm], strength, bias[perm])
    want_w[perm], want_b[perm] = new_w, new_b
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_b, want_b, rtol=0, atol=1e-6)
    assert torch.equal(got_w[:4], weight[:4]) and torch.equal(got_w[16:], weight[16:])
    assert not torch.equal(got_w[4:16], weight[4:16])
    torch.testing.assert_close(compute_bias([Operation(patch, strength, target, "x")], bias), got_b, rtol=0, atol=0)


def test_strength_zero_of_a_reordered_target_is_bit_exact():
    patch, _ = detect(ALGORITHMS["oft"])
    weight = rand(20, I, seed=7, scale=1.0)
    got, _ = compute([Operation(patch, 0.0, Target("w", order=((10, 20), (0, 10)), rows=None), "x")], weight, None)
    assert torch.equal(got, weight)


def test_replacement_blends_from_the_base_to_its_value():
    patch, _ = detect({"set_weight": torch.full((4,), 3.0)})
    base = torch.ones(4)
    assert torch.equal(patch.merge(base, 1.0)[0], torch.full((4,), 3.0))
    assert torch.equal(patch.merge(base, 0.0)[0], base)
    torch.testing.assert_close(patch.merge(base, 0.25)[0], torch.full((4,), 1.5))


@pytest.fixture(scope="module")
def diffusers_flux():
    model = fm.transformer(seed=3)
    return model, LayerMap.for_diffusers({"transformer": model.state_dict()})


def lokr_on(rows, cols, seed):
    patch, _ = detect({"lokr_w1": rand(rows // 8, 2, seed=seed), "lokr_w2": rand(8, cols // 2, seed=seed + 1)})
    return patch


def test_a_fused_adapter_on_separate_parts_equals_merging_the_stacked_tensor(diffusers_flux):
    """A BFL `img_attn.qkv` LoKr on diffusers' to_q/to_k/to_v patches them as one stacked weight; a later to_k LoRA in
    the same prompt runs after it on those rows; dropping the fused adapter restores the parts bit-exactly."""
    model, lm = diffusers_flux
    store = FusedStore(ModuleStore(model, "transformer."), lm.fused)
    parts = [f"transformer.transformer_blocks.1.attn.{p}" for p in ("to_q", "to_k", "to_v")]
    original = {p: store.get(p + ".weight").clone() for p in parts}
    fused = Adapter.from_tensors({f"lora_unet_double_blocks_1_img_attn_qkv.{k}": v
                                  for k, v in {"lokr_w1": rand(6, 2, seed=1), "lokr_w2": rand(8, 8, seed=2)}.items()})
    single = Adapter.from_tensors({"transformer.transformer_blocks.1.attn.to_k.lora_A.weight": rand(2, fm.H, seed=3),
                                   "transformer.transformer_blocks.1.attn.to_k.lora_B.weight": rand(fm.H, 2, seed=4)})
    plan, unmatched = build_plan([(fused, 0.7, 0.7), (single, 1.0, 1.0)], lm)
    assert list(plan) == ["+".join(p + ".weight" for p in parts)] and not any(unmatched.values())
    patcher = Patcher(store)
    with torch.no_grad():
        patcher.reconcile(plan)
    stacked = torch.cat([original[p] for p in parts])
    want = stacked + 0.7 * fused.layers["lora_unet_double_blocks_1_img_attn_qkv"].delta(stacked)
    want[fm.H:2 * fm.H] += single.layers["transformer.transformer_blocks.1.attn.to_k"].delta(want[fm.H:2 * fm.H])
    for j, p in enumerate(parts):
        torch.testing.assert_close(store.get(p + ".weight"), want[j * fm.H:(j + 1) * fm.H], rtol=0, atol=1e-6)
    plan, _ = build_plan([(single, 1.0, 1.0)], lm)
    with torch.no_grad():
        patcher.reconcile(plan)
    assert torch.equal(store.get(parts[0] + ".weight"), original[parts[0]])
    assert not torch.equal(store.get(parts[1] + ".weight"), original[parts[1]])
    with torch.no_grad():
        patcher.restore()
    assert all(torch.equal(store.get(p + ".weight"), original[p]) for p in parts)


T5_ROOTS = ["text_encoders.t5xxl.transformer.", "t5xxl.transformer."]
T5_SPELLINGS = ["lora_te3_encoder_block_1_layer_0_SelfAttention_q", "lora_te2_encoder_block_1_layer_0_SelfAttention_q",
                "text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.q",
                "t5.encoder.block.1.layer.0.SelfAttention.q", "text_encoder_2.encoder.block.1.layer.0.SelfAttention.q"]


@pytest.mark.parametrize("root", T5_ROOTS)
@pytest.mark.parametrize("key", T5_SPELLINGS)
def test_t5_layers_are_reached_by_every_spelling(root, key):
    ckpt = {k.replace("text_encoders.t5xxl.transformer.", root): v
            for k, v in fm.checkpoint(vae=False).items()}
    (target,) = LayerMap.for_checkpoint(ckpt).resolve(key)
    assert target.weight == root + "encoder.block.1.layer.0.SelfAttention.q.weight" and target.component == "te"


@pytest.mark.parametrize("root", ["", "diffusion_model.", "model.diffusion_model."])
def test_transformer_only_checkpoints_are_recognised_with_or_without_a_prefix(root):
    ckpt = fm.checkpoint(root=root, encoders=False, vae=False)
    lm = LayerMap.for_checkpoint({k: v.shape for k, v in ckpt.items()})
    assert lm.family == "flux"
    (target,) = lm.resolve("lora_unet_single_blocks_1_linear2")
    assert target.weight == root + "single_blocks.1.linear2.weight"


def test_an_adapter_file_in_transformer_names_is_no_checkpoint():
    control = {"img_in.lora_A.weight": torch.zeros(2, 4), "img_in.lora_B.weight": torch.zeros(16, 2),
               "double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(8),
               "double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 16)}
    assert LayerMap.for_checkpoint({k: v.shape for k, v in control.items()}).family != "flux"


def test_all_zero_diffs_are_skipped_not_reported():
    """Mixture/extracted files pad with all-zero diffs (even for layers the model lacks): no work, not unmatched."""
    adapter = Adapter.from_tensors({"diffusion_model.img_in.diff": torch.zeros(fm.H, 4),
                                    "text_encoders.t5xxl.transformer.encoder.block.9.layer.0.SelfAttention.q.diff":
                                        torch.zeros(8, 8),
                                    "diffusion_model.txt_in.diff_b": rand(fm.H, seed=1)})
    assert sorted(adapter.layers) == ["diffusion_model.txt_in"] and len(adapter.zero_layers) == 2
    assert adapter.summary()["zero_layers"] == 2 and adapter.unmatched == []
    lm = LayerMap.for_checkpoint(fm.checkpoint(vae=False))
    plan, unmatched = build_plan([(adapter, 1.0, 1.0)], lm)
    assert list(plan) == ["model.diffusion_model.txt_in.weight"] and unmatched[adapter.path] == []
    store = StateDictStore({k: v.clone() for k, v in fm.checkpoint(vae=False).items()})
    before = store.get("model.diffusion_model.txt_in.bias").clone()
    Patcher(store).reconcile(plan)
    torch.testing.assert_close(store.get("model.diffusion_model.txt_in.bias"), before + rand(fm.H, seed=1))
