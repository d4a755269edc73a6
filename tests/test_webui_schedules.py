"""Block weights and step schedules in the WebUI tag, on the fake A1111 (tests/fake_host), whose sampler calls the
host's `cfg_denoiser` callbacks on every model call: the weights each step sees, second-order samplers, the hires
pass, bit-exact restore, X/Y/Z-style prompt series, messages for bad input. Expectations are float64 LoRA math
over hand-written host names (tests/fake_host/adapters.py)."""

import os

import pytest
import torch

from fake_host import harness
from fake_host.adapters import KEYS, expected, live_name, write_lora
from fake_host.models import A1111Model

ATOL = 2e-5
# sd1 KEYS in order → the block of its layer (input_blocks.1/5, output_blocks.3, middle_block, input_blocks.1 resnet,
# then two text-encoder layers)
SD1_BLOCKS = ["IN01", "IN05", "OUT03", "M00", "IN01", "BASE", "BASE"]
LBW26 = {"BASE": 0.5, "IN01": 0.25, "IN05": 0.0, "M00": -1.0, "OUT03": 2.0}


@pytest.fixture
def host(tmp_path):
    return harness.start(tmp_path)


def lora(host, model, name, family="sd1", **kw):
    return write_lora(os.path.join(host.lora_dir, f"{name}.safetensors"), model, family, **kw)


def scaled(effects, model, factor_of_key):
    """effects with each layer's delta multiplied by its factor (keyed by the KEYS entry)."""
    out = {}
    for key, factor in factor_of_key.items():
        live = live_name(KEYS["sd1"][key][0], model)
        if live in effects:
            out[live] = [(d * factor, rows, c) for d, rows, c in effects[live]]
    return out


def assert_weights(params, originals, applied, atol=ATOL):
    want = expected(originals, applied)
    for name, value in params.items():
        assert torch.allclose(value.double(), want[name], atol=atol, rtol=0), name


def lbw26():
    blocks = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    return ",".join(str(LBW26.get(b, 1.0)) for b in blocks)


def test_block_weights_multiply_each_layers_strength(host):
    model = host.use(A1111Model("sd1", seed=1))
    effects = lora(host, model, "a", seed=2)
    original = host.snapshot()
    _, seen, _ = host.generate(f"a cat <lora:a:0.8:0.6:lbw={lbw26()}>")
    factors = dict(zip(KEYS["sd1"], (LBW26[b] for b in SD1_BLOCKS)))
    assert_weights(seen["first_pass"][0], original, [(scaled(effects, model, factors), 0.8, 0.6)])
    untouched = live_name(KEYS["sd1"][list(KEYS["sd1"])[1]][0], model)  # IN05, weight 0: bit-identical
    assert torch.equal(seen["first_pass"][0][untouched], original[untouched])


@pytest.mark.parametrize("path", ["forward", "auto"])
def test_a_ramp_moves_the_unet_every_step_and_the_text_encoder_takes_the_first_value(host, path):
    host.set_option("adapters_schedule_path", path)
    model = host.use(A1111Model("sd1", seed=1))
    effects = lora(host, model, "a", seed=2)
    original = host.snapshot()
    res, seen, _ = host.generate("<lora:a:0@0,1@1:te=0.3@0,1@1>", steps=5, per_step=True)
    snaps = seen["first_pass steps"]
    assert [i for i, _ in snaps] == [0, 1, 2, 3, 4]
    unet_keys = [k for k in KEYS["sd1"] if k.startswith("lora_unet")]
    te_keys = [k for k in KEYS["sd1"] if k.startswith("lora_te")]
    for i, snap in snaps:
        applied = [(scaled(effects, model, dict.fromkeys(unet_keys, 1.0)), i / 4, 0.0),
                   (scaled(effects, model, dict.fromkeys(te_keys, 1.0)), 0.0, 0.3)]
        assert_weights(snap, original, applied)
    assert "first step (0.3)" in res.comments and res.comments.count("first step") == 1
    stored = host.params()  # forward: the UNet layers ran on the forward path, weights untouched; auto on a CPU: merged
    untouched = [torch.equal(stored[live_name(KEYS["sd1"][k][0], model)], original[live_name(KEYS["sd1"][k][0], model)])
                 for k in unet_keys]
    assert all(untouched) if path == "forward" else not any(untouched)
    _, seen, _ = host.generate("plain")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_second_order_samplers_count_steps_not_model_calls(host):
    model = host.use(A1111Model("sd1", seed=1))
    effects = lora(host, model, "a", seed=2, te=False)
    original = host.snapshot()
    _, seen, _ = host.generate("<lora:a:0@0,1@1>", steps=3, sampler_name="Heun", per_step=True)
    snaps = seen["first_pass steps"]
    assert [i for i, _ in snaps] == [0, 0, 1, 1, 2]
    for i, snap in snaps:
        assert_weights(snap, original, [(effects, i / 2, 0.0)])


