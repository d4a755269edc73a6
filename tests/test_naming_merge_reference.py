"""Merging adapters into a single-file checkpoint equals what the reference libraries do on the diffusers model.

Adapters are made by LyCORIS (kohya diffusers-style names, sgm-style names for SDXL, kohya OFT `oft_unet_`,
loha/ia3 on the fused OpenCLIP q/k/v) and by PEFT + diffusers `save_lora_weights`, on tiny models with the real
topology. Our `merge` output is converted back with diffusers' own single-file loaders and compared layer by
layer with the LyCORIS-hooked modules (forward) or PEFT's merged weights; untouched weights must be bit-identical.
"""

import functools

import pytest
import torch
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_open_clip_checkpoint)
from safetensors.torch import save_file

from lib_adapters.files import load_tensors
from lib_adapters.merge import merge
from lib_adapters.models import build_tiny, to_checkpoint

UNET_ALL = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
UNET_ATTN = ["Transformer2DModel"]
TE_ALL = ["CLIPAttention", "CLIPMLP"]
TE_ATTN = ["CLIPAttention"]
SEED = 11
S_UNET, S_TE = 0.7, -0.6
WORST: dict[str, float] = {}  # case → largest |ours − reference| (read by the report script, not asserted)


@functools.lru_cache(maxsize=None)
def base_checkpoint(family, tmp_dir):
    path = f"{tmp_dir}/{family}-base.safetensors"
    save_file({k: v.contiguous() for k, v in to_checkpoint(build_tiny(family, SEED)).items()}, path)
    return path


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ref"))


def text_slots(family):
    """(component, kohya prefix) of each text encoder."""
    if family == "sdxl":
        return [("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")]
    return [("text_encoder", "lora_te")]


def back_to_diffusers(family, ckpt, comps):
    """diffusers state dicts from a single-file checkpoint, by diffusers' own loaders, keyed like `comps`."""
    out = {"unet": convert_ldm_unet_checkpoint(ckpt, dict(comps["unet"].config))}
    roots = {"sd1": [("text_encoder", "cond_stage_model.transformer.", False)],
             "sd2": [("text_encoder", "cond_stage_model.model.", True)],
             "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.", False),
                      ("text_encoder_2", "conditioner.embedders.1.model.", True)]}[family]
    for name, prefix, openclip in roots:
        model = comps[name]
        if openclip:
            state = convert_open_clip_checkpoint(model, ckpt, prefix=prefix)
        else:
            state = convert_ldm_clip_checkpoint({k: v for k, v in ckpt.items() if k.startswith(prefix)}, prefix)
        strip = lambda k: k.removeprefix("text_model.")  # noqa: E731
        own = {strip(k): k for k in model.state_dict()}
        out[name] = {own[strip(k)]: v for k, v in state.items() if strip(k) in own}
    return out


def lycoris_network(model, prefix, modules, algo, strength, **kw):
    from lycoris import LycorisNetwork, create_lycoris
    LycorisNetwork.apply_preset({"target_module": modules, "target_name": [], "lora_prefix": prefix,
                                 "enable_conv": True, "module_algo_map": {}, "name_algo_map": {},
                                 "exclude_name": [], "use_fnmatch": False})
    net = create_lycoris(model, strength, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=3, algo=algo,
                         warn_on_unmatched=False, **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def wrapped_modules(net, model):
    ids = {id(m): name for name, m in model.named_modules()}
    return {ids[id(lo.org_module[0] if isinstance(lo.org_module, list) else lo.org_module)]: lo for lo in net.loras}


def probe(module):
    if isinstance(module, torch.nn.Linear):
        return torch.eye(module.in_features)
    return torch.randn(2, module.in_channels, 6, 6, generator=torch.Generator().manual_seed(1))


def assert_matches_hooked(ref_model, ours, merged_state, base_state, hooked, strength_name):
    """Hooked (reference) modules and our merged weights give the same outputs; all else is bit-identical."""
    ours.load_state_dict(merged_state)
    worst = 0.0
    for path in hooked:
        ref_mod, our_mod = ref_model.get_submodule(path), ours.get_submodule(path)
        x = probe(our_mod)
        with torch.no_grad():
            want, got = ref_mod(x), our_mod(x)
        assert not torch.allclose(got, base_out(base_state, our_mod, path, x)), f"{path} unchanged ({strength_name})"
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5, msg=f"{path}")
        worst = max(worst, float((got - want).abs().max()))
    touched = tuple(p + "." for p in hooked)
    for k, v in base_state.items():
        if not k.startswith(touched):
            assert torch.equal(merged_state[k], v), f"untouched {k} changed"
    return worst


