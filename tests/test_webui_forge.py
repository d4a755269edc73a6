"""The WebUI extension on a faithful fake of Forge (tests/fake_host/forge): adapters reach the weights only through
Forge's ModelPatcher/LoraLoader (clones in forge_objects_after_applying_lora, our math as a registered weight
calculator), exactly: LoRA against independent float64 math, other algorithms bit-identical to the core Patcher."""

import hashlib
import os

import pytest
import torch

from fake_host import harness
from fake_host.adapters import KEYS, expected, to_forge, write_lora, write_mixed
from fake_host.models import A1111Model, forge_engine

ATOL = 2e-5


@pytest.fixture
def host(tmp_path):
    return harness.start(tmp_path, flavour="forge")


def lora(host, family, name, **kw):
    """Write a LoRA (shapes from an A1111-layout twin of the same widths); effects in Forge names."""
    return to_forge(write_lora(os.path.join(host.lora_dir, f"{name}.safetensors"), A1111Model(family), family, **kw))


def assert_weights(now, original, applied, touched=None):
    want = expected(original, applied)
    touched = set(touched if touched is not None else [n for eff, _, _ in applied for n in eff])
    for name, value in now.items():
        if name in touched:
            assert torch.allclose(value.double(), want[name], atol=ATOL, rtol=0), name
        else:
            assert torch.equal(value, original[name]), name


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_adapters_go_through_forge_patchers_at_their_strengths(host, family):
    engine = host.use(forge_engine(family, seed=1))
    effects = lora(host, family, "a", seed=2)
    original = host.snapshot()
    res, seen, _ = host.generate("cat <lora:a:0.7:0.3>")
    assert_weights(seen["first_pass"][0], original, [(effects, 0.7, 0.3)])
    after = engine.forge_objects_after_applying_lora
    assert after.unet is not engine.forge_objects_original.unet and after.clip is not engine.forge_objects_original.clip
    assert all(ident[0].startswith("lib_adapters/") for ident in after.unet.lora_patches)
    assert engine.current_lora_hash == "[]"  # the builtin's state is left alone
    _, seen, _ = host.generate("cat")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_every_algorithm_is_bit_identical_to_the_core_patcher(host):
    from lib_adapters import Adapter
    from lib_adapters.hosts import forge
    from lib_adapters.naming import build_plan
    from lib_adapters.patching import Patcher, StateDictStore

    engine = host.use(forge_engine("sd1", seed=4))
    path = os.path.join(host.lora_dir, "mixed.safetensors")
    write_mixed(path)
    original = host.snapshot()
    _, seen, _ = host.generate("<lora:mixed:0.8:0.6>")
    now = seen["first_pass"][0]
    state = forge.build_state(engine)
    store = StateDictStore({canon: original[("u." if comp == "unet" else "c.") + name].clone()
                            for canon, (comp, name) in state.to_forge.items()})
    plan, _ = build_plan([(Adapter.load(path), 0.8, 0.6)], state.layer_map)
    Patcher(store).reconcile(plan)
    changed = 0
    for canon, (comp, name) in state.to_forge.items():
        live = now[("u." if comp == "unet" else "c.") + name]
        assert torch.equal(live, store.tensors[canon]), name
        changed += not torch.equal(live, original[("u." if comp == "unet" else "c.") + name])
    assert changed == 9  # 7 weights + the full patch's conv bias + the norm patch's bias


def test_unchanged_adapters_are_not_merged_again_and_changes_are(host):
    engine = host.use(forge_engine("sd1"))
    keys = list(KEYS["sd1"])
    a = lora(host, "sd1", "a", keys=keys[:4])
    original = host.snapshot()
    loader = engine.forge_objects_original.unet.model.lora_loader
    host.generate("<lora:a:1>")
    merges = loader.merge_count
    host.generate("<lora:a:1>", n_iter=2, enable_hr=True)
    assert loader.merge_count == merges  # same patcher object: Forge re-merges nothing
    _, seen, _ = host.generate("<lora:a:0.25>")
    assert loader.merge_count > merges
    assert_weights(seen["first_pass"][0], original, [(a, 0.25, 0.25)])


def test_unknown_name_clears_the_previous_adapters(host):
    host.use(forge_engine("sd1"))
    a = lora(host, "sd1", "a")
    original = host.snapshot()
    host.generate("<lora:a:1>")
    res, seen, _ = host.generate("<lora:missing:1>")
    assert "missing" in res.comments
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())
    assert a


def test_hires_pass_uses_its_own_adapters(host):
    host.use(forge_engine("sdxl"))
    keys = list(KEYS["sdxl"])
    a = lora(host, "sdxl", "a", keys=keys[:3], seed=1)
    b = lora(host, "sdxl", "b", keys=keys[2:], seed=2)
    original = host.snapshot()
    _, seen, _ = host.generate("<lora:a:1>", enable_hr=True, hr_prompt="<lora:b:0.5:1>")
    assert_weights(seen["first_pass"][0], original, [(a, 1.0, 1.0)])
    assert_weights(seen["hires"][0], original, [(b, 0.5, 1.0)])


def test_text_encoder_change_reaches_conditioning(host):
    from modules import processing

    engine = host.use(forge_engine("sd1"))
    lora(host, "sd1", "a")
    res, _, _ = host.generate("cat <lora:a:1:0.25>")
    host.set_option("adapters_tag_order", "te,unet")
    res, _, _ = host.generate("cat <lora:a:1:0.25>")
    clip = engine.forge_objects_after_applying_lora.clip
    assert res.conds[0][1] == processing.fingerprint(dict(clip.cond_stage_model.state_dict()))


def test_infotext_uses_forges_full_file_hash(host):
    host.use(forge_engine("sd1"))
    lora(host, "sd1", "a")
    with open(os.path.join(host.lora_dir, "a.safetensors"), "rb") as f:
        full = hashlib.sha256(f.read()).hexdigest()[:12]
    res, _, _ = host.generate("<lora:a:1>")
    assert f"Lora hashes: \"a: {full}\"" in res.infotexts[0] or f"Lora hashes: a: {full}" in res.infotexts[0]


def test_no_model_yet_is_reported_not_raised(host):
    from types import SimpleNamespace

    lora(host, "sd1", "a")
    host.use(SimpleNamespace(cond_stage_model=None))  # Forge's FakeInitialModel before the first generation
    from modules import extra_networks, processing
    p = processing.StableDiffusionProcessingTxt2Img(prompt="x")
    extra_networks.activate(p, {"lora": [extra_networks.ExtraNetworkParams(items=["a", "1"])]})
    assert any("no model" in c for c in p.comments)
