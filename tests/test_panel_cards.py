"""Card facts (type badge, rank, family, training metadata, previews, user sidecar) read from headers only, on files
written by the reference tools: LyCORIS `create_lycoris` and PEFT (also on a tiny diffusers UNet for the family)."""

from __future__ import annotations

import json
import os
import struct
from collections import Counter

import pytest
import torch

from lib_adapters import cards, files
from lib_adapters.adapter import Adapter
from lib_adapters.errors import AdapterError
from reference_adapters import build_lycoris, build_peft

# algorithm → (create_lycoris kwargs, expected badge as the trainers name the type). The toy model has a 3×3
# convolution, so a LyCORIS "lora" there is LoCon (kohya's name for LoRA with conv layers).
LYCORIS = {
    "locon": (dict(algo="lora", linear_dim=4, conv_dim=4, linear_alpha=2), "LoCon"),
    "loha": (dict(algo="loha", linear_dim=4, conv_dim=4), "LoHa"),
    "lokr": (dict(algo="lokr", linear_dim=4, conv_dim=4, factor=4), "LoKr"),
    "oft": (dict(algo="diag-oft", linear_dim=16, conv_dim=16), "OFT"),
    "boft": (dict(algo="boft", linear_dim=8, conv_dim=8), "BOFT"),
    "glora": (dict(algo="glora", linear_dim=4, conv_dim=4), "GLoRA"),
    "full": (dict(algo="full"), "full"),
    "dora": (dict(algo="lora", linear_dim=6, conv_dim=6, dora_wd=True), "LoCon+DoRA"),
}
RANKED = {"locon": 4, "loha": 4, "glora": 4, "dora": 6}