def test_absolute_steps_and_a_constant_schedule_equal_fixed_strengths_bit_exactly(host):
    model = host.use(A1111Model("sd1", seed=1))
    lora(host, model, "a", seed=2)
    fixed = {}
    for s in (0.0, 0.7):
        _, seen, _ = host.generate(f"<lora:a:{s}>", steps=3, per_step=True)
        fixed[s] = seen["first_pass steps"][0][1]
    _, seen, _ = host.generate("<lora:a:0.7@0,0.7@1>", steps=3, per_step=True)
    assert all(torch.equal(snap[k], fixed[0.7][k]) for _, snap in seen["first_pass steps"] for k in snap)
    _, seen, _ = host.generate("<lora:a:0@2,0.7@3:te=0>", steps=4, per_step=True)  # steps 1-2 at 0, 3-4 at 0.7
    snaps = [snap for _, snap in seen["first_pass steps"]]
    unet = [k for k in snaps[0] if "diffusion_model" in k]
    for snap, want in zip(snaps, (0.0, 0.0, 0.7, 0.7)):
        assert all(torch.equal(snap[k], fixed[want][k]) for k in unet)


def test_hires_pass_has_its_own_schedule_and_restores_exactly(host):
    model = host.use(A1111Model("sd1", seed=1))
    effects = lora(host, model, "a", seed=2)
    original = host.snapshot()
    res, seen, _ = host.generate("<lora:a:0.5:hr=0@0,1@1>", enable_hr=True, steps=2, hr_second_pass_steps=3,
                                 per_step=True)
    unet_keys = [k for k in KEYS["sd1"] if k.startswith("lora_unet")]
    te_keys = [k for k in KEYS["sd1"] if k.startswith("lora_te")]
    for _, snap in seen["first_pass steps"]:
        assert_weights(snap, original, [(effects, 0.5, 0.5)])
    for i, snap in seen["hires steps"]:
        assert_weights(snap, original, [(scaled(effects, model, dict.fromkeys(unet_keys, 1.0)), i / 2, 0.0),
                                        (scaled(effects, model, dict.fromkeys(te_keys, 1.0)), 0.0, 0.0)])
    assert "first step (0)" in res.comments
    _, seen, _ = host.generate("plain")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_a_series_of_prompts_over_presets_and_schedules_like_xyz_plot(host):
    model = host.use(A1111Model("sd1", seed=1))
    effects = lora(host, model, "a", seed=2, te=False)
    original = host.snapshot()
    unet_keys = [k for k in KEYS["sd1"] if k.startswith("lora_unet")]
    presets = {"ALL": [1, 1, 1, 1, 1], "OUTD": [0, 0, 1, 0, 0], "INS": [1, 0, 0, 0, 1], "NONE": [0, 0, 0, 0, 0]}
    for name, factors in presets.items():
        res, seen, _ = host.generate(f"x <lora:a:0.9:lbw={name}>")
        assert_weights(seen["first_pass"][0], original, [(scaled(effects, model, dict(zip(unet_keys, factors))),
                                                          0.9, 0.9)])
        assert f"lbw={name}" in res.infotexts[0]  # the tag as written, so a pasted prompt makes it again
    for schedule, last in (("1@0,0@1", 0.0), ("0@0,1@0.5", 1.0)):
        _, seen, _ = host.generate(f"x <lora:a:{schedule}>", steps=3, per_step=True)
        assert_weights(seen["first_pass steps"][-1][1], original, [(effects, last, 0.0)])


