"""SD3/SD3.5 adapters merged into a single-file checkpoint (SAI names: fused q/k/v, swapped modulations) equal
what the reference libraries do, on a tiny SD3.5 Medium (q/k RMSNorm, an `attn2` layer) with CLIP-L, CLIP-G, T5.

Adapters in diffusers names (PEFT + diffusers `save_lora_weights`, `base_model.model.`, LyCORIS on the diffusers
model as SimpleTuner does, OneTrainer's `lora_transformer_`) land on row blocks and swapped halves; adapters in SAI
names (kohya / sd-scripts + LyCORIS `lora_unet_joint_blocks_…`, `lycoris_`, ComfyUI `diffusion_model.…`) on whole
fused weights. The merged checkpoint is read back with diffusers' own SD3 converter and compared with PEFT's merge
or the LyCORIS-hooked modules (1e-5 relative); untouched weights and strength 0 are bit-identical.
"""

import copy
import os

import pytest
import torch
from safetensors.torch import save_file

from lib_adapters.errors import AdapterError
from lib_adapters.files import load_tensors
from lib_adapters.merge import merge
from lib_adapters.models.sd3 import ROOTS, build_sd3, sd3_to_checkpoint
from reference_adapters import max_rel_error
from sd3_reference import (ALGOS, DIFFUSERS_TARGETS, S_TE, S_UNET, SAI_TARGETS, SEED, TE_PREFIX, TE_TARGETS, TOL,
                           VARIANT, assert_untouched, back_to_diffusers, check, lycoris, sai_twin)

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    path = str(folder / "sd35m.safetensors")
    ckpt = sd3_to_checkpoint(build_sd3(VARIANT, SEED))
    save_file({k: v.contiguous() for k, v in ckpt.items()}, path)
    return str(folder), path, load_tensors(path)[1]


def run_merge(folder, base_path, tensors, name, tag=f"{S_UNET}:{S_TE}", metadata=None, log=None):
    lora_dir = os.path.join(folder, name)
    os.makedirs(lora_dir, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()},
              os.path.join(lora_dir, f"{name}.safetensors"), metadata=metadata)
    out = os.path.join(folder, f"{name}-out.safetensors")
    merge(base_path, [lora_dir], out, f"<lora:{name}:{tag}>", log=log or (lambda m: None))
    return load_tensors(out)[1]


@pytest.mark.parametrize("algo", list(ALGOS))
def test_lycoris_on_diffusers_names_lands_on_sai_row_blocks_and_swaps(base, algo):
    """SimpleTuner-style `lycoris_transformer_blocks_…` (and the three text encoders, `lora_te1/2/3_`)."""
    folder, base_path, ckpt = base
    comps = build_sd3(VARIANT, SEED)
    before = {name: copy.deepcopy(m.state_dict()) for name, m in comps.items()}
    targets = [n for n in DIFFUSERS_TARGETS if algo != "boft" or n != "transformer_blocks.0.norm1.linear"]
    tensors, hooked = {}, {}
    net, hooked["transformer"] = lycoris(comps["transformer"], "lycoris", targets, ALGOS[algo])
    tensors.update(net.state_dict())
    if algo in ("lora", "lokr", "ia3", "dora"):
        for comp, names in TE_TARGETS.items():
            net, hooked[comp] = lycoris(comps[comp], TE_PREFIX[comp], names, ALGOS[algo])
            tensors.update(net.state_dict())
    out = run_merge(folder, base_path, tensors, f"lyco_diffusers_{algo}".replace("-", "_"))
    merged = back_to_diffusers(out)
    for comp, mods in hooked.items():
        s = S_UNET if comp == "transformer" else S_TE
        check(merged[comp], before[comp], {p: (lo, comps[comp].get_submodule(p)) for p, lo in mods.items()}, s,
              f"{algo}/{comp}")
    touched = [ROOTS[c] for c in hooked]
    assert_untouched(out, ckpt, touched)
    back = back_to_diffusers(ckpt)
    for comp, mods in hooked.items():  # inside a touched component, only the targeted layers moved
        hit = tuple(p + "." for p in mods)
        for k, v in back[comp].items():
            if not k.startswith(hit) and k != "encoder.embed_tokens.weight":
                assert torch.equal(merged[comp][k], v), f"{algo}: {comp}.{k} changed"