def tiny_unet_lora(cross_attention_dim: int, dora: bool = False) -> dict[str, torch.Tensor]:
    """A diffusers-format PEFT LoRA (`unet.` prefix) on attention layers of a tiny UNet with real names."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=8, attention_head_dim=4, norm_num_groups=8)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], use_dora=dora))
    return {f"unet.{k}": v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


@pytest.fixture(scope="session")
def adapter_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cards")
    out = {}
    for name, (kwargs, _) in LYCORIS.items():
        built = build_lycoris(name, **kwargs)
        out[name] = (str(d / f"{name}.safetensors"), built.state_dict)
        files.save_tensors(out[name][0], built.state_dict, {"ss_network_module": "lycoris.kohya"})
    ia3 = build_lycoris("ia3", algo="ia3")
    out["ia3"] = (str(d / "ia3.safetensors"), ia3.state_dict)
    files.save_tensors(out["ia3"][0], ia3.state_dict)
    peft = build_peft("lora", r=5, lora_alpha=5)
    out["peft"] = (str(d / "peft.safetensors"), peft.state_dict)
    files.save_tensors(out["peft"][0], peft.state_dict, peft.metadata)
    for fam, width, dora in (("sd1", 768, False), ("sdxl", 2048, True)):
        sd = tiny_unet_lora(width, dora)
        out[f"unet-{fam}"] = (str(d / f"unet-{fam}.safetensors"), sd)
        files.save_tensors(out[f"unet-{fam}"][0], sd, {"format": "pt"})
    return out


@pytest.mark.parametrize("name", list(LYCORIS))
def test_badge_and_rank_match_the_trainer_settings(adapter_files, name):
    card = cards.read_card(adapter_files[name][0])
    assert card.type_label == LYCORIS[name][1]
    if name in RANKED:
        assert card.rank == RANKED[name]
    if name in ("oft", "boft"):  # OFT/BOFT show their block size, the last axis of the stored blocks
        sizes = Counter(t.shape[-1] for k, t in adapter_files[name][1].items() if k.endswith("oft_blocks"))
        assert card.rank == sizes.most_common(1)[0][0]


def test_ia3_and_peft_badges(adapter_files):
    assert cards.read_card(adapter_files["ia3"][0]).type_label == "IA3"
    peft = cards.read_card(adapter_files["peft"][0])
    assert peft.badge in ("LoRA", "LoCon") and peft.rank == 5 and not peft.dora


@pytest.mark.parametrize("fam,label,badge", [("sd1", "SD1", "LoRA"), ("sdxl", "SDXL", "LoRA+DoRA")])
def test_family_of_a_diffusers_peft_lora_follows_the_unet_config(adapter_files, fam, label, badge):
    card = cards.read_card(adapter_files[f"unet-{fam}"][0])
    assert card.family == fam and card.family_label == label
    assert card.type_label == badge and card.rank == 4


@pytest.mark.parametrize("name", ["locon", "dora", "oft", "lokr", "unet-sdxl"])
def test_header_only_facts_agree_with_the_full_load(adapter_files, name):
    path = adapter_files[name][0]
    card = cards.read_card(path)
    summary = Adapter.load(path).summary()
    assert card.algorithms == summary["algorithms"]
    assert card.dora == summary["dora"] and card.family == summary["family"]
    assert card.layers == sum(summary["algorithms"].values())


def test_listing_never_reads_tensor_data(adapter_files, tmp_path, monkeypatch):
    """A file whose data section is garbage (NaN) still lists; only the full load notices the data."""
    src = adapter_files["locon"][0]
    header = files.read_header(src)
    raw = bytearray(open(src, "rb").read())
    raw[header.data_start:] = b"\xff" * (len(raw) - header.data_start)
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(bytes(raw))
    monkeypatch.setattr(files, "load_tensors", lambda *a, **k: pytest.fail("tensor data was read"))
    listed = cards.list_cards([str(tmp_path)])
    assert [c.type_label for c in listed] == ["LoCon"]
    monkeypatch.undo()
    with pytest.raises(AdapterError):
        Adapter.load(str(bad))


def test_cache_is_kept_until_the_file_changes(adapter_files, tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    path.write_bytes(open(adapter_files["loha"][0], "rb").read())
    cards.clear_cache()
    calls = []
    real = cards.read_header
    monkeypatch.setattr(cards, "read_header", lambda p: calls.append(p) or real(p))
    cards.read_card(path)
    cards.read_card(path)
    assert len(calls) == 1
    path.write_bytes(open(adapter_files["glora"][0], "rb").read())
    os.utime(path, (1, 1))
    assert cards.read_card(path).badge == "GLoRA" and len(calls) == 2


def test_files_sharing_a_tensor_table_are_parsed_once_and_keep_their_own_metadata(adapter_files, tmp_path, monkeypatch):
    """The second file with the same tensors (another training run of one config) reads only its metadata; a
    different data length, non-string metadata or a changed table goes through the full header check again."""
    tensors = adapter_files["locon"][1]
    for i in range(3):
        files.save_tensors(str(tmp_path / f"run{i}.safetensors"), tensors, {"ss_output_name": f"run {i}", "ss_num_epochs": str(i)})
    cards.clear_cache()
    calls = []
    real = cards.read_header
    monkeypatch.setattr(cards, "read_header", lambda p: calls.append(p) or real(p))
    got = [cards.read_card(tmp_path / f"run{i}.safetensors") for i in range(3)]
    assert len(calls) == 1
    assert [c.metadata["ss_output_name"] for c in got] == ["run 0", "run 1", "run 2"]
    assert [c.training.epochs for c in got] == ["0", "1", "2"]
    assert len({(c.badge, c.rank, c.family, c.layers) for c in got}) == 1 and got[0].badge == "LoCon"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "run0.safetensors").read_bytes()[:-4])  # same header, 4 bytes of data missing
    with pytest.raises(AdapterError):
        cards.read_card(cut)
    odd = tmp_path / "odd.safetensors"
    raw = (tmp_path / "run1.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = {"ss_num_epochs": 5}  # not a string: the full reader decides
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    odd.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    before = len(calls)
    try:
        card = cards.read_card(odd)
    except AdapterError:
        card = None
    assert len(calls) == before + 1 and (card is None or card.badge == "LoCon")


def test_training_metadata(tmp_path, adapter_files):
    freq = {"10_cat": {"cat": 30, "sitting": 4, " black fur": 12}, "5_dog": {"dog": 20, "cat": 5}}
    totals = Counter()
    for tags in freq.values():
        totals.update({t.strip(): n for t, n in tags.items()})
    meta = {
        "ss_tag_frequency": json.dumps(freq), "ss_sd_model_name": "v1-5-pruned.safetensors",
        "ss_resolution": "(512, 768)", "ss_num_epochs": "7", "ss_steps": "1400", "ss_network_dim": "4",
    }
    path = str(tmp_path / "t.safetensors")
    files.save_tensors(path, adapter_files["locon"][1], meta)
    t = cards.read_card(path).training
    assert t.tags == sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
    assert (t.base_model, t.resolution, t.epochs, t.steps) == ("v1-5-pruned.safetensors", "512x768", "7", "1400")


def test_previews_beside_the_file_and_embedded_thumbnail(tmp_path, adapter_files):
    sd = adapter_files["loha"][1]
    thumb = "data:image/png;base64,iVBORw0KGgo="
    files.save_tensors(str(tmp_path / "a.safetensors"), sd, {"modelspec.thumbnail": thumb})
    files.save_tensors(str(tmp_path / "b.safetensors"), sd, {"modelspec.thumbnail": "javascript:alert(1)"})
    files.save_tensors(str(tmp_path / "c.safetensors"), sd)
    (tmp_path / "c.preview.png").write_bytes(b"x")
    assert cards.read_card(tmp_path / "a.safetensors").thumbnail == thumb
    assert cards.read_card(tmp_path / "b.safetensors").thumbnail is None
    assert cards.read_card(tmp_path / "c.safetensors").preview_file == str(tmp_path / "c.preview.png")
    (tmp_path / "c.png").write_bytes(b"x")
    assert cards.read_card(tmp_path / "c.safetensors").preview_file == str(tmp_path / "c.png")


def test_unreadable_files_are_reported_not_raised(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    (tmp_path / "ok.txt").write_text("not listed")
    [err] = cards.list_cards([str(tmp_path)])
    assert isinstance(err, AdapterError) and "short.safetensors" in str(err)


def test_user_sidecar_strengths(tmp_path):
    path = str(tmp_path / "x.safetensors")
    assert cards.read_user_metadata(path) == {}
    cards.write_user_metadata(path, {"preferred weight": 0.7, "activation text": "é \"q\""})
    user = cards.read_user_metadata(path)
    assert user["activation text"] == "é \"q\"" and cards.preferred_strengths(user) == (0.7, 0.7)
    user[cards.TE_KEY] = 0.25
    assert cards.preferred_strengths(user) == (0.7, 0.25)
    assert cards.preferred_strengths({"preferred weight": 0}, default=0.9) == (0.9, 0.9)
    (tmp_path / "x.json").write_text("[1, 2]")
    assert cards.read_user_metadata(path) == {}


@pytest.mark.parametrize("unet,te,order,expected", [
    (1.0, 1.0, "unet,te", "<lora:n:1>"), (0.8, 0.5, "unet,te", "<lora:n:0.8:0.5>"),
    (0.8, 0.5, "te,unet", "<lora:n:0.5:0.8>"), (-0.25, 0.0, "unet,te", "<lora:n:-0.25:0>"),
])
def test_tag_text_reads_back_through_the_tag_parser(unet, te, order, expected):
    from lib_adapters import tags

    text = cards.tag_text("n", unet, te, order)
    assert text == expected
    _, [tag] = tags.parse_prompt(text, order=order)
    assert (tag.name, tag.unet, tag.te) == ("n", unet, te)


def test_card_tag_carries_preferred_schedule_and_block_weights():
    from lib_adapters.hosts.panel import save_user_fields
    from lib_adapters.tag_options import tag_options

    user = save_user_fields({}, "", "", 0.8, "", "", "", "", lbw=" OUTD ", schedule="0@0, 1@0.5")
    lbw, schedule = cards.preferred_extras(user)
    assert (lbw, schedule) == ("OUTD", "0@0,1@0.5")
    text = cards.tag_text("n", 0.8, 0.8, "unet,te", lbw, schedule)
    assert text == "<lora:n:0.8:unet=0@0,1@0.5:lbw=OUTD>"
    options = tag_options(text[len("<lora:n:"):-1].split(":"))
    assert options.te == 0.8 and options.lbw == "OUTD" and options.unet.text == "0@0,1@0.5"
    assert cards.preferred_extras(save_user_fields(user, "", "", 0.8, "", "", "", "")) == ("", "")
    for bad in ({"lbw": "1,a,0"}, {"lbw": "x:y"}, {"schedule": "0@0,1@q"}):
        with pytest.raises(AdapterError):
            save_user_fields({}, "", "", 1.0, "", "", "", "", **bad)
