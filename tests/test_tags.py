import pytest

from lib_adapters.errors import AdapterError
from lib_adapters.tags import combine, parse_prompt, parse_tag, scan, split_args, strengths, untaggable


def test_one_number_sets_both_strengths():
    t = parse_tag("style:0.7")
    assert (t.name, t.unet, t.te, t.positional) == ("style", 0.7, 0.7, 1)


def test_two_numbers_are_unet_then_te_by_default():
    t = parse_tag("style:0.7:0.2")
    assert (t.unet, t.te) == (0.7, 0.2)


def test_builtin_order_reads_te_then_unet():
    t = parse_tag("style:0.7:0.2", order="te,unet")
    assert (t.unet, t.te) == (0.2, 0.7)


def test_named_strength_overrides_only_its_part():
    t = parse_tag("style:0.8:te=0")
    assert (t.unet, t.te) == (0.8, 0.0)
    t = parse_tag("style:unet=0.3")
    assert (t.unet, t.te) == (0.3, 1.0)


def test_no_number_uses_the_default_multiplier():
    assert (parse_tag("style", default=0.6).unet, parse_tag("style", default=0.6).te) == (0.6, 0.6)


def test_dyn_is_accepted_and_reported():
    t = parse_tag("style:1:dyn=8")
    assert t.unet == 1 and "dyn=8" in t.notices[0]


@pytest.mark.parametrize("body, reason", [
    ("style:abc", "not a number"),
    ("style:1:2:3", "at most two"),
    (":1", "no adapter name"),
    ("style:foo=1", "unknown argument"),
])
def test_malformed_tags_name_the_tag_and_reason(body, reason):
    with pytest.raises(AdapterError) as e:
        parse_tag(body)
    assert reason in str(e.value) and f"<lora:{body}>" in str(e.value)


def test_prompt_tags_are_removed_and_kept_in_order():
    text, tags = parse_prompt("a cat <lora:a:1> on a mat <lyco:b:0.5:0>")
    assert text == "a cat  on a mat"
    assert [(t.name, t.unet, t.te) for t in tags] == [("a", 1.0, 1.0), ("b", 0.5, 0.0)]


def test_same_adapter_twice_sums_strengths():
    merged = combine([parse_tag("a:0.5:0.1"), parse_tag("b:1"), parse_tag("A:0.25")])
    assert [(t.name, t.unet, t.te) for _, t in merged] == [("a", 0.75, 0.35), ("b", 1.0, 1.0)]


def test_combining_by_file_keeps_different_files_apart_and_joins_spellings_of_one():
    files = {"Style": "/l/Style.safetensors", "style": "/l/style.safetensors", "sub/x": "/l/sub/x.safetensors",
             "x": "/l/sub/x.safetensors"}
    merged = combine([parse_tag("Style:1"), parse_tag("style:0.5"), parse_tag("x:0.2"), parse_tag("sub/x:0.3")],
                     files.__getitem__)
    assert [(p, t.unet) for p, t in merged] == [("/l/Style.safetensors", 1.0), ("/l/style.safetensors", 0.5),
                                               ("/l/sub/x.safetensors", 0.5)]


def test_strengths_rejects_unknown_order():
    with pytest.raises(ValueError):
        strengths(["1"], order="clip,unet")


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "Infinity", "1e309", "1_0", "0x10", "1.5abc", "\u0661",
                                  "1e", ".", "+-1"])
def test_numbers_are_read_strictly_and_refusals_name_the_tag(text):
    with pytest.raises(AdapterError) as e:
        parse_tag(f"style:{text}")
    assert f"<lora:style:{text}>" in str(e.value) and "not a number" in str(e.value)


@pytest.mark.parametrize("text, value", [("1", 1.0), (" 0.5 ", 0.5), (".5", 0.5), ("1.", 1.0), ("-1e-1", -0.1),
                                         ("+2E1", 20.0), ("1e-400", 0.0)])
def test_numbers_as_users_write_them(text, value):
    assert parse_tag(f"style:{text}").unet == value


def test_scan_is_linear_on_unterminated_tags_and_finds_what_the_regex_found():
    import re

    old = re.compile(r"<(lora|lyco):([^>]*)>")
    for prompt in ["a <lora:x:1> <lyco:y> <lora:z:1 <lora:w:2> tail <lora:", "<<lora:a>>", "<lora:>", "x" * 10]:
        assert [(t.start, t.end, t.kind, t.body) for t in scan(prompt)] == \
               [(m.start(), m.end(), m.group(1), m.group(2)) for m in old.finditer(prompt)]
    assert scan("<lora:" * 40_000) == [] and parse_prompt("x <lora:" * 30_000)[1] == []  # 240 KB: instant


def test_arguments_keep_their_raw_text():
    name, args = split_args(" n :0.5: te = 1 :lbw=1,0,0,1::")
    assert name == "n"
    assert [(a.key, a.value, a.raw) for a in args] == [(None, "0.5", "0.5"), ("te", "1", " te = 1 "),
                                                       ("lbw", "1,0,0,1", "lbw=1,0,0,1")]


@pytest.mark.parametrize("name, reason", [("a:b", "':'"), ("a>b", "'>'"), (" a", "space"), ("ok", "")])
def test_names_the_webui_cannot_read_in_a_tag(name, reason):
    assert (reason in untaggable(name)) and (bool(untaggable(name)) == bool(reason))
