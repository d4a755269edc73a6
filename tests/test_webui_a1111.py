"""The WebUI extension on a faithful fake of A1111 1.10 (tests/fake_host): tags, strengths, names, exact in-place
merging and bit-exact restore, infotext, cond cache, builtin take-over, API. Expectations come from independent
float64 LoRA math over hand-written host names (tests/fake_host/adapters.py), never from our own output."""

import hashlib
import json
import os
import random
import runpy
import struct

import pytest
import torch

from fake_host import FakeApp, harness
from fake_host.adapters import KEYS, expected, write_lora
from fake_host.models import A1111Model

ATOL = 2e-5


@pytest.fixture
def host(tmp_path):
    return harness.start(tmp_path)


def assert_weights(params, originals, effects_applied, touched=None):
    """Touched weights match the expectation; every other weight is bit-identical to its original."""
    want = expected({k: originals[k] for k in originals}, effects_applied)
    touched = set(touched if touched is not None else [n for eff, _, _ in effects_applied for n in eff])
    for name, value in params.items():
        if name in touched:
            assert torch.allclose(value.double(), want[name], atol=ATOL, rtol=0), name
        else:
            assert torch.equal(value, originals[name]), name


def lora(host, model, name, family, **kw):
    return write_lora(os.path.join(host.lora_dir, f"{name}.safetensors"), model, family, **kw)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tag_merges_unet_and_text_encoder_each_at_its_strength(host, family):
    model = host.use(A1111Model(family, seed=1))
    effects = lora(host, model, "a", family, seed=2)
    original = host.snapshot()
    _, seen, _ = host.generate("a cat <lora:a:0.7:0.3>")
    assert_weights(seen["first_pass"][0], original, [(effects, 0.7, 0.3)])
    _, seen, _ = host.generate("a cat")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())
    from modules import errors
    assert errors.reported == [] and errors.displayed == []  # nothing was swallowed by the host


def test_order_setting_decides_what_two_numbers_mean_and_is_recorded(host):
    from modules import infotext_utils

    model = host.use(A1111Model("sd1"))
    effects = lora(host, model, "a", "sd1")
    original = host.snapshot()
    res, seen, _ = host.generate("<lora:a:0.7:0.3>")
    assert_weights(seen["first_pass"][0], original, [(effects, 0.7, 0.3)])
    assert infotext_utils.parse_generation_parameters(res.infotexts[0])["Adapter strength order"] == "unet,te"
    host.set_option("adapters_tag_order", "te,unet")
    res, seen, _ = host.generate("<lora:a:0.7:0.3>")
    assert_weights(seen["first_pass"][0], original, [(effects, 0.3, 0.7)])
    assert infotext_utils.parse_generation_parameters(res.infotexts[0])["Adapter strength order"] == "te,unet"
    res, _, _ = host.generate("<lora:a:0.7>")
    assert "Adapter strength order" not in res.infotexts[0]


def test_named_strengths_override_and_dyn_is_ignored_with_a_notice(host):
    model = host.use(A1111Model("sd1"))
    effects = lora(host, model, "a", "sd1")
    original = host.snapshot()
    _, seen, _ = host.generate("<lora:a:unet=0.5:te=0>")
    assert_weights(seen["first_pass"][0], original, [(effects, 0.5, 0.0)],
                   touched=[n for n, items in effects.items() if items[0][2] == "unet"])
    res, seen, _ = host.generate("<lora:a:0.8:dyn=4>")
    assert_weights(seen["first_pass"][0], original, [(effects, 0.8, 0.8)])
    assert "dyn=4" in res.comments and "ignored" in res.comments


def test_text_encoder_strength_touches_only_text_encoder_weights(host):
    model = host.use(A1111Model("sdxl"))
    effects = lora(host, model, "a", "sdxl")
    original = host.snapshot()
    te_names = [n for n, items in effects.items() if items[0][2] == "te"]
    unet_names = [n for n, items in effects.items() if items[0][2] == "unet"]
    _, seen, _ = host.generate("<lora:a:0:1>")
    assert_weights(seen["first_pass"][0], original, [(effects, 0.0, 1.0)], touched=te_names)
    _, seen, _ = host.generate("<lora:a:1:0>")
    assert_weights(seen["first_pass"][0], original, [(effects, 1.0, 0.0)], touched=unet_names)