@pytest.mark.parametrize("algo", list(ALGOS))
def test_lycoris_on_sai_names_patches_whole_fused_weights(base, algo):
    """sd-scripts + LyCORIS `lora_unet_joint_blocks_…` on the SAI modules themselves (q/k/v fused, no swap)."""
    folder, base_path, ckpt = base
    twin = sai_twin(ckpt)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    targets = [n for n in SAI_TARGETS if algo != "boft" or n != "joint_blocks.0.x_block.adaLN_modulation.1"]
    net, hooked = lycoris(twin, "lora_unet", targets, ALGOS[algo])
    out = run_merge(folder, base_path, net.state_dict(), f"lyco_sai_{algo}".replace("-", "_"), tag=f"{S_UNET}")
    root = ROOTS["transformer"]
    merged = {k[len(root):]: v for k, v in out.items() if k.startswith(root)}
    check(merged, before, {p: (lo, twin.get_submodule(p)) for p, lo in hooked.items()}, S_UNET, algo)
    assert_untouched(out, ckpt, [root + p + "." for p in hooked])


@pytest.mark.parametrize("spelling", ["lycoris", "diffusion_model", "onetrainer"])
def test_other_spellings_of_the_same_lora(base, spelling):
    """`lycoris_<SAI path>`, ComfyUI `diffusion_model.<SAI path>` with lora_A/B, OneTrainer `lora_transformer_`."""
    folder, base_path, ckpt = base
    if spelling == "onetrainer":
        comps = build_sd3(VARIANT, SEED)
        model, names, prefix = comps["transformer"], DIFFUSERS_TARGETS, "lora_transformer"
    else:
        model, names, prefix = sai_twin(ckpt), SAI_TARGETS, "lycoris"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net, hooked = lycoris(model, prefix, names, ALGOS["lora"])
    tensors = net.state_dict()
    if spelling == "diffusion_model":
        by_name = {lo.lora_name: path for path, lo in hooked.items()}
        spell = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
        tensors = {f"diffusion_model.{by_name[k.split('.')[0]]}.{spell[k.split('.', 1)[1]]}": v
                   for k, v in tensors.items()}
    out = run_merge(folder, base_path, tensors, f"spelled_{spelling}", tag=f"{S_UNET}")
    if spelling == "onetrainer":
        merged = back_to_diffusers(out)["transformer"]
    else:
        root = ROOTS["transformer"]
        merged = {k[len(root):]: v for k, v in out.items() if k.startswith(root)}
    check(merged, before, {p: (lo, model.get_submodule(p)) for p, lo in hooked.items()}, S_UNET, spelling)