def base_out(base_state, module, path, x):
    saved = {n: p.detach().clone() for n, p in module.named_parameters()}
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(base_state[f"{path}.{n}"])
        y = module(x)
        for n, p in module.named_parameters():
            p.copy_(saved[n])
    return y


def run_merge(tmp_dir, family, adapter_sd, name, tag=f"{S_UNET}:{S_TE}"):
    lora_dir = f"{tmp_dir}/{name}"
    import os
    os.makedirs(lora_dir, exist_ok=True)
    save_file({k: v.detach().contiguous().float() for k, v in adapter_sd.items()}, f"{lora_dir}/{name}.safetensors",
              metadata=getattr(adapter_sd, "metadata", None))
    out = f"{tmp_dir}/{name}-out.safetensors"
    merge(base_checkpoint(family, tmp_dir), [lora_dir], out, f"photo <lora:{name}:{tag}>", log=lambda m: None)
    return load_tensors(out)[1]


def sgm_renames(comps, family, tmp_dir):
    """kohya diffusers-style UNet module name → sgm-style name, derived from diffusers' ldm loader (identity)."""
    ckpt = load_tensors(base_checkpoint(family, tmp_dir))[1]
    back = convert_ldm_unet_checkpoint(ckpt, dict(comps["unet"].config))
    by_id = {id(v): k for k, v in ckpt.items()}
    renames = {}
    for k, v in back.items():
        ldm = by_id[id(v)].removeprefix("model.diffusion_model.").rpartition(".")[0]
        renames["lora_unet_" + k.rpartition(".")[0].replace(".", "_")] = "lora_unet_" + ldm.replace(".", "_")
    return renames


CASES = [  # family, algo, unet modules, te modules, UNet spelling, unet prefix, extra LyCORIS options
    ("sd1", "lora", UNET_ALL, TE_ALL, "diffusers", "lora_unet", {}),
    ("sd1", "lokr", UNET_ATTN, TE_ATTN, "diffusers", "lora_unet", {"factor": 4}),
    ("sd1", "diag-oft", UNET_ALL, None, "diffusers", "oft_unet", {"constraint": 0}),
    ("sd2", "lora", UNET_ALL, TE_ALL, "diffusers", "lycoris", {}),
    ("sd2", "loha", UNET_ATTN, TE_ATTN, "diffusers", "lora_unet", {}),
    ("sd2", "ia3", UNET_ATTN, TE_ATTN, "diffusers", "lora_unet", {}),
    ("sd2", "lokr", UNET_ATTN, TE_ALL, "diffusers", "lora_unet", {"factor": 4}),
    ("sd2", "diag-oft", UNET_ATTN, TE_ATTN, "diffusers", "oft_unet", {"constraint": 0}),
    ("sdxl", "lora", UNET_ALL, TE_ALL, "sgm", "lora_unet", {}),
    ("sdxl", "lokr", UNET_ATTN, TE_ATTN, "diffusers", "lora_unet", {}),
    ("sdxl", "diag-oft", UNET_ATTN, TE_ATTN, "sgm", "oft_unet", {"constraint": 1e-3}),
    ("sdxl", "loha", UNET_ATTN, TE_ATTN, "sgm", "lora_unet", {}),
    ("sdxl", "ia3", None, TE_ATTN, "sgm", "lora_unet", {}),
]