@pytest.mark.parametrize("tag,words", [
    ("<lora:a:1:lbw=1,0,1>", ["3 block weights", "17 or 26"]),
    ("<lora:a:1:lbw=NOSUCH>", ["unknown block-weight preset 'NOSUCH'"]),
    ("<lora:a:0@0,1@x>", ["'x' is not a number"]),
    ("<lora:a:1:lbwe=ATTNON>", ["lbwe="]),
])
def test_bad_input_gives_one_message_and_the_image_is_made_without_the_adapter(host, tag, words):
    model = host.use(A1111Model("sd1", seed=1))
    lora(host, model, "a", seed=2)
    original = host.snapshot()
    res, seen, _ = host.generate(f"x {tag}")
    lines = [line for line in res.comments.splitlines() if line]
    assert len(lines) == 1 and all(w in lines[0] for w in words) and "made without it" in lines[0], lines
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_presets_from_the_reference_extensions_file(host, tmp_path):
    from modules import paths_internal

    folder = os.path.join(paths_internal.extensions_dir, "sd-webui-lora-block-weight", "scripts")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lbwpresets.txt"), "w") as f:
        f.write("ONLYMID:0,0,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0\n")
    model = host.use(A1111Model("sd1", seed=1))
    effects = lora(host, model, "a", seed=2, te=False)
    original = host.snapshot()
    _, seen, _ = host.generate("<lora:a:1:lbw=ONLYMID>")
    factors = dict(zip(KEYS["sd1"], (1.0 if b == "M00" else 0.0 for b in SD1_BLOCKS)))
    assert_weights(seen["first_pass"][0], original, [(scaled(effects, model, factors), 1.0, 1.0)])


# ---- Forge ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def forge_host(tmp_path):
    return harness.start(tmp_path, flavour="forge")


def forge_lora(host, name, family="sd1", **kw):
    from fake_host.adapters import to_forge

    return to_forge(write_lora(os.path.join(host.lora_dir, f"{name}.safetensors"), A1111Model(family), family, **kw))


def test_forge_moves_scheduled_weights_every_step_outside_its_patchers(forge_host):
    from fake_host.models import forge_engine

    engine = forge_host.use(forge_engine("sd1", seed=1))
    effects = forge_lora(forge_host, "a", seed=2)
    original = forge_host.snapshot()
    _, seen, _ = forge_host.generate("<lora:a:0@0,1@1>", steps=3, per_step=True)
    unet = {k: v for k, v in effects.items() if k.startswith("u.")}
    for i, snap in seen["first_pass steps"]:
        assert_weights(snap, original, [(unet, i / 2, 0.0)])
    patched = {key for ident, patches in engine.forge_objects_after_applying_lora.unet.lora_patches.items()
               for key in patches}
    assert not patched  # the scheduled adapter never entered Forge's UNet patches
    _, seen, _ = forge_host.generate("plain")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_forge_ramp_runs_on_the_forward_path_outside_its_patchers(forge_host):
    from fake_host.models import forge_engine

    forge_host.set_option("adapters_schedule_path", "forward")
    engine = forge_host.use(forge_engine("sd1", seed=1))
    effects = forge_lora(forge_host, "a", seed=2)
    original = forge_host.snapshot()
    _, seen, _ = forge_host.generate("<lora:a:1@0,0@1:te=0.5>", steps=5, per_step=True)
    unet = {k: v for k, v in effects.items() if k.startswith("u.")}
    te = {k: v for k, v in effects.items() if k.startswith("c.")}
    for i, snap in seen["first_pass steps"]:
        assert_weights(snap, original, [(unet, 1 - i / 4, 0.0), (te, 0.0, 0.5)])
    stored = forge_host.params()
    assert all(torch.equal(stored[k], original[k]) for k in unet)
    assert not any(k.startswith("diffusion_model.") for patches in
                   engine.forge_objects_after_applying_lora.unet.lora_patches.values() for k in patches)
    _, seen, _ = forge_host.generate("plain")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_forge_schedule_that_reduces_to_a_fixed_strength_gives_the_fixed_weights_bit_exactly(forge_host):
    from fake_host.models import forge_engine

    forge_host.use(forge_engine("sd1", seed=1, dtype=torch.float16))
    forge_lora(forge_host, "a", seed=2)
    original = forge_host.snapshot()
    _, seen, _ = forge_host.generate("<lora:a:1>", steps=2)
    fixed = seen["first_pass"][0]
    # 1 before step 3 and 0 from step 4: over two steps, 1 throughout (written by us, not by Forge's merge)
    for prompt in ("<lora:a:1@3,0@4:te=1>", "<lora:a:1:stop=2>"):
        _, seen, _ = forge_host.generate(prompt, steps=2, per_step=True)
        for _, snap in seen["first_pass steps"]:
            assert all(torch.equal(snap[k], fixed[k]) for k in snap), prompt
    _, seen, _ = forge_host.generate("<lora:a:1:start=2>", steps=2, per_step=True)  # acts from step 3: never
    unet = [k for k in original if k.startswith("u.")]
    assert all(torch.equal(snap[k], original[k]) for _, snap in seen["first_pass steps"] for k in unet)
    _, seen, _ = forge_host.generate("<lora:a:1>", steps=2)  # back to Forge's own merge, from the originals
    assert all(torch.equal(seen["first_pass"][0][k], fixed[k]) for k in fixed)