@pytest.mark.parametrize("form", ["diffusers", "base_model", "dora"])
def test_peft_files_merge_like_peft(base, form):
    """diffusers `save_lora_weights` (`transformer.`, `text_encoder.`, `text_encoder_2.`, scales in
    `lora_adapter_metadata`, lora_alpha ≠ r), bare PEFT `base_model.model.`, and PEFT DoRA on row blocks."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    folder, base_path, ckpt = base
    comps = build_sd3(VARIANT, SEED)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=form == "dora",
                     target_modules=["to_q", "to_k", "to_v", "add_q_proj", "to_out.0", "to_add_out", "norm1.linear",
                                     "norm1_context.linear", "norm_out.linear", "ff.net.0.proj", "ff_context.net.2",
                                     "proj_out", "context_embedder"])
    te_cfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])
    torch.manual_seed(SEED)
    name = f"peft_{form}"
    lora_dir = os.path.join(folder, name)
    os.makedirs(lora_dir, exist_ok=True)
    tes = ["text_encoder", "text_encoder_2"] if form == "diffusers" else []
    if form == "base_model":
        peft_model = get_peft_model(comps["transformer"], cfg)
        state = get_peft_model_state_dict(peft_model)
        assert all(k.startswith("base_model.model.") for k in state)  # PEFT's own spelling
        import json
        meta = {"lora_adapter_metadata": json.dumps({k: sorted(v) if isinstance(v, set) else v
                                                     for k, v in cfg.to_dict().items()}, default=str)}
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(lora_dir, f"{name}.safetensors"),
                  metadata=meta)
        model = peft_model.base_model.model
    else:
        comps["transformer"].add_adapter(cfg)
        kwargs = {"transformer_lora_layers": get_peft_model_state_dict(comps["transformer"]),
                  "transformer_lora_adapter_metadata": cfg.to_dict()}
        for comp in tes:
            comps[comp].add_adapter(te_cfg)
            kwargs[f"{comp}_lora_layers"] = get_peft_model_state_dict(comps[comp])
            kwargs[f"{comp}_lora_adapter_metadata"] = te_cfg.to_dict()
        StableDiffusion3Pipeline.save_lora_weights(lora_dir, weight_name=f"{name}.safetensors", **kwargs)
        model = comps["transformer"]
    out_path = os.path.join(folder, f"{name}-out.safetensors")
    merge(base_path, [lora_dir], out_path, f"<lora:{name}:{S_UNET}:{S_TE}>", log=lambda m: None)
    merged = back_to_diffusers(load_tensors(out_path)[1])
    fresh = build_sd3(VARIANT, SEED)
    for comp, module in [("transformer", model)] + [(c, comps[c]) for c in tes]:
        s = S_UNET if comp == "transformer" else S_TE
        targeted = [n for n, m in module.named_modules() if isinstance(m, LoraLayer)]
        assert targeted
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, LoraLayer):
                    m.set_scale("default", 1.0 if form == "dora" else s)
                    m.merge()
        want = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if "lora_" not in k}
        base_state = fresh[comp].state_dict()
        for k, v in want.items():
            if form == "dora" and not torch.equal(v, base_state[k]):
                v = base_state[k] + s * (v - base_state[k])  # DoRA strength blends the strength-1 result
            assert max_rel_error(merged[comp][k], v) < TOL, (form, comp, k)
        changed = {k.rpartition(".")[0] for k, v in base_state.items() if not torch.equal(merged[comp][k], v)}
        assert changed == set(targeted), (form, comp, sorted(changed ^ set(targeted)))


def test_strength_zero_leaves_the_checkpoint_bit_identical(base):
    """Also: merge names the model it read (variant and depth come from the weights)."""
    folder, base_path, ckpt = base
    comps = build_sd3(VARIANT, SEED)
    tensors = {}
    for comp, prefix, names in [("transformer", "lycoris", DIFFUSERS_TARGETS),
                                ("text_encoder_3", "lora_te3", TE_TARGETS["text_encoder_3"])]:
        net, _ = lycoris(comps[comp], prefix, names, ALGOS["diag-oft"])
        tensors.update(net.state_dict())
    out = run_merge(folder, base_path, tensors, "zero", tag="0:0")
    summary = merge(base_path, [os.path.join(folder, "zero")], os.path.join(folder, "zero2.safetensors"),
                    "<lora:zero:0:0>", log=lambda m: None)
    assert summary["family"] == "sd3: SD3.5 Medium, 3 joint blocks" and summary["weights_changed"] == 0
    assert sorted(out) == sorted(ckpt)
    assert all(torch.equal(out[k], v) for k, v in ckpt.items())


def test_sd3_and_sdxl_adapters_are_refused_on_each_others_models(base, tmp_path):
    """One message naming the file and both families; nothing is written."""
    from lib_adapters.models import build_tiny, to_checkpoint

    folder, base_path, ckpt = base
    comps = build_sd3(VARIANT, SEED)
    net, _ = lycoris(comps["transformer"], "lycoris", DIFFUSERS_TARGETS[:3], ALGOS["lora"])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "style_a.safetensors"),
              metadata={"modelspec.architecture": "stable-diffusion-3-medium/lora"})  # tiny widths: told by metadata
    sdxl_path = str(tmp_path / "base_xl.safetensors")
    save_file({k: v.contiguous() for k, v in to_checkpoint(build_tiny("sdxl", 1)).items()}, sdxl_path)
    with pytest.raises(AdapterError) as err:
        merge(sdxl_path, [str(tmp_path)], str(tmp_path / "x.safetensors"), "<lora:style_a:1>", log=lambda m: None)
    assert "style_a.safetensors" in str(err.value) and "for sd3, the model is sdxl" in str(err.value)
    assert not os.path.exists(tmp_path / "x.safetensors")
    g = torch.Generator().manual_seed(2)
    unet = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    te = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    xl_lora = {f"{unet}.lora_down.weight": torch.randn(2, 640, generator=g),
               f"{unet}.lora_up.weight": torch.randn(640, 2, generator=g),
               f"{te}.lora_down.weight": torch.randn(2, 1280, generator=g),
               f"{te}.lora_up.weight": torch.randn(5120, 2, generator=g)}
    save_file(xl_lora, str(tmp_path / "style_b.safetensors"))
    with pytest.raises(AdapterError) as err:
        merge(base_path, [str(tmp_path)], str(tmp_path / "y.safetensors"), "<lora:style_b:1>", log=lambda m: None)
    assert "style_b.safetensors" in str(err.value) and "for sdxl, the model is sd3" in str(err.value)
    assert not os.path.exists(tmp_path / "y.safetensors")


def test_keys_that_match_no_layer_are_reported_by_name(base):
    folder, base_path, ckpt = base
    g = torch.Generator().manual_seed(1)
    tensors = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(2, 32, generator=g),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.randn(96, 2, generator=g),
               "lora_unet_joint_blocks_7_x_block_attn_qkv.lora_down.weight": torch.randn(2, 32, generator=g),
               "lora_unet_joint_blocks_7_x_block_attn_qkv.lora_up.weight": torch.randn(96, 2, generator=g)}
    notes = []
    run_merge(folder, base_path, tensors, "partly", tag="1", log=notes.append)
    assert any("lora_unet_joint_blocks_7_x_block_attn_qkv" in n and "1 of 2" in n for n in notes), notes
