"""LyCORIS on Flux, made by lycoris-lora itself in both namings: `lycoris_` + BFL names on BFL-named blocks (whole fused
`img_attn.qkv`/`linear1`; also renamed `lora_unet_`, as sd-scripts + LyCORIS write it) and `lycoris_` + diffusers
names on diffusers' FluxTransformer2DModel (SimpleTuner: row blocks of the fused BFL weights). Our merge on the BFL
model equals the LyCORIS-hooked layers' own forward (relative error ≤ 1e-5); untouched weights stay bit-identical."""

import pytest
import torch

import flux_material as fm
from lib_adapters import Adapter
from lib_adapters.naming import LayerMap, build_plan
from lib_adapters.patching import Patcher, StateDictStore
from reference_adapters import _fill, _quiet, effective_weight, lycoris_reference

ROOT = "diffusion_model."
STRENGTH = 0.7
ALGOS = [("lokr", {"factor": 4}), ("loha", {}), ("diag-oft", {"constraint": 0}), ("boft", {"linear_dim": 14}),
         ("glora", {}), ("full", {}), ("lora", {"dora_wd": True}), ("ia3", {})]
CLASSES = {"bfl": ["DoubleStreamBlock", "SingleStreamBlock"],
           "diffusers": ["FluxTransformerBlock", "FluxSingleTransformerBlock"]}


def lycoris_on(model, naming, algo, kw):
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": CLASSES[naming], "target_name": [], "lora_prefix": "lycoris",
                                 "module_algo_map": {}, "name_algo_map": {}, "exclude_name": [],
                                 "use_fnmatch": False, "enable_conv": True})
    options = {"linear_dim": 4, "linear_alpha": 2, **kw}
    with _quiet():
        net = create_lycoris(model, 1.0, algo=algo, warn_on_unmatched=False, **options)
    net.apply_to()
    g = torch.Generator().manual_seed(3)
    for lora in net.loras:
        _fill(lora, g, 0.3)
    return net


def module_path(lora):
    return lora.lora_name[len("lycoris_"):]


@pytest.fixture(scope="module")
def base():
    return fm.transformer(seed=5).state_dict()


@pytest.mark.parametrize("algo,kw", ALGOS, ids=[a for a, _ in ALGOS])
@pytest.mark.parametrize("naming", ["bfl", "diffusers"])
def test_lycoris_on_flux_merges_like_its_own_forward(base, naming, algo, kw):
    bfl_state = fm.to_bfl(base)
    if naming == "bfl":
        model = fm.bfl_module(bfl_state)
    else:
        model = fm.transformer()
        model.load_state_dict(base)
    names = {id(m): n for n, m in model.named_modules()}
    reference_base = bfl_state if naming == "bfl" else base
    net = lycoris_on(model, naming, algo, kw)
    want = {}
    for lora in net.loras:
        layer = lora.org_module[0]
        path = names[id(layer)]
        w0 = (reference_base[f"{path}.weight"], reference_base[f"{path}.bias"])
        want[path] = lycoris_reference(lora, layer, STRENGTH, w0)
    tensors = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    assert any(k.startswith("lycoris_" + ("double_blocks" if naming == "bfl" else "transformer_blocks"))
               for k in tensors)
    adapter = Adapter.from_tensors(tensors, {}, f"{algo}.safetensors")
    assert adapter.family == "flux"
    ckpt = {ROOT + k: v.clone() for k, v in bfl_state.items()}
    plan, unmatched = build_plan([(adapter, STRENGTH, STRENGTH)], LayerMap.for_checkpoint(ckpt))
    assert unmatched[adapter.path] == [] and len(adapter.layers) == len(net.loras)
    Patcher(StateDictStore(ckpt)).reconcile(plan)
    ours = {k[len(ROOT):]: v for k, v in ckpt.items()}
    if naming == "diffusers":
        ours = fm.from_bfl(ours)
    for path, (w, _) in want.items():
        got = ours[f"{path}.weight"]
        err = float((got.double() - w.double()).abs().max() / w.double().abs().max())
        assert err <= 1e-5, (path, err)
        assert not torch.equal(got, reference_base[f"{path}.weight"]), path
    touched = {f"{p}.weight" for p in want} | ({f"{p}.bias" for p in want} if algo == "full" else set())
    for k, v in reference_base.items():
        if k not in touched:
            assert torch.equal(ours[k], v), f"untouched {k} changed"


def test_sd_scripts_lycoris_names_reach_the_fused_weights(base):
    """sd-scripts + LyCORIS's kohya wrapper writes `lora_unet_` + BFL path: the same whole fused weights."""
    bfl_state = fm.to_bfl(base)
    model = fm.bfl_module(bfl_state)
    net = lycoris_on(model, "bfl", "lokr", {"factor": 4})
    tensors = {k.replace("lycoris_", "lora_unet_", 1): v.detach().clone() for k, v in net.state_dict().items()}
    adapter = Adapter.from_tensors(tensors, {}, "kohya-lokr.safetensors")
    ckpt = {ROOT + k: v.clone() for k, v in bfl_state.items()}
    plan, unmatched = build_plan([(adapter, 1.0, 1.0)], LayerMap.for_checkpoint(ckpt))
    assert unmatched[adapter.path] == []
    assert {op.target.weight for ops in plan.values() for op in ops} >= {ROOT + "double_blocks.0.img_attn.qkv.weight",
                                                                        ROOT + "single_blocks.1.linear1.weight"}
    assert all(op.target.rows is None for ops in plan.values() for op in ops)
    Patcher(StateDictStore(ckpt)).reconcile(plan)
    layer = model.get_submodule("single_blocks.1.linear1")
    w, _ = effective_weight(layer, layer.weight.shape)
    torch.testing.assert_close(ckpt[ROOT + "single_blocks.1.linear1.weight"], w, rtol=1e-5, atol=1e-6)