def test_random_switch_sequences_match_and_restore_bit_exactly(host):
    model = host.use(A1111Model("sd2", seed=3))
    keys = list(KEYS["sd2"])
    adapters = {"a": lora(host, model, "a", "sd2", seed=1),
                "b": lora(host, model, "b", "sd2", keys=keys[:3], seed=2, rank=3, alpha=3.0),
                "c": lora(host, model, "c", "sd2", keys=keys[2:], seed=3)}
    original = host.snapshot()
    rng = random.Random(7)
    for step in range(14):
        chosen = rng.sample(sorted(adapters), rng.randint(0, 3))
        strengths = {n: (round(rng.uniform(-1, 1.5), 2), round(rng.uniform(-1, 1.5), 2)) for n in chosen}
        prompt = "x " + " ".join(f"<lora:{n}:{u}:{t}>" for n, (u, t) in strengths.items())
        _, seen, _ = host.generate(prompt)
        now = seen["first_pass"][0]
        if not chosen:
            assert all(torch.equal(v, original[k]) for k, v in now.items()), step
        else:
            assert_weights(now, original, [(adapters[n], u, t) for n, (u, t) in strengths.items()],
                           touched=[k for n in chosen for k in adapters[n]])
    _, seen, _ = host.generate("x")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_only_changed_layers_are_recomputed(host):
    model = host.use(A1111Model("sd1"))
    keys = list(KEYS["sd1"])
    lora(host, model, "a", "sd1", keys=keys[:4])
    lora(host, model, "b", "sd1", keys=keys[4:])
    runtime = host.runtime
    host.generate("<lora:a:1> <lora:b:1>")
    assert runtime.last_stats == {"recomputed": 7, "restored": 0, "kept": 0}
    host.generate("<lora:a:1> <lora:b:0.5>")
    assert runtime.last_stats == {"recomputed": 3, "restored": 0, "kept": 4}
    host.generate("<lora:a:1> <lora:b:0.5>")
    assert runtime.last_stats == {"recomputed": 0, "restored": 0, "kept": 7}
    host.generate("<lora:b:0.5>")
    assert runtime.last_stats == {"recomputed": 0, "restored": 4, "kept": 3}


def test_hires_pass_and_batches_get_their_own_adapters(host):
    model = host.use(A1111Model("sd1"))
    keys = list(KEYS["sd1"])
    a = lora(host, model, "a", "sd1", keys=keys[:5], seed=1)
    b = lora(host, model, "b", "sd1", keys=keys[3:], seed=2)
    original = host.snapshot()
    res, seen, _ = host.generate("<lora:a:1>", enable_hr=True, hr_prompt="<lora:b:0.5>", n_iter=2, batch_size=2)
    assert len(seen["first_pass"]) == len(seen["hires"]) == 2
    for snap in seen["first_pass"]:
        assert_weights(snap, original, [(a, 1.0, 1.0)])
    for snap in seen["hires"]:
        assert_weights(snap, original, [(b, 0.5, 0.5)])
    assert len(res.infotexts) == 4
    assert all(h in res.infotexts[0] for h in ("a: ", "b: "))  # the hires pass adds to the first pass's hashes
    _, seen, _ = host.generate("plain")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_cond_cache_is_invalidated_when_text_encoder_weights_change(host):
    from modules import processing

    model = host.use(A1111Model("sd1"))
    lora(host, model, "a", "sd1")

    def te_now():
        return processing.fingerprint(dict(model.cond_stage_model.state_dict()))

    res, _, _ = host.generate("cat <lora:a:1:0.25>")
    assert res.conds[0][1] == te_now()
    host.set_option("adapters_tag_order", "te,unet")  # same prompt text, other text-encoder strength
    res, _, _ = host.generate("cat <lora:a:1:0.25>")
    assert res.conds[0][1] == te_now()
    res2, _, _ = host.generate("cat <lora:a:1:0.25>")
    assert res2.conds[0][1] == res.conds[0][1]


