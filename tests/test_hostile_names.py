"""Hostile folders, names and tags in the WebUI (fake A1111 host): every file stays reachable under a name the
panel shows, folder links never multiply or hide files, malformed or non-finite strengths are refused with the
tag named and nothing applied, pasted infotext keeps two-number tags meaning what they meant."""

from __future__ import annotations

import os
import time

import pytest
import torch

from fake_host import harness
from fake_host.adapters import write_lora
from fake_host.models import A1111Model
from lib_adapters.errors import AdapterError
from lib_adapters.hosts import infotext
from lib_adapters.library import AdapterIndex


@pytest.fixture
def host(tmp_path):
    return harness.start(tmp_path)


def lora(host, model, rel, **kw):
    path = os.path.join(host.lora_dir, f"{rel}.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return write_lora(path, model, "sd1", **kw)


def cards(host):
    from lib_adapters.hosts import panel

    return {item["name"]: item for item in panel.PAGES[0].list_items()}


def payload(item):
    import json

    return json.loads(item["sort_keys"]["adapter"])


# ---- item 7: folders ---------------------------------------------------------------------------------------------

def test_a_link_to_a_sibling_folder_adds_no_second_file(host):
    model = host.use(A1111Model("sd1"))
    lora(host, model, "a/x")
    os.symlink(os.path.join(host.lora_dir, "a"), os.path.join(host.lora_dir, "b"))
    os.symlink(host.lora_dir, os.path.join(host.lora_dir, "a", "up"))  # a loop back to the root
    index = AdapterIndex(host.lora_dir)
    assert [p.name for p in index.paths] == ["x.safetensors"] and index.find("x") == index.find("a/x")
    assert list(cards(host)) == ["x"]
    _, seen, _ = host.generate("<lora:x:1>")
    assert host.runtime.last_plan_size > 0


def test_links_to_dot_and_loops_are_walked_once(tmp_path):
    root = tmp_path / "Lora"
    (root / "s").mkdir(parents=True)
    (root / "s" / "x.safetensors").write_bytes(b"")
    for i in range(2):  # two links to `.` in every folder: a naive walk visits ~2^40 paths
        os.symlink(".", root / f"self{i}")
        os.symlink("..", root / "s" / f"up{i}")
    t = time.perf_counter()
    index = AdapterIndex(root)
    assert [str(p.relative_to(root)) for p in index.paths] == ["s/x.safetensors"]
    assert time.perf_counter() - t < 5  # not a speed claim: a runaway walk never returns at all


def test_the_same_stem_in_two_folders_is_reachable_by_the_names_the_message_gives(host):
    model = host.use(A1111Model("sd1"))
    lora(host, model, "x", seed=1)
    lyco = host.shared.cmd_opts.lyco_dir_backcompat
    os.makedirs(lyco)
    write_lora(os.path.join(lyco, "x.safetensors"), model, "sd1", seed=2)
    index = AdapterIndex([host.lora_dir, lyco])
    with pytest.raises(AdapterError) as e:
        index.find("x")
    assert "write one of Lora/x, LyCORIS/x" in e.value.reason
    assert index.find("Lora/x").startswith(host.lora_dir) and index.find("LyCORIS/x").startswith(lyco)
    assert sorted(cards(host)) == ["Lora/x", "LyCORIS/x"]
    _, seen_a, _ = host.generate("<lora:Lora/x:1>")
    _, seen_b, _ = host.generate("<lora:LyCORIS/x:1>")
    a, b = seen_a["first_pass"][0], seen_b["first_pass"][0]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_path_name_wins_over_a_stem(tmp_path):
    for rel in ("plain.safetensors", "sub/plain.safetensors"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    index = AdapterIndex(tmp_path)
    assert index.find("plain") == str(tmp_path / "plain.safetensors")
    assert [index.relative_name(p) for p in index.paths] == ["plain", "sub/plain"]


# ---- item 8: names a tag cannot hold -------------------------------------------------------------------------------

def test_a_name_with_a_colon_gets_its_alias_as_tag_or_says_why_it_has_none(host):
    model = host.use(A1111Model("sd1"))
    lora(host, model, "style:v2", metadata={"ss_output_name": "style_v2"})
    lora(host, model, "a>b")
    shown = cards(host)
    assert payload(shown["style:v2"])["name"] == "style_v2" and not payload(shown["style:v2"])["untaggable"]
    assert shown["style:v2"]["prompt"] == '"<lora:style_v2:1>"'
    why = payload(shown["a>b"])["untaggable"]
    assert "'>'" in why and "rename" in why and shown["a>b"]["prompt"] == '""'
    assert shown["a>b"]["description"].startswith("Cannot be tagged")
    before = host.snapshot()
    _, seen, _ = host.generate("<lora:style_v2:1>")
    assert any(not torch.equal(v, before[k]) for k, v in seen["first_pass"][0].items())


def test_card_names_fold_case_only_when_unique(host):
    model = host.use(A1111Model("sd1"))
    lora(host, model, "foo")
    lora(host, model, "sub/Foo")
    lora(host, model, "bar")
    shown = cards(host)
    assert {n: payload(c)["fold"] for n, c in shown.items()} == {"foo": False, "Foo": False, "bar": True}


# ---- item 4: strengths -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", ["<lora:a:nan>", "<lora:a:inf>", "<lora:a:1e309>", "<lora:a:1_0>", "<lora:a:0x10>",
                                 "<lora:a:1.5abc>", "<lora:a:1:2:3>", "<lora:a:te=nan>", "<lora:a:foo=1>"])
def test_a_malformed_strength_is_refused_naming_the_tag_and_nothing_is_applied(host, tag):
    model = host.use(A1111Model("sd1"))
    lora(host, model, "a")
    before = host.snapshot()
    res, seen, _ = host.generate(f"cat {tag}")
    assert all(torch.equal(v, before[k]) for k, v in seen["first_pass"][0].items())
    [note] = [c for c in res.comments.splitlines() if "a:" in c]
    assert tag in note and "the image is made without it" in note


# ---- item 8: pasted infotext ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, swapped", [
    ("<lora:x:0.2:0.9>", "<lora:x:0.9:0.2>"),
    ("<lora:x:0.2:0.9:te=0>", "<lora:x:0.9:0.2:te=0>"),
    ("<lora:x:0.2:0.9:dyn=8>", "<lora:x:0.9:0.2:dyn=8>"),
    ("<lora:x: 0.2 : 0.9 >", "<lora:x: 0.9 : 0.2 >"),
    ("<lora:x:te=0.2:0.3:0.9>", "<lora:x:te=0.2:0.9:0.3>"),
    ("<lora:x:0.5> <lyco:y:1:0:hr=0.5>", "<lora:x:0.5> <lyco:y:0:1:hr=0.5>"),
    ("<lora:x:0.2:0.9", "<lora:x:0.2:0.9"),
])
def test_pasted_infotext_swaps_every_two_number_tag(prompt, swapped):
    params = {"Prompt": prompt, "Adapter strength order": "te,unet"}
    infotext.restore_prompt(params, "unet,te", {})
    assert params["Prompt"] == swapped


def test_pasted_hashes_rename_tags_with_or_without_strengths():
    params = {"Prompt": "<lora:remote> <lora:remote:1> <lora:remoteX:1> < lora:remote>", "Lora hashes": "remote: abc"}
    infotext.restore_prompt(params, "unet,te", {"abc": "local"})
    assert params["Prompt"] == "<lora:local> <lora:local:1> <lora:remoteX:1> < lora:remote>"
