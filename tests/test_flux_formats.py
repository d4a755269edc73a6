"""Every Flux LoRA key format, on a BFL-named model (Forge/ComfyUI/single files) and on diffusers' own Flux model,
equals PEFT's merge of the same layers on the diffusers twin (relative error ≤ 1e-5, fp32), untouched weights and
strength 0 bit-exact. The reference adapter is made by PEFT and saved by diffusers (`save_lora_weights` with
`lora_adapter_metadata`: alpha ≠ r, alpha_pattern, rank_pattern, rsLoRA, DoRA, lora_bias); the other formats are
the same layers written from their documented layouts (flux_references.py)."""

import pytest
import torch

import flux_material as fm
import flux_references as refs
from lib_adapters import Adapter
from lib_adapters.hosts.diffusers import DiffusersAdapters
from lib_adapters.naming import LayerMap, build_plan
from lib_adapters.patching import Patcher, StateDictStore

ROOT = "model.diffusion_model."
TOL = 1e-5


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return refs.peft_reference(seed=0, save_dir=str(tmp_path_factory.mktemp("peft")))


def bfl_checkpoint(base):
    return {ROOT + k: v.clone() for k, v in fm.to_bfl(base).items()}


def merged_on_bfl(adapter, strength, base):
    """Our merge on the BFL twin of `base`, mapped back to diffusers names; and the unmatched keys."""
    ckpt = bfl_checkpoint(base)
    plan, unmatched = build_plan([(adapter, strength, strength)], LayerMap.for_checkpoint(ckpt))
    Patcher(StateDictStore(ckpt)).reconcile(plan)
    return fm.from_bfl({k[len(ROOT):]: v for k, v in ckpt.items()}), unmatched[adapter.path]


def merged_on_diffusers(adapter, strength, base):
    """Our merge through the diffusers host on a fresh diffusers Flux model holding `base`."""
    model = fm.transformer()
    model.load_state_dict(base)
    with DiffusersAdapters(transformer=model) as host:
        host.apply([(adapter, strength)])
        assert not any(host.unmatched.values()), host.unmatched
        got = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())  # restored on exit
    return got


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def assert_state(got, want, base):
    changed = 0
    for k, w in want.items():
        if torch.equal(w, base[k]):
            assert torch.equal(got[k], base[k]), f"untouched {k} changed"
        else:
            assert rel(got[k], w) <= TOL, (k, rel(got[k], w))
            changed += 1
    assert changed, "nothing was patched"


def all_modules(ref):
    return set(ref.factors)


FORMATS = {  # name → (tensors, metadata, modules covered)
    "diffusers": lambda ref: (*ref.files["diffusers"], all_modules(ref)),
    "peft-bare": lambda ref: ({k.removeprefix("transformer."): v for k, v in ref.files["diffusers"][0].items()},
                              bare_metadata(ref.files["diffusers"][1]), all_modules(ref)),
    "kohya": lambda ref: (refs.kohya(ref), {}, all_modules(ref)),
    "comfy": lambda ref: (refs.comfy(ref), {}, all_modules(ref)),
    "fal-kontext": lambda ref: (refs.fal(ref), {}, all_modules(ref)),
    "onetrainer-legacy": lambda ref: (refs.onetrainer_legacy(ref), {}, all_modules(ref)),
    "omi": lambda ref: (refs.omi(ref), {}, all_modules(ref)),
    "xlabs": lambda ref: _xlabs(ref),
    "kohya-split-qkv": lambda ref: (refs.split_qkv_kohya(ref)[0], {},
                                    {p for _, parts in fm.fused_groups() for p in parts}),
}


def _xlabs(ref):
    tensors, covered = refs.xlabs(ref)
    return tensors, {}, covered


def bare_metadata(metadata):
    import json
    cfg = json.loads(metadata["lora_adapter_metadata"])
    return {"lora_adapter_metadata": json.dumps({k.removeprefix("transformer."): v for k, v in cfg.items()})}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_merges_like_peft_on_the_bfl_model(ref, fmt):
    tensors, metadata, covered = FORMATS[fmt](ref)
    adapter = Adapter.from_tensors(tensors, metadata, f"{fmt}.safetensors")
    assert adapter.family == "flux" and not adapter.unmatched
    got, unmatched = merged_on_bfl(adapter, 0.7, ref.base)
    assert unmatched == []
    assert_state(got, ref.expected(0.7, covered), ref.base)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "xlabs", "omi", "kohya-split-qkv"])
