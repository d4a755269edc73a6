"""Hostile adapter files, generated here: whatever a file holds, reading it gives only an AdapterError naming that
file (library, card, listing, CLI, WebUI API and panel), every other file stays usable; the header parser refuses
what the safetensors format forbids; an incomplete layer is an error, never a silent partial adapter."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors.torch import save_file

from fake_host import FakeApp, harness
from fake_host.adapters import write_lora
from fake_host.models import A1111Model
from lib_adapters import cards, cli
from lib_adapters.adapter import Adapter
from lib_adapters.errors import AdapterError
from lib_adapters.files import read_header

DEEP = 100_000


def entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def write_raw(path, header, data: bytes = b"") -> str:
    """A file from a header given as a dict or as raw JSON bytes, then `data` as the data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def lora_tensors(peft: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 64, generator=g), torch.randn(96, 4, generator=g)
    if peft:
        return {"base_model.model.lin.lora_A.weight": down, "base_model.model.lin.lora_B.weight": up}
    return {"lora_unet_lin.lora_down.weight": down, "lora_unet_lin.lora_up.weight": up,
            "lora_unet_lin.alpha": torch.tensor(2.0)}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# name → (writer(path), reason words when refused, or None when the file is usable)
def _peft(meta_json: str):
    return lambda p: save_file(lora_tensors(peft=True), p, metadata={"lora_adapter_metadata": meta_json})


HOSTILE = {
    "deep-header": (lambda p: write_raw(p, b'{"x":' + nested(DEEP).encode() + b"}"), ("nests too deeply",)),
    "infinity-tag-frequency": (lambda p: save_file(lora_tensors(), p, metadata={
        "ss_tag_frequency": '{"a": {"cat": Infinity, "dog": 1e999, "fox": NaN}}'}), None),
    "zero-size-1e30": (lambda p: write_raw(p, b'{"x.diff":{"dtype":"F32","shape":[0,1000000000000000000000000000000],'
                                              b'"data_offsets":[0,0]}}'), ("invalid",)),
    "zero-size-2e63": (lambda p: write_raw(p, {"x.diff": entry("F32", [0, 2**63], 0, 0)}), ("implausible shape",)),
    "zero-size-strides": (lambda p: write_raw(p, {"x.diff": entry("F32", [0, 2**31, 2**31, 2**31], 0, 0)}),
                          ("implausible shape",)),
    "deep-peft-metadata": (_peft('{"r": 4, "lora_alpha": 8, "alpha_pattern": ' + nested(DEEP) + "}"),
                           ("lora_adapter_metadata", "not usable JSON")),
    "deep-metadata-unused": (lambda p: save_file(lora_tensors(), p, metadata={  # alpha tensors: config not needed
        "lora_adapter_metadata": '{"r": ' + nested(DEEP) + "}", "ss_tag_frequency": nested(900)}), None),
    "nan-alpha": (_peft('{"r": 4, "lora_alpha": NaN}'), ("lora_adapter_metadata", "NaN")),
    "overflowing-alpha": (_peft('{"r": 4, "lora_alpha": 1e999}'), ("lora_adapter_metadata", "finite")),
    "huge-integer-alpha": (_peft('{"r": 4, "lora_alpha": ' + "9" * 400 + "}"), ("lora_alpha", "finite number")),
    "zero-rank": (_peft('{"r": 0, "lora_alpha": 4, "rank_pattern": {"lin": 0}}'), None),  # rank from the tensors
    "string-alpha": (_peft('{"r": 4, "lora_alpha": "8"}'), ("lora_alpha", "finite number")),
    "catastrophic-pattern": (_peft('{"r": 4, "lora_alpha": 8, "alpha_pattern": {"(l+)+x": 1, "(a|a)(a|a)(a|a)(a|a)(a|a)y": 2,'
                                   ' "(.*.*.*.*.*)*z": 3}}'), None),
    "invalid-pattern": (_peft('{"r": 4, "lora_alpha": 8, "alpha_pattern": {"lin[": 1}}'), ("alpha_pattern",)),
    "lookbehind-pattern": (_peft('{"r": 4, "lora_alpha": 8, "alpha_pattern": {"(?<=x)lin": 1}}'), ("alpha_pattern",)),
}