@pytest.mark.parametrize("family,algo,unet_mods,te_mods,spelling,prefix,options", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[4]}-{c[5]}" for c in CASES])
def test_lycoris_adapter_merges_like_lycoris_forward(tmp_dir, family, algo, unet_mods, te_mods, spelling, prefix,
                                                     options):
    ref = build_tiny(family, SEED)
    base = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in ref.items()}
    adapter, hooked = {}, {}
    if unet_mods:
        net = lycoris_network(ref["unet"], prefix, unet_mods, algo, S_UNET, **options)
        hooked["unet"] = wrapped_modules(net, ref["unet"])
        sd = net.state_dict()
        if spelling == "sgm":
            renames = sgm_renames(ref, family, tmp_dir)
            unet_prefix = prefix + "_"
            sd = {unet_prefix + renames["lora_unet_" + k.split(".")[0][len(unet_prefix):]][len("lora_unet_"):]
                  + "." + k.split(".", 1)[1]: v for k, v in sd.items()}
        adapter.update(sd)
    if te_mods:
        for comp, te_prefix in text_slots(family):
            has_level = any(n.startswith("text_model.") for n, _ in ref[comp].named_modules())
            net = lycoris_network(ref[comp], te_prefix + ("" if has_level else "_text_model"), te_mods, algo, S_TE,
                                  **options)
            hooked[comp] = wrapped_modules(net, ref[comp])
            adapter.update(net.state_dict())
    name = f"{family}_{algo}_{spelling}_{prefix}".replace("-", "")
    assert all(k.startswith(("lora_unet_", "oft_unet_", "lycoris_", "lora_te_text_model_", "lora_te1_text_model_",
                             "lora_te2_text_model_")) and "text_model_text_model" not in k for k in adapter)
    out = run_merge(tmp_dir, family, adapter, name)
    merged = back_to_diffusers(family, out, ref)
    fresh = build_tiny(family, SEED)
    for comp, paths in hooked.items():
        assert paths, f"LyCORIS wrapped nothing in {comp}"
        WORST[f"{name}:{comp}"] = assert_matches_hooked(ref[comp], fresh[comp], merged[comp], base[comp], paths, comp)
    for comp in set(ref) - set(hooked) - {"vae"}:
        for k, v in base[comp].items():
            assert torch.equal(merged[comp][k], v)


class _Meta(dict):
    metadata = None


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_peft_diffusers_file_merges_like_peft(tmp_dir, family):
    """A diffusers `save_lora_weights` file (PEFT LoRA, lora_alpha ≠ r) equals PEFT's merge at the tag strengths."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    ref = build_tiny(family, SEED)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
        "time_emb_proj", "conv_shortcut"])
    te_cfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    torch.manual_seed(SEED)
    ref["unet"].add_adapter(unet_cfg)
    kwargs = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(ref["unet"])),
              "unet_lora_adapter_metadata": unet_cfg.to_dict()}
    tes = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    for comp in tes:
        ref[comp].add_adapter(te_cfg)
        kwargs[f"{comp}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(ref[comp]))
        kwargs[f"{comp}_lora_adapter_metadata"] = te_cfg.to_dict()
    pipe = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    name = f"peft_{family}"
    import os
    os.makedirs(f"{tmp_dir}/{name}", exist_ok=True)
    pipe.save_lora_weights(f"{tmp_dir}/{name}", weight_name=f"{name}.safetensors", **kwargs)
    out_path = f"{tmp_dir}/{name}-out.safetensors"
    merge(base_checkpoint(family, tmp_dir), [f"{tmp_dir}/{name}"], out_path, f"<lora:{name}:{S_UNET}:{S_TE}>",
          log=lambda m: None)
    for comp, model in ref.items():
        s = S_UNET if comp == "unet" else S_TE
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.set_scale("default", s)
                m.merge()
    fresh = build_tiny(family, SEED)
    merged = back_to_diffusers(family, load_tensors(out_path)[1], fresh)
    for comp in ["unet"] + tes:
        changed = [k for k, v in fresh[comp].state_dict().items() if not torch.equal(merged[comp][k], v)]
        targeted = [n for n, m in ref[comp].named_modules() if isinstance(m, LoraLayer)]
        assert len(changed) == len(targeted) > 0, comp
        want = {k.replace(".base_layer.", "."): v for k, v in ref[comp].state_dict().items() if "lora_" not in k}
        assert sorted(want) == sorted(merged[comp])
        for k, v in want.items():
            torch.testing.assert_close(merged[comp][k], v, rtol=1e-5, atol=2e-6, msg=k)
            WORST[f"{name}:{comp}"] = max(WORST.get(f"{name}:{comp}", 0.0), float((merged[comp][k] - v).abs().max()))
