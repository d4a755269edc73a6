"""The extra-networks page against the fake host's `ui_extra_networks` (host-contract §4): registration, items,
card HTML (escaping of hostile metadata), the family filter, the tag the card inserts, the user-metadata save."""

from __future__ import annotations

import json
import os
import sys
from html.parser import HTMLParser

import pytest

FAKE_HOST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_host")
if FAKE_HOST not in sys.path:
    sys.path.insert(0, FAKE_HOST)

from lib_adapters import cards, files, tags  # noqa: E402
from lib_adapters.hosts import panel  # noqa: E402
from reference_adapters import build_lycoris  # noqa: E402
from test_panel_cards import tiny_unet_lora  # noqa: E402

EVIL = '<script>alert("x")</script>" onmouseover="alert(1)'


class Card(HTMLParser):
    """Every start tag with its (unescaped) attributes, and the text, of one rendered card."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.text = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    import fake_host

    global panel
    fake_host.install("a1111")  # fresh fake modules: other test modules may have installed the Forge flavour
    from lib_adapters.hosts import panel
    from modules import errors, extensions, script_callbacks, shared, ui_extra_networks

    root = tmp_path_factory.mktemp("Lora")
    sub = root / "sub"
    sub.mkdir()
    locon = build_lycoris("locon", algo="lora", linear_dim=4, conv_dim=4).state_dict
    files.save_tensors(str(root / "plain.safetensors"), locon)
    files.save_tensors(str(root / "sd1.safetensors"), tiny_unet_lora(768))
    files.save_tensors(str(root / "xl.safetensors"), tiny_unet_lora(2048))
    files.save_tensors(str(sub / "plain.safetensors"), locon)  # same stem in a sub-folder
    freq = {"1_x": {EVIL: 9, "trigger": 3}}
    files.save_tensors(str(root / "evil.safetensors"), locon, {
        "modelspec.description": EVIL, "modelspec.title": EVIL, "ss_sd_model_name": EVIL,
        "ss_tag_frequency": json.dumps(freq), "modelspec.thumbnail": "data:image/png;base64,AAA=\" onerror=\"alert(1)"})
    cards.write_user_metadata(str(root / "sd1.safetensors"), {
        "description": "mine", "activation text": 'say "hi"\nthere', "preferred weight": 0.8,
        cards.TE_KEY: 0.5, "negative text": "blurry"})
    shared.cmd_opts.lora_dir = str(root)
    shared.cmd_opts.lyco_dir_backcompat = str(root / "missing")
    script_callbacks.clear_callbacks()
    ui_extra_networks.initialize()
    extensions.extensions[:] = []
    errors.reported.clear()
    yield root
    shared.sd_model = None


def make_page(**kw):
    return panel.make_page_class()(**kw)


def items_of(page):
    return {item["name"]: item for item in page.list_items()}


def test_register_callbacks_adds_the_page_before_ui(host):
    from modules import errors, script_callbacks, shared, ui_extra_networks

    panel.register_callbacks()
    assert panel.SHOW_ALL_OPTION in shared.opts.data_labels
    script_callbacks.before_ui_callback()
    assert not errors.reported
    [page] = ui_extra_networks.extra_pages
    assert page.title == "Lora" and page.allow_negative_prompt
    assert str(host) in ui_extra_networks.allowed_dirs
    assert set(items_of(page)) == {"plain", "sub/plain", "sd1", "xl", "evil"}  # not the json sidecar
    script_callbacks.clear_callbacks()
    ui_extra_networks.initialize()


def test_title_differs_while_the_builtin_lora_is_enabled(host):
    from modules import extensions

    extensions.extensions[:] = [extensions.Extension("Lora", str(host), enabled=True, is_builtin=True)]
    try:
        page = make_page()
        assert page.title == "Adapters" and page.extra_networks_tabname == "adapters"
        extensions.extensions[0].enabled = False
        assert make_page().title == "Lora"
    finally:
        extensions.extensions[:] = []


def test_item_fields(host):
    page = make_page()
    items = items_of(page)
    sd1 = items["sd1"]
    assert sd1["filename"] == str(host / "sd1.safetensors")
    assert sd1["description"] == "mine"
    keys = sd1["sort_keys"]
    assert (keys["type"], keys["family"], keys["rank"]) == ("lora", "sd1", 4)
    assert {"default", "date_created", "date_modified", "name", "path"} <= set(keys)
    assert sd1["sd_version_str"] == "SdVersion.SD1" and items["xl"]["sd_version_str"] == "SdVersion.SDXL"
    assert sd1["local_preview"] == str(host / "sd1.png")
    payload = json.loads(keys["adapter"])
    assert (payload["name"], payload["unet"], payload["te"]) == ("sd1", 0.8, 0.5)
    # the prompt field is a JavaScript string literal (JSON is valid JS) holding the tag and activation text
    text = json.loads(sd1["prompt"])
    assert text == '<lora:sd1:0.8:0.5> say "hi"\nthere'
    _, [tag] = tags.parse_prompt(text)
    assert (tag.name, tag.unet, tag.te) == ("sd1", 0.8, 0.5)
    assert json.loads(sd1["negative_prompt"]) == "blurry"
    # the same stem twice: the sub-folder one is named by its relative path, which the library resolves
    assert items["sub/plain"]["filename"] == str(host / "sub" / "plain.safetensors")
    assert json.loads(items["plain"]["prompt"]) == "<lora:plain:1>"


def test_default_multiplier_applies_without_preferences(host):
    from modules import shared

    shared.opts.extra_networks_default_multiplier = 0.6
    try:
        assert json.loads(items_of(make_page())["xl"]["prompt"]) == "<lora:xl:0.6>"
    finally:
        shared.opts.extra_networks_default_multiplier = 1.0


def test_cards_for_another_family_are_hidden_unless_show_all(host):
    from modules import shared

    class SDXLModel:
        is_sdxl, is_sd2, is_sd1 = True, False, False

    shared.sd_model = SDXLModel()
    try:
        page = make_page()
        names = set(items_of(page))
        assert "sd1" not in names and {"xl", "plain", "evil"} <= names  # unknown family stays visible
        assert page.create_item("sd1", enable_filter=False) is not None
        shared.opts.data[panel.SHOW_ALL_OPTION] = True
        shown = items_of(page)
        assert json.loads(shown["sd1"]["sort_keys"]["adapter"])["mismatch"] is True
        assert json.loads(shown["xl"]["sort_keys"]["adapter"])["mismatch"] is False
        assert shown["sd1"]["sd_version_str"] == "SdVersion.Unknown"  # Forge's JS filter opts out as well
    finally:
        shared.sd_model = None
        shared.opts.data[panel.SHOW_ALL_OPTION] = False


def test_hostile_metadata_is_shown_as_text_and_runs_nothing(host):
    from modules import shared

    page = make_page()
    page.create_items()
    for is_html in (False, True):
        shared.opts.data["extra_networks_card_description_is_html"] = is_html
        try:
            item = page.create_item("evil")
            rendered = page.create_item_html("txt2img", item, page.card_tpl)
        finally:
            shared.opts.data.pop("extra_networks_card_description_is_html", None)
        card = Card(rendered)
        assert [t for t, _ in card.tags].count("script") == 0
        assert not any(k.startswith("on") and k != "onclick" for _, a in card.tags for k in a)
        [(_, attrs)] = [t for t in card.tags if t[0] == "div" and "card" in t[1].get("class", "").split()]
        assert attrs["onclick"] == 'return adaptersCardClicked(event, this, "evil")'
        payload = json.loads(attrs["data-sort-adapter"])
        assert EVIL in payload["tags"]
        assert "".join(card.text).count(EVIL) >= 1  # the description, as text
        assert not any(t == "img" for t, _ in card.tags)  # the broken thumbnail is refused
    table = Card(panel.training_html(cards.read_card(host / "evil.safetensors")))
    assert [t for t, _ in table.tags].count("script") == 0 and EVIL in "".join(table.text)


def test_onclick_survives_the_tree_view(host):
    page = make_page()
    page.create_items()
    row = page.create_tree_file_item_html("img2img", str(host / "sd1.safetensors"), page.items["sd1"])
    [(_, attrs)] = Card(row).tags
    assert attrs["onclick"].endswith('return adaptersCardClicked(event, this, "sd1")')


def test_single_card_refresh_after_the_editor_saves(host):
    page = make_page()
    page.create_items()
    editor = page.create_user_metadata_editor(None, "txt2img")
    assert editor.id_part == f"txt2img_{page.extra_networks_tabname}_edit_user_metadata"
    editor.save_user_metadata("xl", "new <b>desc</b>", "trig", 0.0, 0.9, "", "", "n")
    saved = cards.read_user_metadata(str(host / "xl.safetensors"))
    assert saved[cards.UNET_KEY] == 0.9 and cards.TE_KEY not in saved and saved["notes"] == "n"
    item = page.create_item("xl", enable_filter=False)
    page.read_user_metadata(item, use_cache=False)
    assert item["description"] == "new <b>desc</b>"
    assert json.loads(item["prompt"]) == "<lora:xl:0.9:1> trig"
    values = editor.put_values_into_components("xl")
    assert values[1] == "new <b>desc</b>" and values[6:] == ["trig", 0.0, 0.9, None, "", "", ""]
    assert "SDXL" in values[5] and "<script" not in values[5]
    editor.save_user_metadata("xl", "d", "", 0.0, "", "", "", "", "OUTD", "0@0, 1@0.5")  # block weights, schedule
    item = page.create_item("xl", enable_filter=False)
    page.read_user_metadata(item, use_cache=False)
    assert json.loads(item["prompt"]) == "<lora:xl:1:unet=0@0,1@0.5:lbw=OUTD>"
    assert editor.put_values_into_components("xl")[-2:] == ["0@0,1@0.5", "OUTD"]
    os.remove(host / "xl.json")


def test_family_check_reads_the_loaded_model_without_loading_one(host, monkeypatch):
    """A1111's `shared.sd_model` loads a checkpoint on first access; the page reads `model_data.sd_model` instead."""
    from modules import sd_models

    class Data:
        def __init__(self):
            self.sd_model = type("SD1Model", (), {"is_sdxl": False, "is_sd2": False, "is_sd1": True})()

        def get_sd_model(self):
            raise AssertionError("the page made the host load a model")

    monkeypatch.setattr(sd_models, "model_data", Data())
    names = set(items_of(make_page()))
    assert "xl" not in names and "sd1" in names


def test_card_tag_follows_the_scripts_strength_order_setting(host):
    from modules import shared

    from lib_adapters.hosts import settings

    shared.opts.data[settings.OPT_ORDER] = "te,unet"
    try:
        text = json.loads(items_of(make_page())["sd1"]["prompt"])
    finally:
        shared.opts.data.pop(settings.OPT_ORDER)
    assert text.startswith("<lora:sd1:0.5:0.8>")
    _, [tag] = tags.parse_prompt(text, order="te,unet")
    assert (tag.unet, tag.te) == (0.8, 0.5)


def test_metadata_hash_reaches_the_card_only_as_twelve_hex_digits():
    assert panel.short_hash("0123456789abcdef0123") == "0123456789ab"
    assert panel.short_hash('"><img src=x onerror=1>') == ""
    assert panel.short_hash(None) == ""