def test_every_format_merges_like_peft_on_the_diffusers_model(ref, fmt):
    tensors, metadata, covered = FORMATS[fmt](ref)
    adapter = Adapter.from_tensors(tensors, metadata, f"{fmt}.safetensors")
    got = merged_on_diffusers(adapter, -0.6, ref.base)
    assert_state(got, ref.expected(-0.6, covered), ref.base)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_strength_zero_is_bit_exact(ref, fmt):
    tensors, metadata, _ = FORMATS[fmt](ref)
    adapter = Adapter.from_tensors(tensors, metadata, f"{fmt}.safetensors")
    got, _ = merged_on_bfl(adapter, 0.0, ref.base)
    assert all(torch.equal(got[k], v) for k, v in ref.base.items())


def test_peft_metadata_sets_each_layers_scale(ref):
    """Forge and ComfyUI ignore `lora_adapter_metadata` (scale 1): the file's layers must carry alpha/r with the
    alpha_pattern and rank_pattern overrides."""
    tensors, metadata = ref.files["diffusers"]
    adapter = Adapter.from_tensors(tensors, metadata)
    scales = {k.removeprefix("transformer."): p.scale for k, p in adapter.layers.items()}
    assert scales == pytest.approx({k: s for k, (_, _, s) in ref.factors.items()})
    assert len(set(scales.values())) >= 3  # 6/4, 3/4 (proj_mlp), 2/4 (to_add_out), 6/2, 6/3 (rank patterns)


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_rslora_and_dora_files_merge_like_peft(tmp_path, variant):
    ref = refs.peft_reference(seed=4, rslora=variant == "rslora", dora=variant == "dora", patterns=False,
                              save_dir=str(tmp_path))
    tensors, metadata = ref.files["diffusers"]
    adapter = Adapter.from_tensors(tensors, metadata, f"{variant}.safetensors")
    assert adapter.summary()["dora"] == (variant == "dora")
    for strength in (1.0, 0.5):
        got, _ = merged_on_bfl(adapter, strength, ref.base)
        assert_state(got, ref.expected(strength, all_modules(ref)), ref.base)
    got = merged_on_diffusers(adapter, 1.0, ref.base)
    assert_state(got, ref.expected(1.0, all_modules(ref)), ref.base)


def test_split_qkv_files_keep_host_parity_and_inspect_tells_the_training_scale(ref):
    """kohya split_qkv files are applied at alpha/(3r) (linear1: alpha/(4r)) as Forge, ComfyUI, sd-scripts and
    diffusers apply them; inspect says so and gives the scale they were trained at (alpha/r)."""
    tensors, trained = refs.split_qkv_kohya(ref)
    adapter = Adapter.from_tensors(tensors, {}, "split.safetensors")
    info = adapter.summary()["split_qkv"]
    assert info["layers"] == len(trained)
    assert sorted(info["trained_scales"]) == sorted({f"{s:g}" for s in trained.values()})
    plain = Adapter.from_tensors(refs.kohya(ref), {}, "plain.safetensors")
    assert plain.summary().get("split_qkv") is None


def test_bfl_control_lora_with_bias_and_norms_merges_like_peft(tmp_path):
    """BFL Control LoRAs: every Linear with a lora_B bias (a bias delta), scale 1, norm gains replaced."""
    ref = refs.peft_reference(seed=6, alpha=4.0, lora_bias=True, patterns=False)
    norms, want_norms = {}, {}
    g = torch.Generator().manual_seed(9)
    for bfl, dif in fm.module_pairs():
        if bfl.endswith("_norm"):
            value = 1 + 0.1 * torch.randn(fm.HEAD_DIM, generator=g)
            norms[f"{bfl}.scale"], want_norms[f"{dif}.weight"] = value, value
    adapter = Adapter.from_tensors(refs.bfl_control(ref, norms), {}, "control.safetensors")
    assert adapter.key_format == "bfl-control" and not adapter.unmatched
    want = ref.expected(1.0, all_modules(ref))
    want.update(want_norms)
    got, unmatched = merged_on_bfl(adapter, 1.0, ref.base)
    assert unmatched == []
    assert_state(got, want, ref.base)
    got = merged_on_diffusers(adapter, 1.0, ref.base)
    assert_state(got, want, ref.base)


