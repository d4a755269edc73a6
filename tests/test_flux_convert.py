"""`convert` on Flux files: kohya-Flux (fused BFL layers, split-qkv) → diffusers-Flux loads in diffusers itself and
fuses like PEFT's reference merge; a diffusers-saved file → kohya merges the same; kohya → diffusers → kohya gives
back the same tensors and metadata."""

import pytest
import torch
from safetensors.torch import save_file

import flux_material as fm
import flux_references as refs
from lib_adapters import Adapter
from lib_adapters.convert import HINT_KEY, convert_file
from lib_adapters.files import load_tensors
from lib_adapters.naming import LayerMap, build_plan
from lib_adapters.patching import Patcher, StateDictStore

TOL = 1e-5


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return refs.peft_reference(seed=0, save_dir=str(tmp_path_factory.mktemp("peft")))


def diffusers_fused(path, strength):
    """The weights diffusers itself gives after loading the file into the tiny transformer and fusing it."""
    from diffusers import FluxPipeline

    model = fm.transformer(0)
    state, alphas, metadata = FluxPipeline.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, alphas, transformer=model, metadata=metadata)
    model.fuse_lora(lora_scale=strength)
    model.unload_lora()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ours(path, strength, base):
    ckpt = {k: v.clone() for k, v in fm.to_bfl(base).items()}
    adapter = Adapter.load(path)
    plan, unmatched = build_plan([(adapter, strength, strength)], LayerMap.for_checkpoint(ckpt))
    assert unmatched[adapter.path] == []
    Patcher(StateDictStore(ckpt)).reconcile(plan)
    return fm.from_bfl(ckpt)


def assert_close_states(got, want, base):
    changed = 0
    for k, w in want.items():
        if torch.equal(w, base[k]):
            assert torch.equal(got[k], base[k]), k
        else:
            err = float((got[k].double() - w.double()).abs().max() / w.double().abs().max())
            assert err <= TOL, (k, err)
            changed += 1
    assert changed


@pytest.mark.parametrize("layout", ["kohya", "split-qkv"])
def test_kohya_flux_converted_loads_in_diffusers_and_fuses_like_peft(ref, tmp_path, layout):
    if layout == "kohya":
        tensors, covered = refs.kohya(ref), set(ref.factors)
    else:
        tensors, covered = refs.split_qkv_kohya(ref)[0], {p for _, ps in fm.fused_groups() for p in ps}
    src, dst = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    save_file(tensors, str(src), metadata={"ss_base_model_version": "flux1", "ss_network_dim": "4"})
    convert_file(src, dst, "diffusers")
    header, converted = load_tensors(dst)
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in converted)
    assert header.metadata["ss_base_model_version"] == "flux1"
    assert_close_states(diffusers_fused(dst, 0.8), ref.expected(0.8, covered), ref.base)
    assert_close_states(ours(dst, 0.8, ref.base), ref.expected(0.8, covered), ref.base)


@pytest.mark.parametrize("layout", ["kohya", "split-qkv"])
def test_kohya_flux_to_diffusers_to_kohya_is_lossless(ref, tmp_path, layout):
    tensors = refs.kohya(ref) if layout == "kohya" else refs.split_qkv_kohya(ref)[0]
    metadata = {"ss_base_model_version": "flux1", "modelspec.title": "x"}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=metadata)
    convert_file(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "diffusers")
    convert_file(tmp_path / "b.safetensors", tmp_path / "c.safetensors", "kohya")
    header, back = load_tensors(tmp_path / "c.safetensors")
    assert header.metadata == metadata and HINT_KEY not in header.metadata
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_diffusers_saved_flux_file_to_kohya_merges_like_peft(ref, tmp_path):
    """Parts with their own ranks and alpha patterns join into fused kohya layers exactly (block-diagonal where
    their downs differ, scales folded into the up)."""
    tensors, metadata = ref.files["diffusers"]
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata=metadata)
    convert_file(tmp_path / "p.safetensors", tmp_path / "k.safetensors", "kohya")
    _, kohya = load_tensors(tmp_path / "k.safetensors")
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in kohya
    assert_close_states(ours(tmp_path / "k.safetensors", -0.5, ref.base), ref.expected(-0.5, set(ref.factors)),
                        ref.base)