def test_the_way_a_schedule_is_applied_follows_the_setting_the_device_and_the_changes():
    from lib_adapters.hosts.steps import choose
    from lib_adapters.schedules import StepEntry, StepPlan, parse_strength

    def plan(text):
        p = StepPlan()
        p.entries.append(StepEntry(None, parse_strength(text) if "@" in text else float(text), 1.0))
        p.te_values.append(1.0)
        return p

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose(plan("0.5"), 20, cuda) == "fixed"
    assert choose(plan("0@0,1@1"), 20, cuda) == "forward" and choose(plan("0@0,1@1"), 20, cpu) == "merge"
    assert choose(plan("0@0,1@1"), 3, cuda) == "merge"          # two changes
    assert choose(plan("1@10,0@11"), 20, cuda) == "merge"        # one change
    assert choose(plan("0@0,1@1"), 20, cpu, "forward") == "forward"
    assert choose(plan("0@0,1@1"), 20, cuda, "merge") == "merge"


def test_forge_quantized_unet_takes_a_schedule_on_the_forward_path_bytes_untouched(forge_host):
    from fake_host.models import forge_engine
    from modules import processing
    from test_webui_forge_quantized import assert_forward, stored_bytes

    engine = forge_host.use(forge_engine("sd1", seed=1, storage="fp8"))
    effects = {k: v for k, v in forge_lora(forge_host, "a", seed=2).items() if k.startswith("u.")}
    before = stored_bytes(engine)
    checked = []

    def at_step(phase, i, p):
        assert_forward(engine, effects, i / 2, effects)
        checked.append(i)

    p = processing.StableDiffusionProcessingTxt2Img(prompt="<lora:a:0@0,1@1>", steps=3)
    processing.process_images(p, observe_step=at_step)
    assert checked == [0, 1, 2]
    after = stored_bytes(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_infotext_records_a_two_part_schedule_and_pasting_keeps_its_meaning(host):
    from lib_adapters.hosts import infotext

    model = host.use(A1111Model("sd1", seed=1))
    lora(host, model, "a", seed=2)
    prompt = "x <lora:a:0@0,1@1:0.5:lbw=ALL>"
    res, _, _ = host.generate(prompt)
    assert prompt in res.infotexts[0] and 'Adapter strength order: "unet,te"' in res.infotexts[0]
    params = {"Prompt": prompt, infotext.ORDER_KEY: "unet,te"}
    infotext.restore_prompt(params, "te,unet", {})
    assert params["Prompt"] == "x <lora:a:0.5:0@0,1@1:lbw=ALL>"  # read te,unet: the schedule is still the UNet's