def test_bfl_control_lora_for_wider_input_is_refused_naming_the_channels(ref):
    """FLUX.1 Canny/Depth LoRAs train img_in on 128 channels (here 2× the tiny model's): on a model without those
    input channels the whole file is refused with a message that says so; nothing is applied."""
    from lib_adapters.errors import AdapterError

    tensors = refs.bfl_control(ref, {"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(fm.HEAD_DIM)})
    tensors["img_in.lora_A.weight"] = torch.randn(4, 2 * fm.CONFIG["in_channels"])
    adapter = Adapter.from_tensors(tensors, {}, "canny.safetensors")
    with pytest.raises(AdapterError) as e:
        merged_on_bfl(adapter, 1.0, ref.base)
    assert "canny.safetensors" in str(e.value) and "img_in" in str(e.value) and "input channels" in str(e.value)


def peft_text_encoder(model, targets, seed):
    """PEFT LoRA on every target Linear of a text encoder; (wrapped model, {module: (A, B, scale)})."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    factors = {}
    with torch.no_grad():
        for name, module in wrapped.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.lora_A["default"].weight.copy_(0.2 * torch.randn(module.lora_A["default"].weight.shape, generator=g))
                module.lora_B["default"].weight.copy_(0.2 * torch.randn(module.lora_B["default"].weight.shape, generator=g))
                factors[name] = (module.lora_A["default"].weight.clone(), module.lora_B["default"].weight.clone(),
                                 float(module.scaling["default"]))
    return wrapped, factors


TE_SPELLINGS = {  # format → (CLIP-L prefix, T5 prefix, dotted?)
    "kohya": ("lora_te1_text_model_", "lora_te3_", False),
    "onetrainer-legacy": ("lora_te1_text_model_", "lora_te2_", False),
    "comfy": ("text_encoders.clip_l.transformer.text_model.", "text_encoders.t5xxl.transformer.", True),
    "omi": ("clip_l.text_model.", "t5.", True),
}


@pytest.mark.parametrize("fmt", sorted(TE_SPELLINGS))
def test_clip_l_and_t5_layers_take_the_text_encoder_strength(ref, fmt):
    from peft.tuners.tuners_utils import BaseTunerLayer

    clip_prefix, t5_prefix, dotted = TE_SPELLINGS[fmt]
    clip, clip_f = peft_text_encoder(fm.clip_l(), ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], 11)
    t5, t5_f = peft_text_encoder(fm.t5(), ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], 12)
    tensors = refs.kohya(ref)
    for prefix, factors in ((clip_prefix, clip_f), (t5_prefix, t5_f)):
        for module, (a, b, s) in factors.items():
            name = prefix + (module if dotted else module.replace(".", "_"))
            tensors.update(refs._lora(name, a, b, s * a.shape[0]))
    adapter = Adapter.from_tensors(tensors, {}, f"{fmt}-te.safetensors")
    assert adapter.family == "flux" and not adapter.unmatched
    want = {}
    for wrapped, root in ((clip, "text_encoders.clip_l.transformer.text_model."), (t5, "text_encoders.t5xxl.transformer.")):
        with torch.no_grad():
            for module in wrapped.modules():
                if isinstance(module, BaseTunerLayer):
                    module.scale_layer(0.8)
                    module.merge()
        for k, v in wrapped.base_model.model.state_dict().items():
            if "lora_" not in k:
                want[root + k.replace(".base_layer.", ".")] = v
    ckpt = fm.checkpoint(fm.transformer(0), vae=False)
    base = {k: v.clone() for k, v in ckpt.items()}
    plan, unmatched = build_plan([(adapter, 0.5, 0.8)], LayerMap.for_checkpoint(ckpt))
    assert unmatched[adapter.path] == []
    Patcher(StateDictStore(ckpt)).reconcile(plan)
    te_changed = 0
    for k, v in want.items():
        if k not in ckpt:
            continue
        if torch.equal(v, base[k]):
            assert torch.equal(ckpt[k], base[k]), k
        else:
            assert rel(ckpt[k], v) <= TOL, (k, rel(ckpt[k], v))
            te_changed += 1
    assert te_changed == 2 * 6 + 2 * 7 and len(clip_f) + len(t5_f) == te_changed
    transformer = fm.from_bfl({k[len(ROOT):]: v for k, v in ckpt.items() if k.startswith(ROOT)})
    assert_state(transformer, ref.expected(0.5, all_modules(ref)), ref.base)