# item 10: what the safetensors format forbids
F32x2 = 8
LAYOUT = {
    "duplicate-identical": (b'{"a.diff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                            b'"a.diff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2, ("'a.diff'", "twice")),
    "duplicate-other-data": (b'{"a.diff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                             b'"a.diff":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', 2 * F32x2, ("gap",)),
    "overlapping": ({"a.diff": entry("F32", [2], 0, 8), "b.diff": entry("F32", [2], 4, 12)}, 12, ("overlaps",)),
    "hole": ({"a.diff": entry("F32", [2], 0, 8), "b.diff": entry("F32", [2], 12, 20)}, 20, ("gap",)),
    "trailing-bytes": ({"a.diff": entry("F32", [2], 0, 8)}, 12, ("4 bytes after the last tensor",)),
    "truncated-data": ({"a.diff": entry("F32", [2], 0, 8)}, 4, ("truncated", "'a.diff'")),
    "unusual-dtype": ({"a.diff": entry("U16", [2], 0, 4)}, 4, ("U16",)),
}


def expect(path, reason):
    """Adapter.load gives an AdapterError for `path` with every reason word, or loads when `reason` is None."""
    if reason is None:
        return Adapter.load(path)
    with pytest.raises(AdapterError) as info:
        Adapter.load(path)
    assert info.value.path == str(path), info.value
    for word in reason:
        assert word.lower() in info.value.reason.lower(), info.value.reason
    return None


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_file_gives_one_adapter_error_naming_it(tmp_path, name, capsys):
    path = str(tmp_path / f"{name}.safetensors")
    HOSTILE[name][0](path)
    adapter = expect(path, HOSTILE[name][1])
    if adapter is not None:
        json.dumps(adapter.summary())  # shown metadata stays serialisable (deep JSON kept as text)
    try:
        card = cards.read_card(path)
        assert card.path == path
    except AdapterError as e:
        assert e.path == path
    code = cli.main(["inspect", path, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert (code, err.count("\n")) == ((0, 0) if HOSTILE[name][1] is None else (2, 1))


def test_non_finite_training_tag_counts_leave_the_card_without_trigger_words(tmp_path):
    path = str(tmp_path / "inf.safetensors")
    HOSTILE["infinity-tag-frequency"][0](path)
    assert cards.read_card(path).training.tags == []


@pytest.mark.parametrize("name", list(LAYOUT))
def test_header_parser_refuses_what_the_safetensors_format_forbids(tmp_path, name):
    header, data_len, reason = LAYOUT[name]
    path = write_raw(tmp_path / f"{name}.safetensors", header, b"\0" * data_len)
    for read in (read_header, Adapter.load, cards.read_card):
        with pytest.raises(AdapterError) as info:
            read(path)
        assert info.value.path == path and all(w.lower() in info.value.reason.lower() for w in reason), info.value


def test_mutated_headers_give_an_adapter_error_or_a_header(tmp_path):
    good = json.dumps({"__metadata__": {"a": "b"}, "x.lora_down.weight": entry("F16", [4, 8], 0, 64),
                       "x.lora_up.weight": entry("F32", [8, 4], 64, 192)}).encode()
    rng = random.Random(0)
    path = tmp_path / "m.safetensors"
    outcomes = set()
    for _ in range(300):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = rng.choice(b'{}[]",:0123456789-eE.x\xff')
        write_raw(path, bytes(raw), bytes(rng.randrange(256) for _ in range(rng.choice([0, 150, 192, 200]))))
        try:
            read_header(path)
            outcomes.add("header")
        except AdapterError as e:
            assert e.path == str(path)
            outcomes.add("refused")
    assert outcomes == {"header", "refused"}


def test_keys_that_match_no_adapter_layout_are_not_an_adapter(tmp_path):
    path = str(tmp_path / "ckpt.safetensors")
    save_file({"model.diffusion_model.out.weight": torch.ones(2, 2), "foo.alpha": torch.tensor(1.0)}, path)
    expect(path, ("not an adapter",))
    assert cards.read_card(path).error.startswith("not an adapter")


INCOMPLETE = {
    "lora-down-only": ({"lora_unet_lin.lora_down.weight": torch.ones(4, 64)}, "LoRA", "lora_up"),
    "lora-up-only": ({"lora_unet_lin.lora_up.weight": torch.ones(96, 4)}, "LoRA", "lora_down"),
    "peft-a-only": ({"base_model.model.lin.lora_A.weight": torch.ones(4, 64)}, "LoRA", "lora_up"),
    "lokr-w1-only": ({"lora_unet_lin.lokr_w1": torch.ones(8, 8)}, "LoKr", "lokr_w2"),
    "lokr-half-w2": ({"lora_unet_lin.lokr_w1": torch.ones(8, 8), "lora_unet_lin.lokr_w2_a": torch.ones(12, 2)},
                     "LoKr", "lokr_w2_b"),
    "loha-three-of-four": ({f"lora_unet_lin.hada_{k}": torch.ones(2, 2) for k in ("w1_a", "w1_b", "w2_a")},
                           "LoHa", "hada_w2_b"),
    "dora-alone": ({"lora_unet_lin.dora_scale": torch.ones(96, 1)}, "DoRA", "LoRA/LoHa/LoKr"),
}


@pytest.mark.parametrize("name", list(INCOMPLETE))
def test_an_incomplete_layer_is_an_error_naming_the_layer(tmp_path, name):
    broken, algo, missing = INCOMPLETE[name]
    tensors = {**{k.replace("_lin", "_other"): v for k, v in lora_tensors().items()}, **broken}  # one whole layer too
    path = str(tmp_path / f"{name}.safetensors")
    save_file(tensors, path)
    message = str(pytest.raises(AdapterError, Adapter.load, path).value)
    layer = "base_model.model.lin" if name.startswith("peft") else "lora_unet_lin"
    assert f"layer {layer!r}" in message and f"incomplete {algo} layer" in message and missing in message
    assert cards.read_card(path).error == message.split(": ", 1)[1]


def test_merge_refuses_an_incomplete_adapter_and_writes_nothing(tmp_path):
    from lib_adapters import merge

    ckpt = tmp_path / "base.safetensors"
    save_file({"model.diffusion_model.x.weight": torch.ones(2, 2)}, str(ckpt))
    (tmp_path / "loras").mkdir()
    save_file(INCOMPLETE["lora-down-only"][0], str(tmp_path / "loras" / "half.safetensors"))
    with pytest.raises(AdapterError, match="incomplete LoRA layer"):
        merge.merge(str(ckpt), [str(tmp_path / "loras")], str(tmp_path / "out.safetensors"), "<lora:half:1>")
    assert not (tmp_path / "out.safetensors").exists()


def test_webui_lists_every_file_and_applies_the_good_ones_beside_hostile_ones(tmp_path):
    host = harness.start(tmp_path)
    from lib_adapters.hosts import panel
    from modules import script_callbacks

    model = host.use(A1111Model("sd1"))
    write_lora(f"{host.lora_dir}/good.safetensors", model, "sd1")
    bad = {name: writer for name, (writer, reason) in HOSTILE.items() if reason is not None}
    for name, writer in bad.items():
        writer(f"{host.lora_dir}/{name}.safetensors")
    save_file(INCOMPLETE["lokr-w1-only"][0], f"{host.lora_dir}/incomplete.safetensors")
    app = FakeApp()
    script_callbacks.app_started_callback(None, app)
    items = {i["name"]: i for i in app.routes[("GET", "/sdapi/v1/adapters")]()}
    assert set(items) == {"good", "incomplete", *bad}
    assert "error" not in items["good"] and items["good"]["type"] in ("LoRA", "LoCon")
    assert all(items[n]["error"].startswith(f"{host.lora_dir}/{n}.safetensors: ") for n in [*bad, "incomplete"])
    page_items = {i["name"]: i for i in panel.PAGES[0].list_items()}
    assert set(page_items) == set(items)
    assert page_items["incomplete"]["description"].startswith("Cannot be used: layer 'lora_unet_lin': incomplete")
    assert json.loads(page_items["deep-header"]["sort_keys"]["adapter"])["error"]
    _, alone, _ = host.generate("<lora:good:1>")
    res, seen, p = host.generate("<lora:good:1> <lora:deep-header:1> <lora:incomplete:1>")
    assert all(torch.equal(v, alone["first_pass"][0][k]) for k, v in seen["first_pass"][0].items())
    notes = [c for c in res.comments.splitlines() if "deep-header" in c or "incomplete" in c]
    assert len(notes) == 2 and "nests too deeply" in notes[0] and "incomplete LoKr layer" in notes[1]
    summary = app.routes[("GET", "/sdapi/v1/adapters/inspect")](name="good")
    assert summary["layers"] > 0
    with pytest.raises(Exception, match="nests too deeply"):
        app.routes[("GET", "/sdapi/v1/adapters/inspect")](name="deep-header")