def test_unknown_names_and_broken_files_are_reported_and_skipped(host, capsys):
    model = host.use(A1111Model("sd1"))
    a = lora(host, model, "a", "sd1", seed=1)
    lora(host, model, "b", "sd1", seed=2)
    with open(os.path.join(host.lora_dir, "broken.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", 500) + b"{}")
    write_lora(os.path.join(host.lora_dir, "xl.safetensors"), A1111Model("sdxl"), "sdxl")
    original = host.snapshot()
    host.generate("<lora:b:1>")
    res, seen, _ = host.generate("<lora:a:1> <lora:nope:1> <lora:broken:1> <lora:xl:1>")
    assert_weights(seen["first_pass"][0], original, [(a, 1.0, 1.0)])  # b is gone, a alone applied
    lines = res.comments.splitlines()
    assert any("nope" in line and "no adapter file" in line for line in lines)
    assert any("broken" in line and "truncated" in line for line in lines)
    assert any("xl" in line and "sdxl" in line for line in lines)
    assert len(lines) == 3
    out = capsys.readouterr().out
    assert "nope" in out and "broken" in out
    assert "nope" not in res.infotexts[0].splitlines()[-1]


def test_same_file_twice_is_one_adapter_with_summed_strengths(host):
    model = host.use(A1111Model("sd1"))
    a = lora(host, model, "a", "sd1")
    original = host.snapshot()
    res, seen, _ = host.generate("<lora:a:0.5> <lora:A:0.25:0.125>")
    assert_weights(seen["first_pass"][0], original, [(a, 0.75, 0.625)])
    line = res.infotexts[0].splitlines()[-1]
    assert "Lora hashes: \"a: " in line and "A:" not in line  # one entry, named as first written


def test_names_resolve_by_alias_sub_folder_and_case(host):
    model = host.use(A1111Model("sd1"))
    os.makedirs(os.path.join(host.lora_dir, "sub"))
    s = write_lora(os.path.join(host.lora_dir, "sub", "Style_v2.safetensors"), model, "sd1",
                   metadata={"ss_output_name": "mystyle"})
    write_lora(os.path.join(host.lora_dir, "one.safetensors"), model, "sd1", metadata={"ss_output_name": "twin"})
    write_lora(os.path.join(host.lora_dir, "two.safetensors"), model, "sd1", metadata={"ss_output_name": "twin"})
    original = host.snapshot()
    for name in ("mystyle", "sub/Style_v2", "Style_v2", "style_V2"):
        res, seen, _ = host.generate(f"<lora:{name}:1>")
        assert_weights(seen["first_pass"][0], original, [(s, 1.0, 1.0)])
        assert not res.comments, name
    res, seen, _ = host.generate("<lora:twin:1>")  # an alias two files share names neither
    assert "twin" in res.comments
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())


def test_infotext_hashes_are_in_the_builtin_format(host):
    from modules import infotext_utils

    model = host.use(A1111Model("sd1"))
    lora(host, model, "a", "sd1")
    lora(host, model, "b", "sd1", metadata={"sshs_model_hash": "feedbeef0123456789"})
    with open(os.path.join(host.lora_dir, "a.safetensors"), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        addnet = hashlib.sha256(f.read()).hexdigest()[:12]
    res, _, _ = host.generate("<lora:a:1> <lora:b:0.5>")
    line = res.infotexts[0].splitlines()[-1]
    assert f'Lora hashes: "a: {addnet}, b: feedbeef0123"' in line
    assert infotext_utils.parse_generation_parameters(res.infotexts[0])["Lora hashes"] == f"a: {addnet}, b: feedbeef0123"
    host.set_option("adapters_add_hashes_to_infotext", False)
    res, _, _ = host.generate("<lora:a:1>")
    assert "Lora hashes" not in res.infotexts[0]


def test_lyco_tags_share_the_lora_state(host):
    model = host.use(A1111Model("sd1"))
    keys = list(KEYS["sd1"])
    a = lora(host, model, "a", "sd1", keys=keys[:3], seed=1)
    b = lora(host, model, "b", "sd1", keys=keys[2:], seed=2)
    original = host.snapshot()
    _, seen, _ = host.generate("<lyco:a:1> <lora:b:0.5>")
    assert_weights(seen["first_pass"][0], original, [(a, 1.0, 1.0), (b, 0.5, 0.5)])
    _, seen, _ = host.generate("<lyco:b:0.5>")
    assert_weights(seen["first_pass"][0], original, [(b, 0.5, 0.5)])


def test_float_item_from_the_add_network_option_is_accepted(host):
    from modules import extra_networks

    model = host.use(A1111Model("sd1"))
    a = lora(host, model, "a", "sd1")
    original = host.snapshot()
    from modules import processing
    p = processing.StableDiffusionProcessingTxt2Img(prompt="x")
    extra_networks.activate(p, {"lora": [extra_networks.ExtraNetworkParams(items=["a", 0.5])]})
    assert_weights(host.params(), original, [(a, 0.5, 0.5)])


def test_builtin_enabled_is_replaced_so_each_adapter_applies_once(tmp_path, capsys):
    host = harness.start(tmp_path, builtin="Lora", load=False)
    from modules import extra_networks, script_callbacks

    calls = []

    class BuiltinLora(extra_networks.ExtraNetwork):
        def activate(self, p, params_list):
            calls.append(params_list)

        def deactivate(self, p):
            pass

    def builtin_before_ui():
        net = BuiltinLora("lora")
        extra_networks.register_extra_network(net)
        extra_networks.register_extra_network_alias(net, "lyco")

    script_callbacks.on_before_ui(builtin_before_ui)  # builtins load first, so their before_ui runs last
    harness.fake_host.load_extension(harness.ROOT)
    script_callbacks.before_ui_callback()
    out = capsys.readouterr().out
    assert "builtin 'Lora' extension is enabled" in out and "applied once" in out
    app = FakeApp()
    script_callbacks.app_started_callback(None, app)  # the host calls it after before_ui, before any generation
    assert not isinstance(extra_networks.extra_network_registry["lora"], BuiltinLora)
    assert extra_networks.extra_network_aliases["lyco"] is extra_networks.extra_network_registry["lora"]
    assert "took over" in capsys.readouterr().out
    model = host.use(A1111Model("sd1"))
    a = lora(host, model, "a", "sd1")
    original = host.snapshot()
    _, seen, _ = host.generate("<lora:a:1> <lyco:a:0.5>")
    assert_weights(seen["first_pass"][0], original, [(a, 1.5, 1.5)])
    assert calls == []
    assert ("GET", "/sdapi/v1/loras") not in app.routes and ("GET", "/sdapi/v1/adapters") in app.routes


def test_api_lists_inspects_and_refreshes(host):
    from modules import script_callbacks

    model = host.use(A1111Model("sd1"))
    lora(host, model, "a", "sd1", rank=4, metadata={"ss_output_name": "alpha_style", "ss_tag_frequency": '{"x": {"cat": 2}}'})
    app = FakeApp()
    script_callbacks.app_started_callback(None, app)
    items = app.routes[("GET", "/sdapi/v1/loras")]()
    assert len(items) == 1
    item = items[0]
    assert item["name"] == "a" and item["alias"] == "alpha_style"
    assert item["path"] == os.path.join(host.lora_dir, "a.safetensors")
    assert item["metadata"]["ss_tag_frequency"] == {"x": {"cat": 2}}
    assert item["type"] == "LoCon" and item["rank"] == 4 and item["family"] == "sd1"
    summary = app.routes[("GET", "/sdapi/v1/adapters/inspect")](name="alpha_style")
    assert summary["layers"] == len(KEYS["sd1"]) and summary["rank"]["max"] == 4
    with pytest.raises(Exception, match="no adapter file"):
        app.routes[("GET", "/sdapi/v1/adapters/inspect")](name="missing")
    lora(host, model, "new", "sd1")
    assert app.routes[("POST", "/sdapi/v1/refresh-loras")]() is None
    assert {i["name"] for i in app.routes[("GET", "/sdapi/v1/adapters")]()} == {"a", "new"}


def test_checkpoint_switch_restores_the_old_model_and_patches_the_new(host):
    from modules import script_callbacks

    first = host.use(A1111Model("sd1", seed=1))
    a = lora(host, first, "a", "sd1")
    first_original = host.snapshot(first)
    host.generate("<lora:a:1>")
    second = host.use(A1111Model("sd1", seed=2))
    script_callbacks.model_loaded_callback(second)
    second_original = host.snapshot(second)
    assert all(torch.equal(v, first_original[k]) for k, v in host.params(first).items())
    _, seen, _ = host.generate("<lora:a:0.5>")
    assert_weights(seen["first_pass"][0], second_original, [(a, 0.5, 0.5)])
    # the same object reloaded in place with new weights: nothing stale may be written back
    with torch.no_grad():
        for t in second.parameters():
            t.add_(1.0)
    reloaded = host.snapshot(second)
    script_callbacks.model_loaded_callback(second)
    _, seen, _ = host.generate("plain")
    assert all(torch.equal(v, reloaded[k]) for k, v in seen["first_pass"][0].items())


def test_parsed_adapters_are_cached_until_the_file_changes(host):
    model = host.use(A1111Model("sd1"))
    lora(host, model, "a", "sd1", seed=1)
    lora(host, model, "b", "sd1", seed=2)
    cache = host.runtime.cache
    for prompt in ("<lora:a:1>", "<lora:b:1>", "<lora:a:0.5>", "<lora:b:1>", "<lora:a:1>"):
        host.generate(prompt)
    assert cache.reads == 2
    original = host.snapshot()
    host.generate("plain")
    original = host.snapshot()
    a2 = lora(host, model, "a", "sd1", seed=9)
    st = os.stat(os.path.join(host.lora_dir, "a.safetensors"))
    os.utime(os.path.join(host.lora_dir, "a.safetensors"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, seen, _ = host.generate("<lora:a:1>")
    assert cache.reads == 3
    assert_weights(seen["first_pass"][0], original, [(a2, 1.0, 1.0)])
    host.set_option("adapters_cache_size", 1)
    for prompt in ("<lora:b:1>", "<lora:a:1>", "<lora:b:1>"):
        host.generate(prompt)
    assert cache.reads == 5 and len(cache.entries) == 1


def test_pasted_infotext_keeps_two_number_meaning_and_maps_hashes(host):
    from modules import script_callbacks

    model = host.use(A1111Model("sd1"))
    lora(host, model, "local_name", "sd1", metadata={"sshs_model_hash": "abcdef123456ff"})
    host.runtime.library.refresh()
    params = {"Prompt": "cat <lora:remote:0.2:0.9> <lora:x:1>", "Adapter strength order": "te,unet",
              "Lora hashes": "remote: abcdef123456"}
    script_callbacks.infotext_pasted_callback("", params)
    assert params["Prompt"] == "cat <lora:local_name:0.9:0.2> <lora:x:1>"


def test_settings_exist_at_import_time_without_the_settings_ui(tmp_path):
    host = harness.start(tmp_path, load=False)
    harness.fake_host.load_extension(harness.ROOT)
    opts = host.shared.opts
    assert opts.adapters_tag_order == "unet,te"
    assert opts.adapters_add_hashes_to_infotext is True and opts.adapters_warn_unmatched is True
    assert opts.adapters_cache_size == 8
    assert host.shared.options_templates["adapters_tag_order"].section[0] == "adapters"


def test_reload_ui_registers_again_without_applying_twice(host):
    from modules import extra_networks, script_callbacks

    model = host.use(A1111Model("sd1"))
    a = lora(host, model, "a", "sd1")
    original = host.snapshot()
    host.generate("<lora:a:1>")
    script_callbacks.script_unloaded_callback()
    script_callbacks.clear_callbacks()
    harness.fake_host.load_extension(harness.ROOT)
    extra_networks.initialize()
    script_callbacks.before_ui_callback()
    assert [n for n, _ in script_callbacks.callback_map["before_ui"]].count("adapters_before_ui") == 1
    _, seen, _ = host.generate("<lora:a:1>")
    assert_weights(seen["first_pass"][0], original, [(a, 1.0, 1.0)])


def test_install_py_installs_nothing(tmp_path):
    harness.start(tmp_path, load=False)
    import launch

    runpy.run_path(os.path.join(harness.ROOT, "install.py"), run_name="__main__")
    assert not [c for c in launch.calls if c[0] == "run_pip"]
    assert json.dumps(launch.calls)  # nothing unserialisable recorded


def test_half_precision_model_is_merged_in_float32_and_restored_bit_exactly(host):
    model = host.use(A1111Model("sd1", dtype=torch.float16))
    a = lora(host, model, "a", "sd1")
    original = host.snapshot()
    _, seen, _ = host.generate("<lora:a:0.6>")
    now = seen["first_pass"][0]
    want = expected(original, [(a, 0.6, 0.6)])
    for name in a:  # one rounding to fp16 of the float32 result
        assert now[name].dtype == torch.float16
        assert torch.allclose(now[name].double(), want[name], atol=2e-3, rtol=1e-3), name
    _, seen, _ = host.generate("plain")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())
